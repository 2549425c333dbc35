"""Platforms as plugins: discovered through the `sageinfer.platform_plugins` entry points of the
installed distributions, chosen by priority or by name, with clear errors."""
import sys

import pytest
import torch

import sageinfer.platforms as platforms
from sageinfer.platforms.cpu import CpuPlatform
from sageinfer.platforms.cuda import CudaPlatform
from sageinfer.platforms.rocm import RocmPlatform

PLUGIN = '''
from sageinfer.platforms.cpu import CpuPlatform


class FakeAcceleratorPlatform(CpuPlatform):
    name = "fakeaccel"
    priority = 100
    dist_backend = "gloo"


class AbsentPlatform(CpuPlatform):
    name = "absent"
    priority = 200

    @classmethod
    def is_available(cls):
        return False
'''


@pytest.fixture
def plugin_distribution(tmp_path, monkeypatch):
    """A vendor package as pip would install it: a module and a .dist-info with entry points."""
    (tmp_path / "fake_vendor_platform.py").write_text(PLUGIN)
    info = tmp_path / "fake_vendor_platform-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-vendor-platform\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[sageinfer.platform_plugins]\nfakeaccel = fake_vendor_platform:FakeAcceleratorPlatform\n"
        "absent = fake_vendor_platform:AbsentPlatform\nbroken = fake_vendor_platform_missing:Nothing\n"
        "notaplatform = json:dumps\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(platforms, "_current", None)
    monkeypatch.delenv(platforms.ENV_VAR, raising=False)
    yield
    sys.modules.pop("fake_vendor_platform", None)


def test_a_plugin_platform_is_discovered_and_preferred(plugin_distribution, caplog):
    found = platforms.registered_platforms()
    assert list(found)[:2] == ["absent", "fakeaccel"] and {"cuda", "rocm", "cpu"} <= set(found)
    assert "broken" not in found and "notaplatform" not in found
    assert "could not be loaded" in caplog.text and "not a Platform subclass" in caplog.text
    assert platforms.get_platform().name == "fakeaccel"  # the highest available: "absent" is not


def test_forcing_a_platform_by_name_or_environment(plugin_distribution, monkeypatch):
    assert isinstance(platforms.get_platform("cpu"), CpuPlatform)
    monkeypatch.setenv(platforms.ENV_VAR, "cpu")
    assert platforms.get_platform().name == "cpu"
    with pytest.raises(ValueError, match="must be one of .*fakeaccel"):
        platforms.get_platform("tpu")
    with pytest.raises(ValueError, match="'absent' is not available"):
        platforms.get_platform("absent")


def test_an_engine_runs_on_the_plugin_platform(plugin_distribution, llama_dir):
    from sageinfer import LLM, SamplingParams
    llm = LLM(llama_dir, dtype="float32", device="fakeaccel", num_gpu_blocks_override=128, show_progress=False)
    assert llm.engine.platform.name == "fakeaccel"
    assert llm.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids


def test_a_rocm_build_is_the_rocm_platform_not_cuda(monkeypatch):
    """Hygon DCU and AMD GPUs answer to torch.cuda; what only NVIDIA has stays off."""
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert RocmPlatform.is_available() and not CudaPlatform.is_available()
    rocm = RocmPlatform()
    assert rocm.dist_backend == "nccl"  # RCCL answers to the nccl backend name
    assert rocm.prefill_attention() is None and not rocm.supports_dependent_launch()
    assert not rocm.supports_tensor_copies() and rocm.peak_rates() == (None, None)
    # an MI250 answers capability 9.0 as a Hopper does: the Hopper-tuned INT8 tiles stay NVIDIA's
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert not rocm.prefers_int8_kernel() and not rocm.supports_fp8()


def test_a_cuda_load_takes_expandable_segments_then_gives_them_back(monkeypatch):
    """The load alone runs with expandable segments (a load quantized as it goes fragments fixed ones); the
    allocator is set back after it, even when the load fails, and a user's own setting is left alone."""
    import sageinfer.platforms.cuda as cuda_module
    settings = []
    monkeypatch.setattr(cuda_module, "_set_allocator_settings", settings.append)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    with CudaPlatform().loading_allocations():
        assert settings == ["expandable_segments:True"]
    assert settings == ["expandable_segments:True", "expandable_segments:False"]
    settings.clear()
    with pytest.raises(RuntimeError, match="load failed"):
        with CudaPlatform().loading_allocations():
            raise RuntimeError("load failed")
    assert settings == ["expandable_segments:True", "expandable_segments:False"]
    settings.clear()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False,max_split_size_mb:512")
    with CudaPlatform().loading_allocations():
        pass
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    from sageinfer.platforms.kunlun import KunlunPlatform
    for unmeasured in (RocmPlatform, KunlunPlatform):  # CUDA's children keep their allocators as they are
        with unmeasured().loading_allocations():
            pass
    assert settings == []


@pytest.mark.skipif(not CudaPlatform.is_available(), reason="needs an NVIDIA GPU")
def test_the_load_s_allocations_are_expandable_and_later_ones_are_not(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)

    def segment_of(tensor):
        start = tensor.data_ptr()
        return next(s for s in torch.cuda.memory._snapshot()["segments"]
                    if s["address"] <= start < s["address"] + s["total_size"])
    torch.cuda.empty_cache()
    with CudaPlatform().loading_allocations():
        during = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda.empty_cache()
    after = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    assert segment_of(during)["is_expandable"] and not segment_of(after)["is_expandable"]
