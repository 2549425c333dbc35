"""Where the GPU waits for the host: the idle gaps of a torch.profiler trace (CPU and CUDA activities) of some
engine steps, each with what the host was doing meanwhile (the engine's phases, marked here, and its long calls).
Nothing inside the profiled steps synchronizes, so host and device overlap as the engine lets them. This is how
P1's first eager steps were found waiting in the LM head (benchmarks/results/2026-12-04h-*.md).

    mark_phases(engine)   # once, before the profiled steps
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ...engine.step()...
    print_gaps(prof.events())
"""
from __future__ import annotations

import torch

PHASE = "phase "


def mark_phases(engine) -> None:
    """Wrap the engine's host phases in record_function ranges named PHASE + what they do."""
    runner = engine.runner

    def mark(obj, attr, name):
        inner = getattr(obj, attr)

        def marked(*args, **kwargs):
            with torch.profiler.record_function(PHASE + name):
                return inner(*args, **kwargs)
        setattr(obj, attr, marked)
    mark(engine.scheduler, "schedule", "schedule")
    mark(runner, "execute", "execute")
    mark(runner, "_host_inputs", "host inputs")
    mark(runner.model, "compute_logits", "LM head")
    mark(runner, "sampler", "sampler")
    mark(engine, "_process", "read and apply tokens")


def idle_gaps(kernels: list[tuple[float, float]], min_gap: float) -> tuple[float, float, list[tuple[float, float]]]:
    """Of device intervals (start, end), overlapping or not: (busy time, span, the gaps of at least min_gap in
    which nothing ran), in the intervals' unit."""
    if not kernels:
        return 0.0, 0.0, []
    kernels = sorted(kernels)
    busy, gaps = 0.0, []
    first, reached = kernels[0][0], kernels[0][0]
    for start, end in kernels:
        if start - reached >= min_gap:
            gaps.append((reached, start))
        busy += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return busy, reached - first, gaps


def print_gaps(events, min_gap_ms: float = 0.2, most: int = 20) -> None:
    """A report of a profile's events (prof.events()): the device's busy share, its idle gaps of min_gap_ms or
    more with the host ranges that cover at least a third of each, and the host calls of 3 ms or more."""
    cuda = torch.autograd.DeviceType.CUDA
    device = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == cuda]
    host = [e for e in events if e.device_type != cuda]
    busy, span, gaps = idle_gaps(device, min_gap_ms * 1e3)
    if not span:
        print("no device activity in the profile")
        return
    origin = min(s for s, _ in device)
    idle = sum(b - a for a, b in gaps)
    print(f"\n### device timeline: span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({100 * busy / span:.1f}%); "
          f"{len(gaps)} gaps of {min_gap_ms} ms or more, {idle / 1e3:.1f} ms in all")
    print("| gap at ms | ms | host meanwhile (ms within the gap) |\n| --- | --- | --- |")
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:most]:
        covering = {}
        for e in host:
            inside = min(b, e.time_range.end) - max(a, e.time_range.start)
            if inside >= (b - a) / 3:
                covering[e.name] = max(covering.get(e.name, 0.0), inside)
        during = ", ".join(f"{name[:50]} {t / 1e3:.1f}" for name, t in sorted(covering.items(), key=lambda kv: -kv[1]))
        print(f"| {(a - origin) / 1e3:.1f} | {(b - a) / 1e3:.2f} | {during[:300]} |")
    long = [e for e in host if e.time_range.end - e.time_range.start >= 3e3 and not e.name.startswith(PHASE)
            and not e.name.startswith("ProfilerStep")]
    print("\nhost calls of 3 ms or more (the engine's phases aside):")
    for e in sorted(long, key=lambda e: e.time_range.start)[:most]:
        print(f"  {e.name[:60]} at {(e.time_range.start - origin) / 1e3:.1f} ms: "
              f"{(e.time_range.end - e.time_range.start) / 1e3:.1f} ms")
