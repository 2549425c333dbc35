from __future__ import annotations

import contextlib
import ctypes
import logging
import os

import torch

from sageinfer.platforms.base import Platform

logger = logging.getLogger(__name__)


# cuBLAS's rowwise-scaled FP8 GEMM is slowest just past each multiple of 128 rows, where it takes another
# kernel: on an H200, a Qwen3-8B layer's four GEMMs take 150 us at 136 rows against 111 at 256, 199 at 264
# against 149 at 384 (benchmarks/experiments/sweep_gemm_rows.py). So the layers' 8-bit inputs are padded
# to a multiple of FP8_GEMM_ROW_ALIGN rows (SAGEINFER_FP8_GEMM_ROW_ALIGN; 1 pads nothing).
FP8_GEMM_ROW_ALIGN = int(os.environ.get("SAGEINFER_FP8_GEMM_ROW_ALIGN", "128"))


def _set_allocator_settings(settings: str) -> None:
    """The caching allocator's options changed at run time (as PYTORCH_CUDA_ALLOC_CONF sets them at start)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # torch before 2.9
        setter = torch.cuda.memory._set_allocator_settings
    setter(settings)


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    supports_graphs = True
    supports_triton = True
    preferred_attention_backend = "triton"
    # Blocks of 64 let prefill attention read each 64-key tile as one contiguous run (ops/prefill_attention):
    # on an H100, 455-468 against 399-415 TFLOP/s on the 16K chunks of a 32K prompt and 304 against
    # 275 on 16 prompts of 1024, at a prefix-cache granularity of 64 tokens instead of 16.
    kv_block_size = 64
    # The model load with the allocator's expandable segments (loading_allocations)
    load_with_expandable_segments = True

    priority = 10
    ray_device_resource = "GPU"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"  # ROCm honours it too

    def supports_fp8(self) -> bool:
        # FP8 e4m3 from Ada and Hopper on. Before sm_89 (A100, A800) Triton refuses the type in a kernel and
        # torch._scaled_mm the call: FP8 would fail in the first forward pass with their messages.
        return torch.cuda.get_device_capability() >= (8, 9)

    @classmethod
    def is_available(cls) -> bool:
        # A ROCm build answers to torch.cuda too: that is the rocm platform's. (Kunlunxin's
        # CUDA-compatible build does as well; the kunlun platform, of higher priority, is chosen there.)
        return torch.cuda.is_available() and getattr(torch.version, "hip", None) is None

    def device_name(self) -> str:
        return torch.cuda.get_device_name()

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def device_uuid(self, device: torch.device) -> str | None:
        return str(torch.cuda.get_device_properties(device).uuid)

    def share_memory_handle(self, tensor):
        # CUDA IPC: a handle of the allocation holding tensor (torch's own export, as for tensors sent
        # between torch.multiprocessing workers), and the GPU named so a process that numbers it
        # differently (CUDA_VISIBLE_DEVICES) finds it.
        from torch.multiprocessing.reductions import reduce_tensor
        _, args = reduce_tensor(tensor)
        return {"ipc_args": args, "device_uuid": self.device_uuid(tensor.device)}

    def open_memory_handle(self, handle):
        from torch.multiprocessing.reductions import rebuild_cuda_tensor
        index = next((i for i in range(torch.cuda.device_count())
                      if self.device_uuid(torch.device("cuda", i)) == handle["device_uuid"]), None)
        if index is None:
            raise ValueError(f"GPU {handle['device_uuid']} is not visible to this process (CUDA_VISIBLE_DEVICES)")
        args = list(handle["ipc_args"])
        args[6] = index  # the device, as numbered here
        return rebuild_cuda_tensor(*args)

    # Datasheet dense bf16 FLOP/s and memory bandwidth, by a part of the device's name (first match).
    _PEAKS = (("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100 NVL", 835e12, 3.9e12),
              ("H100", 989e12, 3.35e12), ("H800", 989e12, 3.35e12), ("H20", 148e12, 4.0e12),
              ("A100-SXM4-80GB", 312e12, 2.04e12), ("A100", 312e12, 1.56e12), ("A800", 312e12, 2.04e12),
              ("L40S", 362e12, 0.864e12), ("L4", 121e12, 0.3e12))

    def peak_rates(self) -> tuple[float | None, float | None]:
        name = self.device_name()
        return next(((f, b) for part, f, b in self._PEAKS if part in name), (None, None))

    def device_count(self) -> int | None:
        return torch.cuda.device_count()

    def num_compute_units(self) -> int:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count

    def supports_dependent_launch(self) -> bool:
        return torch.cuda.get_device_capability()[0] >= 9

    def supports_tensor_copies(self) -> bool:
        return torch.cuda.get_device_capability()[0] >= 9

    # Off Hopper the library's INT8 GEMM serves; the Triton kernel is measured on Hopper only.
    portable_int8_kernel = False

    def prefers_int8_kernel(self) -> bool:
        # Hopper: torch._int_mm runs an sm_80 kernel and the scales take three more passes over an int32
        # product (a 16,000-token prefill of an INT8 Qwen3-8B on an H200: 245 ms of INT8 GEMM and 235 ms
        # of those passes). SAGEINFER_INT8_GEMM=library keeps torch._int_mm (to compare the two).
        if not hasattr(self, "_int8_kernel"):
            self._int8_kernel = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
                                 and os.environ.get("SAGEINFER_INT8_GEMM", "triton") != "library")
        return self._int8_kernel

    def int8_matmul(self, xq, wq):
        m, k = xq.shape
        if k % 8 or wq.shape[0] % 8:  # cuBLAS takes shapes in steps of 8
            return None
        if m <= 16:  # and more than 16 rows
            xq = torch.cat([xq, xq.new_zeros(17 - m, k)])
        return torch._int_mm(xq, wq.t())[:m]

    def fp8_gemm_rows(self, rows):
        if FP8_GEMM_ROW_ALIGN <= 1:
            return rows
        return -(-rows // FP8_GEMM_ROW_ALIGN) * FP8_GEMM_ROW_ALIGN

    def fp8_scaled_matmul(self, xq, wq, x_scale, w_scale, out_dtype):
        # Rowwise-scaled FP8 GEMMs take shapes in steps of 16 and write bf16 only.
        if xq.shape[1] % 16 or wq.shape[0] % 16 or out_dtype != torch.bfloat16:
            return None
        return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=out_dtype)

    def supports_fp8_block_gemm(self) -> bool:
        # cuBLAS's block-scaled FP8 GEMM (CUDA 12.9 on, Hopper), through torch's scaled_mm. Checked once
        # against the dequantized product: a torch or driver without it, or one that answers wrong,
        # leaves the layers to expand their weights. SAGEINFER_FP8_BLOCK_GEMM=0 leaves them so anyway
        # (to compare the two paths).
        if not hasattr(self, "_block_fp8_ok"):
            wanted = os.environ.get("SAGEINFER_FP8_BLOCK_GEMM", "1") != "0"
            self._block_fp8_ok = wanted and self._probe_fp8_block_gemm()
        return self._block_fp8_ok

    def _probe_fp8_block_gemm(self) -> bool:
        import torch.nn.functional as F
        if not hasattr(F, "scaled_mm") or torch.cuda.get_device_capability() != (9, 0):
            return False
        try:
            gen = torch.Generator(device="cuda").manual_seed(0)
            m, n, k = 20, 256, 384
            xq = torch.randn(m, k, device="cuda", generator=gen).to(torch.float8_e4m3fn)
            wq = torch.randn(n, k, device="cuda", generator=gen).to(torch.float8_e4m3fn)
            x_scale = torch.rand(m, k // 128, device="cuda", generator=gen) + 0.5
            w_scale = torch.rand(n // 128, k // 128, device="cuda", generator=gen) + 0.5
            got = self._fp8_block_gemm(xq, x_scale, wq, w_scale, torch.bfloat16).float()
            want = (xq.float() * x_scale.repeat_interleave(128, 1)) @ (
                wq.float() * w_scale.repeat_interleave(128, 0).repeat_interleave(128, 1)).t()
            ok = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().mean())))
        except Exception as exc:  # noqa: BLE001 - no such GEMM here: the layers expand their weights
            logger.info("block-scaled FP8 GEMM not available (%s); block-FP8 layers expand their weights", exc)
            return False
        if not ok:
            logger.warning("block-scaled FP8 GEMM disagrees with the dequantized product; not used")
        return ok

    def fp8_block_matmul(self, xq, x_scale, wq, w_scale, out_dtype):
        if xq.shape[1] % 128 or wq.shape[0] % 128 or out_dtype != torch.bfloat16:
            return None
        if not self.supports_fp8_block_gemm():
            return None
        try:
            return self._fp8_block_gemm(xq, x_scale, wq, w_scale, out_dtype)
        except RuntimeError as exc:  # shapes the library refuses: expand from now on rather than fail the step
            logger.warning("block-scaled FP8 GEMM refused %s x %s (%s); block-FP8 layers expand their weights",
                           tuple(xq.shape), tuple(wq.shape), exc)
            self._block_fp8_ok = False
            return None

    @staticmethod
    def _fp8_block_gemm(xq, x_scale, wq, w_scale, out_dtype):
        import torch.nn.functional as F
        m = xq.shape[0]
        if m % 4:  # rows in fours; the activation scales M-major; the tile scales' K padded to fours
            xq = torch.cat([xq, xq.new_zeros(4 - m % 4, xq.shape[1])])
            x_scale = torch.cat([x_scale, x_scale.new_ones(4 - m % 4, x_scale.shape[1])])
        kb = w_scale.shape[1]
        if kb % 4:
            w_scale = torch.nn.functional.pad(w_scale, (0, 4 - kb % 4), value=1.0)
        out = F.scaled_mm(xq, wq.t(), x_scale.t().contiguous().t(), F.ScalingType.BlockWise1x128, w_scale.t(),
                          F.ScalingType.BlockWise128x128, output_dtype=out_dtype)
        return out[:m]

    def prefill_attention(self):
        # Hopper only: the kernel is built on its warpgroup MMA and bulk tensor copies (Blackwell has
        # neither in this form).
        if torch.cuda.get_device_capability() != (9, 0):
            return None
        try:
            from sageinfer.platforms.hopper_attention import HopperPrefillAttention
        except Exception as exc:  # noqa: BLE001  (a Triton without Gluon, or with another Gluon API)
            logger.warning("Hopper prefill attention unavailable, using the portable kernel: %s: %s",
                           type(exc).__name__, exc)
            return None
        return HopperPrefillAttention()

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info()

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def peak_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated()

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated()

    def memory_reserved(self) -> int | None:
        return torch.cuda.memory_reserved()

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    @contextlib.contextmanager
    def loading_allocations(self):
        # A load quantized as it goes frees and takes blocks of many sizes (full-precision rows, their float32
        # temporaries, the 8-bit results), which the caching allocator's fixed segments fragment: Llama-3.1-70B
        # to FP8 (72.7 GiB held) ran out of an 80 GB H100 with 6.8 GiB reserved but unallocated, and loads with
        # expandable segments at a 76.6 GiB peak. The load alone takes them (the user's own setting stands);
        # the KV cache and the graphs' pools after it take the allocator as configured.
        configured = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get("PYTORCH_ALLOC_CONF", "")
        if not self.load_with_expandable_segments or "expandable_segments" in configured:
            yield
            return
        _set_allocator_settings("expandable_segments:True")
        try:
            yield
        finally:
            _set_allocator_settings("expandable_segments:False")

    def graph_class(self):
        return torch.cuda.CUDAGraph

    def graph_context(self, graph, pool=None, stream=None):
        return torch.cuda.graph(graph, pool=pool, stream=stream)

    def graph_pool_handle(self):
        return torch.cuda.graph_pool_handle()

    def stream(self, device=None):
        return torch.cuda.Stream(device=device)

    def to_host_async(self, tensors: list[torch.Tensor]):
        # Enqueued right after the step that produced them, so waiting on the event does not wait
        # for the next step, which is launched before these are read.
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(host, tensors):
            h.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def copy_stream_context(self, stream):
        return torch.cuda.stream(stream)

    def wait_for(self, stream) -> None:
        torch.cuda.current_stream().wait_stream(stream)

    def record_event(self):
        event = torch.cuda.Event()
        event.record()
        return event

    def wait_event(self, event) -> None:
        torch.cuda.current_stream().wait_event(event)

    def host_buffer(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, pin_memory=True)

    def pin_host_memory(self, tensor: torch.Tensor) -> bool:
        # Portable (1): usable from every device's context, as a decode instance's ranks may need.
        cudart = torch.cuda.cudart()
        try:
            error = int(cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 1))
        except (AttributeError, RuntimeError, TypeError) as exc:  # a build without it: stay pageable
            logger.warning("page-locking host memory is not available here (%s): copies through it stay slow", exc)
            return False
        if error:
            _clear_last_error()
            logger.warning("page-locking %.2f GiB of host memory failed (CUDA error %d): copies through it stay slow",
                           tensor.numel() * tensor.element_size() / 2**30, error)
        return error == 0

    def unpin_host_memory(self, tensor: torch.Tensor) -> None:
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())

    def to_device(self, array, device: torch.device) -> torch.Tensor:
        # Pageable copies may wait for the stream; pinned ones don't. torch's caching host allocator
        # keeps each pinned buffer alive until its copy has run.
        return torch.as_tensor(array).pin_memory().to(device, non_blocking=True)

    def copy_to_device(self, dst: torch.Tensor, array) -> None:
        dst.copy_(torch.as_tensor(array).pin_memory(), non_blocking=True)


def _clear_last_error() -> None:
    """Reset the runtime's last error after a call that failed harmlessly: left behind, the next kernel
    launch's check would report it as its own. torch's cudart bindings lack cudaGetLastError; the
    runtime library that torch loaded has it."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except OSError as exc:
        logger.warning("could not reset CUDA's last error (%s)", exc)
