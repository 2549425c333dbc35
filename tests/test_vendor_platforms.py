"""The Ascend, Cambricon and Kunlunxin platform files against STAND-INS of their vendors' packages
(no such chip is reachable here): each stand-in implements exactly the calls the platform makes,
under the names the vendor documents (torch_npu's torch.npu, torch_mlu's torch.mlu, torch_xmlir's
CUDA-compatible mode). These tests check the mapping and the selection, not the hardware."""
import contextlib
import subprocess
import sys
import types

import pytest
import torch

import sageinfer.platforms as platforms
from sageinfer.config import EngineConfig
from sageinfer.platforms.ascend import AscendPlatform
from sageinfer.platforms.cambricon import CambriconPlatform
from sageinfer.platforms.cuda import CudaPlatform
from sageinfer.platforms.kunlun import KunlunPlatform


class _StandInDeviceModule(types.SimpleNamespace):
    """torch.npu / torch.mlu as the vendor packages shape them (torch.cuda's names)."""

    def __init__(self, graph_name: str, device_name: str):
        calls = []
        graph_class = type(graph_name, (), {})

        class Stream:
            def wait_stream(self, other):
                calls.append(("wait_stream", other))

            def wait_event(self, event):
                calls.append(("wait_event", event))

        class Event:
            def record(self):
                calls.append(("record",))

        super().__init__(
            calls=calls, Stream=Stream, Event=Event, **{graph_name: graph_class},
            is_available=lambda: True, device_count=lambda: 8, get_device_name=lambda: device_name,
            set_device=lambda i: calls.append(("set_device", i)), synchronize=lambda: calls.append(("sync",)),
            mem_get_info=lambda: (60 << 30, 64 << 30), memory_allocated=lambda: 123, max_memory_allocated=lambda: 456,
            reset_peak_memory_stats=lambda: calls.append(("reset_peak",)), empty_cache=lambda: calls.append(("empty",)),
            current_stream=lambda: Stream(), stream=lambda s: contextlib.nullcontext(s),
            graph=lambda g, pool=None, stream=None: contextlib.nullcontext(g), graph_pool_handle=lambda: "pool")


VENDORS = [(AscendPlatform, "torch_npu", "npu", "NPUGraph", "Ascend910B3", "hccl", 128),
           (CambriconPlatform, "torch_mlu", "mlu", "MLUGraph", "MLU590", "cncl", 16)]


@pytest.fixture
def fresh_selection(monkeypatch):
    monkeypatch.setattr(platforms, "_current", None)
    monkeypatch.delenv(platforms.ENV_VAR, raising=False)


def _install(monkeypatch, module: str, device_type: str, api) -> None:
    """The vendor package as importing it behaves: it registers torch.<device_type>."""
    vendor = types.ModuleType(module)
    vendor.__spec__ = types.SimpleNamespace(name=module)
    monkeypatch.setitem(sys.modules, module, vendor)
    monkeypatch.setattr(torch, device_type, api, raising=False)
    monkeypatch.setattr("importlib.util.find_spec",
                        _find_spec_with(module, __import__("importlib.util").util.find_spec))


def _find_spec_with(module, real):
    return lambda name, *a: types.SimpleNamespace(name=name) if name == module else real(name, *a)


@pytest.mark.parametrize("cls, module, device_type, graph, device_name, backend, block", VENDORS)
def test_stand_in_vendor_module_platform_answers(monkeypatch, fresh_selection, cls, module, device_type, graph,
                                                 device_name, backend, block):
    assert not cls.is_available()  # no vendor package here
    with pytest.raises(ValueError, match="is not available"):
        platforms.get_platform(cls.name)
    api = _StandInDeviceModule(graph, device_name)
    _install(monkeypatch, module, device_type, api)
    assert cls.is_available()
    assert platforms.get_platform().name == cls.name  # a vendor's device is chosen before a GPU or the CPU
    p = platforms.get_platform(cls.name)
    assert (p.device_type, p.dist_backend, p.kv_block_size) == (device_type, backend, block)
    assert p.device_name() == device_name and p.device_count() == 8
    assert p.mem_get_info() == (60 << 30, 64 << 30)
    assert p.memory_allocated() == 123 and p.peak_memory_allocated() == 456
    p.set_device(3)
    p.synchronize()
    p.reset_peak_memory()
    p.empty_cache()
    assert ("set_device", 3) in api.calls and ("sync",) in api.calls and ("reset_peak",) in api.calls
    assert p.supports_graphs and p.graph_class() is getattr(api, graph) and p.graph_pool_handle() == "pool"
    event = p.record_event()
    p.wait_event(event)
    p.wait_for(p.stream())
    assert ("record",) in api.calls and ("wait_event", event) in api.calls
    # what only NVIDIA has stays off: the portable kernels run
    assert not p.supports_dependent_launch() and not p.supports_tensor_copies() and p.prefill_attention() is None
    assert not p.supports_fp8()
    with pytest.raises(ValueError, match="use int8"):
        p.check_config(EngineConfig(model="m", kv_cache_dtype="fp8"))
    p.check_config(EngineConfig(model="m", kv_cache_dtype="int8"))


def test_a_vendor_module_without_graphs_runs_eager(monkeypatch, fresh_selection):
    api = _StandInDeviceModule("NPUGraph", "Ascend310P")
    del api.NPUGraph  # an older torch_npu
    _install(monkeypatch, "torch_npu", "npu", api)
    assert not AscendPlatform().supports_graphs


def test_stand_in_kunlunxin_build_is_the_kunlun_platform_not_cuda(monkeypatch, fresh_selection):
    """Kunlunxin's PyTorch answers to torch.cuda (CUDA-compatible mode, BKCL behind "nccl"); its
    torch_xmlir package tells it apart, and the kunlun platform is chosen before cuda."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert CudaPlatform.is_available() and not KunlunPlatform.is_available()
    assert platforms.get_platform().name == "cuda"
    monkeypatch.setattr(platforms, "_current", None)
    _install(monkeypatch, "torch_xmlir", "xmlir_unused", None)
    assert KunlunPlatform.is_available() and KunlunPlatform.priority > CudaPlatform.priority
    assert platforms.get_platform().name == "kunlun"  # chosen before cuda, which answers too
    k = KunlunPlatform()
    assert k.device_type == "cuda" and k.dist_backend == "nccl" and not k.supports_fp8()
    assert not k.supports_dependent_launch() and not k.supports_tensor_copies() and k.prefill_attention() is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert not k.prefers_int8_kernel() and not k.supports_fp8()
    assert CudaPlatform().prefers_int8_kernel() and CudaPlatform().supports_fp8()  # a Hopper
    assert k.peak_rates() == (None, None)


def test_every_platform_is_registered_through_the_entry_points():
    from importlib.metadata import PackageNotFoundError, distribution, entry_points
    try:
        distribution("sageinfer")
    except PackageNotFoundError:  # run from a source tree on the path: there is no metadata to read
        pytest.skip("sageinfer is not installed (pip install -e .): no entry points to read")
    names = {e.name for e in entry_points(group=platforms.PLUGIN_GROUP)}
    assert {"ascend", "cambricon", "kunlun", "rocm", "cuda", "cpu"} <= names


def test_smoke_test_reports_and_passes_on_this_machine():
    proc = subprocess.run([sys.executable, "-m", "sageinfer.platforms.smoke"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "platform ascend" in proc.stdout and "RESULT: PASS" in proc.stdout
    assert "greedy sequences equal the CPU's" in proc.stdout
