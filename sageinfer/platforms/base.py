"""The questions the engine asks of a chip family. One subclass per family."""
from __future__ import annotations

import contextlib

import torch


class Platform:
    name: str = "base"
    device_type: str = "cpu"
    dist_backend: str = "gloo"
    supports_graphs: bool = False
    supports_triton: bool = False
    # Name of the attention backend the engine picks by default on this platform.
    preferred_attention_backend: str = "torch_ref"
    # Probing order among available platforms: higher first (accelerators before the CPU).
    priority: int = 0
    # The Ray resource one rank's device is (None: ranks need no device resource, as on the CPU).
    ray_device_resource: str | None = None
    # The environment variable that limits a process to some of the devices ("0,1"), for launchers
    # that give each instance its own devices (None: no devices to split, as on the CPU).
    visible_devices_env: str | None = None
    # Tokens per KV-cache block unless the user says otherwise: the prefix-cache granularity, and
    # the unit in which attention kernels find contiguous keys.
    kv_block_size: int = 16

    def set_device(self, index: int) -> None:
        """Make device `index` this process's current one (a tensor-parallel rank's)."""

    def peak_rates(self) -> tuple[float | None, float | None]:
        """(dense bf16 FLOP/s, memory bytes/s) of one device by its datasheet, for the utilisation
        gauges; None where not known."""
        return None, None

    def device_count(self) -> int | None:
        """Devices this process can see, for one tensor-parallel rank each; None: no limit (CPU ranks
        are processes)."""
        return None

    def num_compute_units(self) -> int:
        """Units that run kernel programs side by side (SMs on NVIDIA, AI cores on Ascend, CPU cores
        here): kernels size their grids by it."""
        import os
        return os.cpu_count() or 1

    def supports_dependent_launch(self) -> bool:
        """Whether a kernel may start before the one it depends on has finished (and wait for it
        inside), as NVIDIA's programmatic dependent launch allows from Hopper on."""
        return False

    def supports_tensor_copies(self) -> bool:
        """Whether Triton kernels may move tiles with tensor descriptors (a bulk tensor copy engine,
        NVIDIA's TMA from Hopper on) instead of per-thread loads."""
        return False

    # Whether the chip has FP8 matmuls (None: ask supports_fp8). Where it has none, 8-bit weights and
    # KV caches are INT8, and FP8 is refused at start.
    fp8: bool | None = None

    def supports_fp8(self) -> bool:
        return bool(self.fp8)

    def check_config(self, config) -> None:
        """Refuse at start, with the alternative, what the chip can't do."""
        if not self.supports_fp8():
            for field, value in (("kv_cache_dtype", config.kv_cache_dtype), ("quantization", config.quantization)):
                if value == "fp8":
                    raise ValueError(f"{field}='fp8' needs FP8 matmuls, which the {self.name} platform does not have "
                                     "on this device; use int8 (kv_cache_dtype='int8', quantization='int8', or an INT8 "
                                     "W8A8 checkpoint)")

    # Whether W8A8 layers may run the portable Triton INT8 kernel where int8_matmul has no library GEMM.
    portable_int8_kernel: bool = True

    def prefers_int8_kernel(self) -> bool:
        """Whether W8A8 layers run the Triton INT8 kernel (ops/int8_matmul.py, scales in its epilogue,
        tiles for speed) even where int8_matmul has a library GEMM: where that is measured faster."""
        return False

    def int8_matmul(self, xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor | None:
        """xq [M, K] @ wq [N, K]^T in int32 through the chip's library INT8 GEMM, or None where it has
        none for these shapes (the layers then run the Triton kernel or the reference)."""
        return None

    def fp8_scaled_matmul(self, xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                          out_dtype: torch.dtype) -> torch.Tensor | None:
        """(xq * x_scale [M, 1]) @ (wq * w_scale [N])^T in out_dtype through the chip's library FP8 GEMM
        with rowwise scales, or None where it has none for these shapes and dtype."""
        return None

    def fp8_gemm_rows(self, rows: int) -> int:
        """The rows to give fp8_scaled_matmul for an input of `rows` rows: more where the library is faster
        on a taller input. The layers then allocate their 8-bit input that tall (the rows past `rows` are
        left unwritten) and drop the extra rows of the product."""
        return rows

    def supports_fp8_block_gemm(self) -> bool:
        """Whether fp8_block_matmul runs here (asked once per layer before serving, outside graphs)."""
        return False

    def fp8_block_matmul(self, xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                         out_dtype: torch.dtype) -> torch.Tensor | None:
        """Block-scaled FP8 GEMM, as DeepSeek's and Qwen3's FP8 checkpoints are laid out: xq [M, K] with
        x_scale [M, K / 128] (per token and 128 columns), wq [N, K] with w_scale [N / 128, K / 128] (per
        128 x 128 tile), out [M, N] in out_dtype; None where the chip's library has none for these."""
        return None

    def prefill_attention(self):
        """A chip-specific prefill attention kernel with ops.prefill_attention's contract, for long
        prompts where it beats the portable one: an object with supports(page_size, head_dim,
        num_heads, num_kv_heads, kv_dtype) and a call returning out, or None to fall back. None here."""
        return None

    @classmethod
    def is_available(cls) -> bool:
        return False

    def device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index) if self.device_type != "cpu" else torch.device("cpu")

    def device_name(self) -> str:
        return self.name

    def device_uuid(self, device: torch.device) -> str | None:
        """An identity of the physical device that two processes can compare (they may number it
        differently), or None where there is none to tell (the CPU)."""
        return None

    def synchronize(self) -> None:
        pass

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        raise NotImplementedError

    def reset_peak_memory(self) -> None:
        pass

    def peak_memory_allocated(self) -> int:
        return 0

    def memory_allocated(self) -> int:
        return 0

    def memory_reserved(self) -> int | None:
        """Bytes this process's allocator holds on the device (None where it cannot tell): unlike
        mem_get_info's free memory, another process's allocations leave it alone."""
        return None

    def empty_cache(self) -> None:
        pass

    def loading_allocations(self):
        """A context for the model load: how the device's allocator should place the weights and the load's
        temporaries (nothing changes by default)."""
        return contextlib.nullcontext()

    def default_kv_cache_bytes(self) -> int | None:
        """Bytes for the KV cache when the user gives none and no profiling is done (None: profile)."""
        return None

    # Graph capture, where supports_graphs: the graph type, the capture context, a memory pool.
    def graph_class(self):
        raise NotImplementedError(f"{self.name} has no graph capture")

    def graph_context(self, graph, pool=None, stream=None):
        raise NotImplementedError(f"{self.name} has no graph capture")

    def graph_pool_handle(self):
        raise NotImplementedError(f"{self.name} has no graph capture")

    def stream(self, device: torch.device | None = None):
        """A new stream on device (default: the current one), or None where the platform has none."""
        return None

    def to_host_async(self, tensors: list[torch.Tensor]):
        """Start copying device tensors to the host; returns (host tensors, a handle whose
        synchronize() waits for these copies only)."""
        return [t.to("cpu") for t in tensors], _Done()

    def copy_stream_context(self, stream):
        """Context in which enqueued copies go to stream (None: the current stream)."""
        import contextlib
        return contextlib.nullcontext()

    def wait_for(self, stream) -> None:
        """Make the current stream wait for all work enqueued so far on stream."""

    def record_event(self):
        """A marker of the work enqueued so far on the current stream (None where not needed)."""
        return None

    def wait_event(self, event) -> None:
        """Make the current stream wait for the marked work."""

    def share_memory_handle(self, tensor: torch.Tensor) -> dict:
        """A picklable description through which another process on this host maps tensor's memory
        (KV transfer device to device, no copy through the host). May move tensor's storage in place
        into shareable memory; views of it follow."""
        raise NotImplementedError(f"{self.name} cannot share device memory between processes")

    def open_memory_handle(self, handle: dict) -> torch.Tensor:
        """The tensor another process described with share_memory_handle, mapped here."""
        raise NotImplementedError(f"{self.name} cannot share device memory between processes")

    def kv_transfer_memory_type(self) -> str:
        """How a KV transfer library (NIXL) names the memory the KV cache lives in."""
        return "VRAM"

    def host_buffer(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Host memory that device copies can use asynchronously (pinned where the platform has it)."""
        return torch.zeros(shape, dtype=dtype)

    def pin_host_memory(self, tensor: torch.Tensor) -> bool:
        """Page-lock host memory that exists already (a shared-memory mapping), so that device copies
        to and from it run at DMA speed; whether it was (where not, copies still work, slower)."""
        return False

    def unpin_host_memory(self, tensor: torch.Tensor) -> None:
        """Undo pin_host_memory (before the memory is unmapped)."""

    def to_device(self, array, device: torch.device) -> torch.Tensor:
        """A host array (numpy or CPU tensor) on the device, without blocking the host where the
        platform allows."""
        return torch.as_tensor(array).to(device)

    def copy_to_device(self, dst: torch.Tensor, array) -> None:
        """Write a host array into an existing device tensor (one copy, no staging tensor on the
        device), without blocking the host where the platform allows."""
        dst.copy_(torch.as_tensor(array))


class _Done:
    def synchronize(self) -> None:
        pass
