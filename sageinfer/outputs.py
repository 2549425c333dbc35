"""What generate() returns: vLLM-shaped request and completion outputs."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    # A list; in an output handed out while its request runs behind the engine core process, a
    # read-only sequence of the same values (engine/growing_list.py: no copy per step).
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to first scheduling
    error: str | None = None  # why the request failed (finish_reason "error"); the engine went on
    # With prompt_logprobs: per prompt token (None for the first) its logprob given those before it
    # and the top k; set once the whole prompt is computed.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Prefill/decode separation: on a prefill instance, what a decode instance needs to load this
    # request's prompt KV (set on the finished output).
    kv_transfer_params: dict | None = None
    # With error: the request asked for what cannot be met (say, a grammar that no token its other limits leave
    # can follow): a server answers 400, not 500.
    bad_request: bool = False
