"""A smoke test for a machine's platform, with a report a user can paste into an issue:

  python -m sageinfer.platforms.smoke [--device NAME]

1. which platforms are registered, which are available, which one is chosen (and why not others);
2. that platform's answers: device, memory, collective backend, graphs, Triton, FP8;
3. a tiny random Llama generated greedily on the device (portable kernels, then the reference
   attention) and on the CPU: the tokens must agree.
Exit status 0 when every check passes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import traceback


def _line(ok: bool | None, what: str) -> bool:
    print(f"[{'PASS' if ok else 'FAIL' if ok is False else 'INFO'}] {what}", flush=True)
    return ok is not False


def run(device: str | None = None) -> bool:
    import sageinfer.platforms as platforms
    ok = True
    found = platforms.registered_platforms()
    for name, cls in found.items():
        try:
            available = cls.is_available()
        except Exception as exc:  # noqa: BLE001
            available = f"error: {type(exc).__name__}: {exc}"
        _line(None, f"platform {name:10s} priority {cls.priority:4d}  available: {available}")
    try:
        platform = platforms.get_platform(device)
    except Exception as exc:  # noqa: BLE001
        return _line(False, f"choosing the platform: {type(exc).__name__}: {exc}")
    _line(None, f"chosen: {platform.name} (device type {platform.device_type!r}, collectives {platform.dist_backend!r})")
    checks = [("device name", platform.device_name), ("devices", platform.device_count),
              ("free / total memory (bytes)", platform.mem_get_info),
              ("graph capture", lambda: platform.supports_graphs), ("Triton", lambda: platform.supports_triton),
              ("attention backend", lambda: platform.preferred_attention_backend),
              ("KV block size", lambda: platform.kv_block_size), ("FP8 matmuls", platform.supports_fp8),
              ("compute units", platform.num_compute_units)]
    for what, ask in checks:
        try:
            _line(None, f"{what}: {ask()}")
        except Exception as exc:  # noqa: BLE001
            ok &= _line(False, f"{what}: {type(exc).__name__}: {exc}")
    ok &= _generation_agrees(platform)
    print("RESULT:", "PASS" if ok else "FAIL", flush=True)
    return ok


def _generation_agrees(platform) -> bool:
    from sageinfer import LLM, SamplingParams
    from sageinfer.models.tiny import build_tiny_model
    ok = True
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [{"prompt_token_ids": [3 + i, 40, 7 * i + 11, 99]} for i in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(tmp + "/llama", "llama")
        cpu = [o.outputs[0].token_ids for o in LLM(path, dtype="float32", device="cpu", show_progress=False,
                                                   max_model_len=256, num_gpu_blocks_override=64).generate(prompts, params, use_tqdm=False)]
        backends = ["torch_ref"] + (["triton"] if platform.supports_triton and platform.name != "cpu" else [])
        for backend in backends:
            try:
                llm = LLM(path, dtype="float32", device=platform.name, attention_backend=backend,
                          max_model_len=256, num_gpu_blocks_override=64, show_progress=False)
                got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
                same = sum(a == b for a, b in zip(got, cpu))
                ok &= _line(same == len(cpu), f"tiny Llama on {platform.name} ({backend} attention): {same}/{len(cpu)} "
                                              f"greedy sequences equal the CPU's")
                llm.engine.shutdown()
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                ok &= _line(False, f"tiny Llama on {platform.name} ({backend} attention): {type(exc).__name__}: {exc}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="a platform name (default: the one chosen automatically)")
    return 0 if run(parser.parse_args().device) else 1


if __name__ == "__main__":
    sys.exit(main())
