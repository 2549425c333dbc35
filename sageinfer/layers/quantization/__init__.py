"""Weight quantization: which scheme a checkpoint (or the user) asks for, and one method object per
scheme that owns a linear layer's tensors, converts them after loading and applies the layer."""
from sageinfer.layers.quantization.config import (QuantConfig, get_quant_config, parse_quant_config,
                                                  set_quant_config)

__all__ = ["QuantConfig", "get_quant_config", "parse_quant_config", "set_quant_config"]
