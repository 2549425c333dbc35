"""Serving metrics through prometheus_client: names prefixed `sageinfer:` with vLLM's names after it
(a vLLM Grafana dashboard works once the prefix is renamed), a `model_name` label on every series.

The engine's own gauges and counters (running and waiting requests, KV blocks, tokens computed) are
taken where the engine runs and mirrored here as a snapshot; request latencies are observed by the
front end as outputs reach it.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

_GAUGE_HELP = {
    "num_requests_running": "Sequences in the running batch.",
    "num_requests_waiting": "Sequences waiting to be scheduled.",
    "kv_cache_usage_perc": "Share of KV cache blocks in use (1 = full).",
    "kv_cache_free_blocks": "KV cache blocks free.",
    "kv_cache_total_blocks": "KV cache blocks in all.",
    "prefix_cache_hit_rate": "Share of prompt tokens served from the prefix cache.",
    "mfu": "Model FLOPs utilisation: the model FLOPs of the last 5 s of steps over the devices' peak "
           "(dense bf16, datasheet; absent where the platform knows no peak). An estimate from the steps' shapes.",
    "mbu": "Memory bandwidth utilisation: weights and KV cache bytes of the last 5 s of steps over the "
           "devices' peak bandwidth (absent where the platform knows no peak).",
    "tokens_per_second_per_device": "Tokens computed (prompt and generated) per second per device, last 5 s.",
}
_COUNTER_HELP = {
    "prompt_tokens_total": "Prompt tokens computed (prefix-cache hits excluded).",
    "generation_tokens_total": "Tokens generated.",
    "num_preemptions_total": "Sequences preempted (their KV cache freed, to be recomputed).",
    "prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits_total": "Prompt tokens found in the prefix cache.",
    "kv_transfer_loads_total": "Prompts whose KV was loaded from a prefill instance (PD).",
    "kv_transfer_load_failures_total": "Prompt KV loads from a prefill instance that failed (the prompt was "
                                       "computed here instead).",
    "kv_transfer_loaded_tokens_total": "Prompt tokens whose KV was loaded from a prefill instance.",
    "kv_transfer_load_seconds_total": "Seconds from the start of each prompt KV load that succeeded to its end "
                                      "(over kv_transfer_loads_total: the mean load time).",
    "kv_transfer_sends_total": "Prompts whose KV was offered to a decode instance (PD), by the path it took.",
    "kv_transfer_send_seconds_total": "Seconds the offered prompts' blocks stayed held until their KV was read "
                                      "or staged (over kv_transfer_sends_total: the mean).",
}
# Counters with a label beyond model_name: the snapshot's key is "name/label value" (the snapshot's
# values are plain numbers, as the engine core process sends them).
_COUNTER_LABEL = {"kv_transfer_sends_total": "via"}


def engine_snapshot(engine) -> tuple[dict, dict]:
    """The engine's gauges and counters, taken where the engine runs (its thread or process)."""
    pool, kv = engine.kv_manager.pool, engine.kv_manager
    gauges = dict(
        num_requests_running=len(engine.scheduler.running), num_requests_waiting=len(engine.scheduler.waiting),
        kv_cache_usage_perc=pool.usage(), kv_cache_free_blocks=pool.num_free_blocks,
        kv_cache_total_blocks=pool.usable_blocks, prefix_cache_hit_rate=kv.prefix_hit_rate,
        **engine.utilization.gauges())
    counters = dict(
        prompt_tokens_total=engine.num_prompt_tokens_computed, generation_tokens_total=engine.num_generated_tokens,
        num_preemptions_total=engine.scheduler.num_preemptions, prefix_cache_queries_total=kv.prefix_queries,
        prefix_cache_hits_total=kv.prefix_hits, kv_transfer_loads_total=engine.scheduler.num_remote_kv_loads,
        kv_transfer_load_failures_total=engine.scheduler.num_remote_kv_failures,
        kv_transfer_loaded_tokens_total=engine.scheduler.num_remote_kv_tokens,
        kv_transfer_load_seconds_total=engine.scheduler.remote_kv_load_seconds,
        kv_transfer_send_seconds_total=engine.scheduler.remote_kv_send_seconds)
    connector = engine.scheduler.kv_transfer
    if connector is not None:
        counters.update({f"kv_transfer_sends_total/{via}": n for via, n in connector.sends_via.items()})
    return gauges, counters


