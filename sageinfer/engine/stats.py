"""Serving metrics in Prometheus text format, names prefixed `sageinfer:`."""
from __future__ import annotations

import bisect
import threading

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


def engine_snapshot(engine) -> tuple[dict, dict]:
    """The engine's gauges and counters, taken where the engine runs (its thread or process)."""
    pool, kv = engine.kv_manager.pool, engine.kv_manager
    gauges = dict(
        num_requests_running=len(engine.scheduler.running), num_requests_waiting=len(engine.scheduler.waiting),
        kv_cache_usage_perc=pool.usage(), kv_cache_free_blocks=pool.num_free_blocks,
        kv_cache_total_blocks=pool.usable_blocks, prefix_cache_hit_rate=kv.prefix_hit_rate)
    counters = dict(
        prompt_tokens_total=engine.num_prompt_tokens_computed, generation_tokens_total=engine.num_generated_tokens,
        num_preemptions_total=engine.scheduler.num_preemptions, prefix_cache_queries_total=kv.prefix_queries,
        prefix_cache_hits_total=kv.prefix_hits)
    return gauges, counters


class EngineMetrics:
    """Updated by the engine's thread (or from the engine core's messages), read by /metrics; plain
    numbers, so a read needs no lock."""

    def __init__(self):
        self.gauges = {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_perc": 0.0,
                       "kv_cache_free_blocks": 0, "kv_cache_total_blocks": 0, "prefix_cache_hit_rate": 0.0}
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "num_preemptions_total": 0,
                         "prefix_cache_queries_total": 0, "prefix_cache_hits_total": 0}
        self.finished: dict[str, int] = {}
        self.ttft = Histogram("sageinfer:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.tpot = Histogram("sageinfer:time_per_output_token_seconds", "Mean time per output token after the first.",
                              _TPOT_BUCKETS)
        self.e2e = Histogram("sageinfer:e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue = Histogram("sageinfer:request_queue_time_seconds", "Time from arrival to first scheduling.",
                               _LATENCY_BUCKETS)

    def observe_engine(self, engine) -> None:
        self.observe_snapshot(*engine_snapshot(engine))

    def observe_snapshot(self, gauges: dict, counters: dict) -> None:
        self.gauges.update(gauges)
        self.counters.update(counters)

    def observe_finished(self, output, arrival: float, first_token: float | None, now: float,
                         num_prompt_tokens: int) -> None:
        self.e2e.observe(now - arrival)
        if output.queue_time is not None:
            self.queue.observe(output.queue_time)
        generated = max(len(c.token_ids) for c in output.outputs)
        if first_token is not None and generated > 1:
            self.tpot.observe((now - first_token) / (generated - 1))
        for c in output.outputs:
            self.finished[c.finish_reason or "unknown"] = self.finished.get(c.finish_reason or "unknown", 0) + 1

    def render(self) -> str:
        lines = []
        for name, value in self.gauges.items():
            lines += [f"# TYPE sageinfer:{name} gauge", f"sageinfer:{name} {value}"]
        for name, value in self.counters.items():
            lines += [f"# TYPE sageinfer:{name} counter", f"sageinfer:{name} {value}"]
        lines.append("# TYPE sageinfer:request_success_total counter")
        for reason, n in sorted(self.finished.items()):
            lines.append(f'sageinfer:request_success_total{{finished_reason="{reason}"}} {n}')
        for hist in (self.ttft, self.tpot, self.e2e, self.queue):
            lines += hist.render()
        return "\n".join(lines) + "\n"
