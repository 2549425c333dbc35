"""Messages between the front end and the engine core process (msgspec, over ZMQ).

Outputs cross as differences: each step sends a request's new tokens, logprobs and text, never what
was sent before, so a step's message stays small however long the outputs grow. Text is sent as
(characters of the earlier text that stand, new characters): a stop string found late cuts back text
that had already gone out.
"""
from __future__ import annotations

import msgspec

from sageinfer.engine.growing_list import GrowingListPrefix
from sageinfer.outputs import CompletionOutput, Logprob, RequestOutput
from sageinfer.sampling_params import SamplingParams


# ---- front -> core --------------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    prompt: str | None
    params: SamplingParams
    priority: int = 0


class AbortRequest(msgspec.Struct, tag=True):
    request_id: str


class Shutdown(msgspec.Struct, tag=True):
    pass


Command = AddRequest | AbortRequest | Shutdown


# ---- core -> front --------------------------------------------------------------------------
class Ready(msgspec.Struct, tag=True):
    pid: int
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    num_kv_blocks: int
    block_size: int
    kv_transfer: dict | None = None  # its connector's description (transport.remote_kv), for PD proxies


class CompletionDelta(msgspec.Struct, array_like=True):
    index: int
    text_keep: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: int | str | None


class OutputDelta(msgspec.Struct, array_like=True):
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    num_cached_tokens: int
    queue_time: float | None
    error: str | None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # sent once, when complete
    kv_transfer_params: dict | None = None  # prefill/decode separation: set on a finished prefill
    bad_request: bool = False  # RequestOutput.bad_request


class StepOutputs(msgspec.Struct, tag=True):
    outputs: list[OutputDelta]
    gauges: dict[str, float]
    counters: dict[str, float]


class RequestError(msgspec.Struct, tag=True):
    """A request that could not be added (bad_request: the request's fault, HTTP 400)."""
    request_id: str
    message: str
    bad_request: bool


class Dead(msgspec.Struct, tag=True):
    reason: str


CoreMessage = Ready | StepOutputs | RequestError | Dead


class DeltaEncoder:
    """Core side: what of each request's outputs has been sent. token_deltas: the outputs given
    already hold only their new tokens and logprobs (an engine whose output_kind is "delta")."""

    def __init__(self, token_deltas: bool = False):
        self._sent: dict[str, list[tuple[int, int]]] = {}  # request id -> per sample (tokens, characters)
        self._prompt_logprobs_sent: set[str] = set()
        self.token_deltas = token_deltas

    def encode(self, output: RequestOutput) -> OutputDelta:
        sent = self._sent.get(output.request_id) or [(0, 0)] * len(output.outputs)
        completions, now_sent = [], []
        for c, (num_tokens, num_chars) in zip(output.outputs, sent):
            keep = min(num_chars, len(c.text))
            tokens, logprobs = (c.token_ids, c.logprobs) if self.token_deltas else (
                c.token_ids[num_tokens:], c.logprobs[num_tokens:] if c.logprobs is not None else None)
            completions.append(CompletionDelta(c.index, keep, c.text[keep:], tokens, logprobs, c.cumulative_logprob,
                                               c.finish_reason, c.stop_reason))
            now_sent.append((len(c.token_ids), len(c.text)))
        prompt_logprobs = None
        if output.prompt_logprobs is not None and output.request_id not in self._prompt_logprobs_sent:
            prompt_logprobs = output.prompt_logprobs
            self._prompt_logprobs_sent.add(output.request_id)
        if output.finished:
            self.forget(output.request_id)
        else:
            self._sent[output.request_id] = now_sent
        return OutputDelta(output.request_id, completions, output.finished, output.num_cached_tokens,
                           output.queue_time, output.error, prompt_logprobs, output.kv_transfer_params,
                           output.bad_request)

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)
        self._prompt_logprobs_sent.discard(request_id)


class OutputAssembler:
    """Front side: the cumulative RequestOutput of each request, rebuilt from its differences. Tokens
    and logprobs are appended in place; an output handed out while its request runs holds
    fixed-length views of them (engine.growing_list), so it stays as it was without a copy per step.
    The finished output holds plain lists."""

    def __init__(self):
        # request id -> [prompt, prompt token ids, samples so far (their lists appended in place), prompt logprobs]
        self._requests: dict[str, list] = {}

    def start(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], n: int) -> None:
        self._requests[request_id] = [prompt, prompt_token_ids, [CompletionOutput(i, "", []) for i in range(n)], None]

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def apply(self, delta: OutputDelta) -> RequestOutput | None:
        entry = self._requests.get(delta.request_id)
        if entry is None:  # aborted here while the core was still producing it
            return None
        if delta.prompt_logprobs is not None:
            entry[3] = delta.prompt_logprobs
        prompt, prompt_ids, completions, prompt_logprobs = entry
        for d in delta.completions:
            c = completions[d.index]
            c.text = c.text[:d.text_keep] + d.text
            c.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                if c.logprobs is None:
                    c.logprobs = []
                c.logprobs.extend(d.logprobs)
            c.cumulative_logprob, c.finish_reason, c.stop_reason = d.cumulative_logprob, d.finish_reason, d.stop_reason
        if delta.finished:
            self.forget(delta.request_id)
        done = delta.finished
        return RequestOutput(delta.request_id, prompt, prompt_ids,
                             [CompletionOutput(c.index, c.text, _as_output(c.token_ids, done), c.cumulative_logprob,
                                               None if c.logprobs is None else _as_output(c.logprobs, done),
                                               c.finish_reason, c.stop_reason) for c in completions],
                             delta.finished, delta.num_cached_tokens, delta.queue_time, delta.error, prompt_logprobs,
                             delta.kv_transfer_params, delta.bad_request)


def _as_output(items: list, finished: bool):
    """A sample's list as an output holds it: a copy once the request has finished (the caller may
    keep and change it), a view of its current length while it runs."""
    return list(items) if finished else GrowingListPrefix(items, len(items))