class _SnapshotCollector:
    """Exposes the latest engine snapshot at each scrape."""

    def __init__(self, metrics: "EngineMetrics"):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        gauges, counters = m.snapshot
        for name, help_text in _GAUGE_HELP.items():
            if name in ("mfu", "mbu") and name not in gauges:
                continue  # no peak known for this device: no made-up share
            family = GaugeMetricFamily(f"sageinfer:{name}", help_text, labels=["model_name"])
            family.add_metric([m.model_name], float(gauges.get(name, 0)))
            yield family
        for name, help_text in _COUNTER_HELP.items():
            label = _COUNTER_LABEL.get(name)
            family = CounterMetricFamily(f"sageinfer:{name}", help_text,
                                         labels=["model_name", label] if label else ["model_name"])
            if label is None:
                family.add_metric([m.model_name], float(counters.get(name, 0)))
            else:
                for key, value in counters.items():
                    if key.startswith(f"{name}/"):
                        family.add_metric([m.model_name, key.split("/", 1)[1]], float(value))
            yield family
        if m.cache_config:
            info = GaugeMetricFamily("sageinfer:cache_config_info", "KV cache configuration (labels).",
                                     labels=["model_name", *m.cache_config])
            info.add_metric([m.model_name, *(str(v) for v in m.cache_config.values())], 1.0)
            yield info


class EngineMetrics:
    """Written by the engine's thread (or from the engine core's messages) and the front end, read
    by /metrics. prometheus_client's metrics are thread-safe."""

    def __init__(self, model_name: str = ""):
        self.model_name = model_name
        self.cache_config: dict = {}  # e.g. block_size, num_gpu_blocks, cache_dtype
        self.snapshot: tuple[dict, dict] = ({}, {})
        self._children: dict = {}
        self.registry = CollectorRegistry()
        self.registry.register(_SnapshotCollector(self))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes ...
        r, labels = self.registry, ["model_name"]
        self._ttft = Histogram("sageinfer:time_to_first_token_seconds", "Time to first token.", labels,
                               buckets=_LATENCY_BUCKETS, registry=r)
        self._tpot = Histogram("sageinfer:time_per_output_token_seconds",
                               "Mean time per output token after the first, per request.", labels,
                               buckets=_TPOT_BUCKETS, registry=r)
        self._itl = Histogram("sageinfer:inter_token_latency_seconds", "Time between a request's output chunks, "
                              "per token.", labels, buckets=_TPOT_BUCKETS, registry=r)
        self._e2e = Histogram("sageinfer:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self._queue = Histogram("sageinfer:request_queue_time_seconds", "Time from arrival to first scheduling.",
                                labels, buckets=_LATENCY_BUCKETS, registry=r)
        self._prompt_tokens = Histogram("sageinfer:request_prompt_tokens", "Prompt tokens per request.", labels,
                                        buckets=_TOKEN_BUCKETS, registry=r)
        self._generation_tokens = Histogram("sageinfer:request_generation_tokens", "Tokens generated per request.",
                                            labels, buckets=_TOKEN_BUCKETS, registry=r)
        self._prefill = Histogram("sageinfer:request_prefill_time_seconds",
                                  "From first scheduling to the first token (seen by the front end).", labels,
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self._decode = Histogram("sageinfer:request_decode_time_seconds", "From the first token to the last.",
                                 labels, buckets=_LATENCY_BUCKETS, registry=r)
        self._inference = Histogram("sageinfer:request_inference_time_seconds",
                                    "From first scheduling to the last token.", labels, buckets=_LATENCY_BUCKETS,
                                    registry=r)
        self._success = Counter("sageinfer:request_success", "Finished requests by reason.",
                                ["model_name", "finished_reason"], registry=r)

    # ---- the engine's side -----------------------------------------------------------------
    def observe_engine(self, engine) -> None:
        self.observe_snapshot(*engine_snapshot(engine))

    def observe_snapshot(self, gauges: dict, counters: dict) -> None:
        self.snapshot = (gauges, counters)

    # ---- the front end's side ----------------------------------------------------------------
    def _labeled(self, metric, *labels: str):
        """The metric's child for this model (and labels), kept: prometheus_client's labels() takes a
        lock and checks its arguments, which the front end would pay per request per step."""
        key = (id(metric), self.model_name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.model_name, *labels)
        return child

    def observe_first_token(self, seconds: float) -> None:
        self._labeled(self._ttft).observe(seconds)

    def observe_tokens(self, seconds: float, num_tokens: int) -> None:
        """num_tokens more output tokens, seconds after the request's previous output."""
        if num_tokens > 0:
            self._labeled(self._itl).observe(seconds / num_tokens)

    def observe_finished(self, output, arrival: float, first_token: float | None, now: float,
                         num_prompt_tokens: int) -> None:
        child = self._labeled
        child(self._e2e).observe(now - arrival)
        if output.queue_time is not None:
            child(self._queue).observe(output.queue_time)
            child(self._inference).observe(max(now - arrival - output.queue_time, 0.0))
            if first_token is not None:
                child(self._prefill).observe(max(first_token - arrival - output.queue_time, 0.0))
        if first_token is not None:
            child(self._decode).observe(now - first_token)
        generated = max(len(c.token_ids) for c in output.outputs)
        if first_token is not None and generated > 1:
            child(self._tpot).observe((now - first_token) / (generated - 1))
        child(self._prompt_tokens).observe(num_prompt_tokens)
        for c in output.outputs:
            child(self._generation_tokens).observe(len(c.token_ids))
            child(self._success, c.finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
