"""Where a mixed-length workload's time goes: steps by the path they ran (decode graph, prefill graph,
eager) with their share of the wall time and tokens, the requests' times to first token, and the GPU
kernels of a window of steps with how busy the device was in it.

  python benchmarks/profile_mix.py --mix chat-mix --num-prompts 1000 --window 200:300 [engine flags]
  python benchmarks/profile_mix.py --workload P1-shared-prefix --window 20:60 [engine flags]   (a standard one)

--passes 2 runs the mix twice in one process, the prefix cache emptied before each: the first pass pays
the Triton compiles of shapes the start-up did not see (listed with their seconds), the second shows
the warm engine; the window is profiled in the last pass.

A path's ms/step is the host's time in engine.step(): with asynchronous scheduling a step waits there for the
device's work of the step before it (an eager decode step after a mixed one shows the mixed step's time), so the
window's kernels, not that column, say what a path costs the device.

--gaps MS also records the host (CPU activities, the engine's phases marked) in the window and in the eager
decode steps, and lists the device's idle gaps of MS or more with what the host did meanwhile (gpu_gaps.py).
The eager decode steps are then profiled as one run of consecutive steps, with no synchronize between them.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer import LLM, SamplingParams  # noqa: E402
from sageinfer.bench.mixed import MIXES, mixed_prompts  # noqa: E402
from sageinfer.bench.workloads import load_workloads, make_prompts  # noqa: E402
from sageinfer.gateway.engine_args import engine_kwargs  # noqa: E402
from standard_args import add_standard_engine_args  # noqa: E402
from gpu_gaps import PHASE, mark_phases, print_gaps  # noqa: E402
from kernel_kinds import seconds_by_kind  # noqa: E402
from triton_compiles import CompileLog  # noqa: E402


def count_paths(runner, last: list):
    """Wrap the runner's three forward paths so each step notes which one it took."""
    for owner, name, label in ((runner.graphs, "run", "decode graph"), (runner.prefill_graphs, "run", "prefill graph"),
                               (runner, "_eager_forward", "eager")):
        if owner is None:
            continue
        fn = getattr(owner, name)

        def wrapper(*a, _fn=fn, _label=label, **k):
            last[0] = _label
            return _fn(*a, **k)
        setattr(owner, name, wrapper)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mix", default="chat-mix", choices=sorted(MIXES))
    throughput = sorted(name for name, w in load_workloads().items() if w["kind"] == "throughput")
    parser.add_argument("--workload", choices=throughput,
                        help="a standard throughput workload instead of a mix (its own prompts and lengths)")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--mix-seed", type=int, default=0)
    parser.add_argument("--window", default="200:300", help="steps whose GPU kernels are profiled (0:100000: all)")
    parser.add_argument("--kernels", type=int, default=24, help="rows of the window's kernel table")
    parser.add_argument("--passes", type=int, default=1, help="runs of the mix in one process")
    parser.add_argument("--compiles-out", help="JSON file of each pass's compiles with the signatures that missed")
    parser.add_argument("--profile-eager-decode", type=int, default=0, metavar="N",
                        help="also profile the GPU kernels of the last pass's first N decode steps past the "
                             "largest graph, one step at a time")
    parser.add_argument("--gaps", type=float, default=0.0, metavar="MS",
                        help="also record the host and list the device's idle gaps of MS or more (0: off)")
    add_standard_engine_args(parser)
    args = parser.parse_args()
    llm = LLM(**engine_kwargs(args))
    engine, runner = llm.engine, llm.engine.runner
    vocab = engine.model_config.vocab_size
    warm = torch.Generator().manual_seed(99)
    for i in range(8):  # compile the prefill and decode shapes outside the timed run
        ids = torch.randint(1000, vocab - 1000, (300,), generator=warm).tolist()
        engine.add_request(f"warm{i}", {"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=8,
                                                                                   ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    last = [None]
    count_paths(runner, last)
    sched = {"seconds": 0.0}
    schedule = engine.scheduler.schedule

    largest_graph = runner.graphs.max_batch if runner.graphs is not None else 0
    eager = EagerDecodeProfile(args.profile_eager_decode, args.gaps)
    if args.gaps:
        mark_phases(engine)

    def timed_schedule(*a, **k):
        t = time.perf_counter()
        out = schedule(*a, **k)
        sched["seconds"] += time.perf_counter() - t
        last.append((out.num_batched_tokens, len(out.scheduled)))
        if eager.armed and not sched.get("window") and out.num_batched_tokens == len(out.scheduled) > largest_graph:
            eager.start()
        return out
    engine.scheduler.schedule = timed_schedule
    compiles, signatures = CompileLog(), {}
    for n in range(1, args.passes + 1):
        compiles.reset()
        sched["seconds"] = 0.0
        eager.armed = n == args.passes and eager.wanted > 0 and torch.cuda.is_available()  # kernel times need a GPU
        run_pass(engine, args, vocab, last, sched, window=args.window if n == args.passes else None,
                 label=f"pass {n}/{args.passes}" if args.passes > 1 else "", after_step=eager.stop)
        count, seconds = compiles.total()
        print(f"\nTriton compiles in this pass: {count}, {seconds:.1f} s")
        if count:
            print(compiles.table())
        signatures[f"pass {n}"] = dict(compiles.signatures)
    compiles.close()
    eager.report()
    if args.compiles_out:
        with open(args.compiles_out, "w") as f:
            json.dump(signatures, f, indent=1)


class EagerDecodeProfile:
    """GPU kernels of the first N decode steps that run eagerly (more sequences than the largest graph),
    each profiled alone: the profiler starts once such a step is scheduled and stops when it is done. With
    gaps_ms, N consecutive steps from the first such one instead, in one profile with the host recorded and no
    synchronize before or between them (the separate profiles' synchronize leaves the device idle while the
    host prepares each step, so their busy share is the profile's own)."""

    def __init__(self, wanted: int, gaps_ms: float = 0.0):
        self.wanted, self.armed, self.prof, self.gaps_ms = wanted, False, None, gaps_ms
        self.events = []
        self.steps, self.wall, self.kernels = 0, 0.0, collections.defaultdict(lambda: np.zeros(2))

    def start(self):
        if self.prof is not None:  # already profiling this step (or, with gaps, this run of steps)
            return
        if not self.gaps_ms:
            sync()
        self.prof = torch.profiler.profile(activities=profiled_activities(self.gaps_ms))
        self.prof.__enter__()
        self.t = time.perf_counter()

    def stop(self):
        if self.prof is None:
            return
        if self.gaps_ms and self.steps + 1 < self.wanted:  # one profile over the run of steps: no synchronize
            self.steps += 1
            return
        sync()
        self.wall += time.perf_counter() - self.t
        self.prof.__exit__(None, None, None)
        if self.gaps_ms:
            self.events = self.prof.events()
        for e in self.prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith(PHASE):
                self.kernels[e.key] += (e.self_device_time_total / 1e6, e.count)
        self.prof, self.steps = None, self.steps + 1
        self.armed = self.steps < self.wanted

    def report(self):
        if not self.steps:
            return
        gpu = sum(s for s, _ in self.kernels.values())
        what = "steps from the first eager decode step" if self.gaps_ms else "eager decode steps"
        print(f"\n### {self.steps} {what}: wall {self.wall:.2f} s, GPU kernels {gpu:.2f} s "
              f"({100 * gpu / self.wall:.0f}% busy)")
        print("| kernel | s | share | calls |\n| --- | --- | --- | --- |")
        for name, (s, count) in sorted(self.kernels.items(), key=lambda kv: -kv[1][0])[:16]:
            print(f"| {name[:90]} | {s:.3f} | {100 * s / gpu:.1f}% | {count:.0f} |")
        if self.gaps_ms:
            print_gaps(self.events, self.gaps_ms)


def profiled_activities(gaps_ms: float) -> list:
    """CUDA kernels; with gaps, the host's calls too."""
    cpu = [torch.profiler.ProfilerActivity.CPU] if gaps_ms else []
    return [torch.profiler.ProfilerActivity.CUDA, *cpu]


def run_pass(engine, args, vocab, last, sched, window, label, after_step=lambda: None):
    engine.reset_prefix_cache()  # a pass computes every prompt, as the first did (the same prompts again would hit)
    if args.workload:
        workload = load_workloads()[args.workload]
        prompts = make_prompts(workload, vocab)
        out_lens = [workload["output_len"]] * len(prompts)
    else:
        prompts, out_lens = mixed_prompts(args.mix, args.num_prompts, vocab, args.mix_seed,
                                          engine.config.max_model_len)
    tag = label.replace(" ", "").replace("/", "of")
    for i, (p, n) in enumerate(zip(prompts, out_lens)):
        engine.add_request(f"m{tag}-{i}", {"prompt_token_ids": p},
                           SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    first, end = (int(x) for x in window.split(":")) if window else (-1, -1)
    stats = collections.defaultdict(lambda: np.zeros(4))  # path -> steps, seconds, tokens, sequences
    prof, window_wall, step = None, 0.0, 0
    first_token = {}  # request id -> seconds from the pass's start (every request arrives then)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        if step == first and torch.cuda.is_available():  # kernel times need a GPU
            sync()
            prof = torch.profiler.profile(activities=profiled_activities(args.gaps))
            prof.__enter__()
            sched["window"] = True  # one profiler at a time: eager decode steps are not profiled apart here
            window_start = time.perf_counter()
        last[:] = [None]
        t = time.perf_counter()
        engine.step()
        now = time.perf_counter() - start
        for request in engine.scheduler.running:  # a first token read back (not only launched) this step
            if request.request_id not in first_token and request.num_output_tokens > request.num_pending_tokens:
                first_token[request.request_id] = now
        after_step()
        seconds = time.perf_counter() - t
        tokens, seqs = last[1] if len(last) > 1 else (0, 0)
        path = last[0] or "none"
        if path == "eager":  # a decode batch past the largest graph, or a step with prefill chunks
            path += " decode" if tokens == seqs else " mixed"
        if path == "decode graph":  # by batch size: a large batch of ragged lengths waits on its longest
            bucket = next((b for b in (16, 64, 256) if seqs <= b), None)
            path += f" <={bucket}" if bucket else " >256"
        stats[path] += (1, seconds, tokens, seqs)
        step += 1
        if (step == end or not engine.has_unfinished_requests()) and prof is not None and sched["window"]:
            sync()
            window_wall, end = time.perf_counter() - window_start, step  # the pass may end inside the window
            prof.__exit__(None, None, None)
            sched["window"] = False
    wall = time.perf_counter() - start
    total_tokens = sum(len(p) for p in prompts) + sum(out_lens)
    print(f"\n## {args.workload or args.mix}, {len(prompts)} requests{', ' + label if label else ''}: {wall:.1f} s, "
          f"{total_tokens / wall:.0f} tok/s, {step} steps, schedule {sched['seconds']:.1f} s")
    ttft = np.array(sorted(first_token.values()))
    print(f"TTFT (all requests at once): mean {ttft.mean():.2f} s, p50 {np.percentile(ttft, 50):.2f}, "
          f"p90 {np.percentile(ttft, 90):.2f}, p99 {np.percentile(ttft, 99):.2f}")
    print("| path | steps | wall s | share | tokens/step | seqs/step | ms/step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path, (n, s, tok, seqs) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        print(f"| {path} | {n:.0f} | {s:.1f} | {100 * s / wall:.0f}% | {tok / n:.0f} | {seqs / n:.0f} "
              f"| {1e3 * s / n:.2f} |")
    if window_wall:
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
                  and not e.key.startswith(PHASE)]  # the phase marks' device-side ranges overlap the kernels
        gpu = sum(e.self_device_time_total for e in events) / 1e6
        print(f"\n### steps {first}-{end}: wall {window_wall:.2f} s, GPU kernels {gpu:.2f} s "
              f"({100 * gpu / window_wall:.0f}% busy)")
        print("| kernel | s | share | calls |\n| --- | --- | --- | --- |")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.kernels]:
            s = e.self_device_time_total / 1e6
            print(f"| {e.key[:90]} | {s:.3f} | {100 * s / gpu:.1f}% | {e.count} |")
        kinds = seconds_by_kind({e.key: e.self_device_time_total / 1e6 for e in events})
        print("by kind, every kernel: " + ", ".join(f"{kind} {s:.3f} s ({100 * s / gpu:.1f}%)"
                                                    for kind, s in kinds.items()))
        if args.gaps:
            print_gaps(prof.events(), args.gaps)


if __name__ == "__main__":
    main()
