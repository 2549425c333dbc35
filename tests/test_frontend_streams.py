"""A request's output stream in the front end: outputs are cumulative, so a consumer that fell behind
the engine's steps gets the latest of those waiting (one chunk for all of them), and an error still
comes after the output before it."""
import asyncio
import types

import pytest

from sageinfer.engine.frontend import EngineFront, RequestFailed, RequestStream, _Stream
from sageinfer.gateway.api_server import OpenAIServer
from sageinfer.outputs import CompletionOutput, RequestOutput
from sageinfer.sampling_params import SamplingParams


def _output(num_tokens: int, finished: bool = False) -> RequestOutput:
    tokens = list(range(num_tokens))
    return RequestOutput("r", None, [1, 2], [CompletionOutput(0, "x" * num_tokens, tokens)], finished)


def _stream(items: list) -> tuple[RequestStream, list]:
    queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    aborted = []
    front = types.SimpleNamespace(abort=aborted.append)
    return RequestStream(front, "r", _Stream(asyncio.get_running_loop(), queue, 0.0, 2, 1)), aborted


def test_waiting_outputs_are_yielded_as_the_latest_of_them():
    async def main():
        stream, aborted = _stream([_output(1), _output(2), _output(3)])
        seen = []
        async for out in stream:
            seen.append(len(out.outputs[0].token_ids))
            if len(seen) == 1:  # the engine goes on: two more steps, the last one finishing
                stream._stream.queue.put_nowait(_output(4))
                stream._stream.queue.put_nowait(_output(5, finished=True))
        return seen, aborted
    seen, aborted = asyncio.run(main())
    assert seen == [3, 5] and aborted == []  # finished: nothing to abort


def test_an_error_comes_after_the_output_before_it():
    async def main():
        stream, aborted = _stream([_output(1), _output(2), RequestFailed("the request failed: boom")])
        seen = []
        with pytest.raises(RequestFailed, match="boom"):
            async for out in stream:
                seen.append(len(out.outputs[0].token_ids))
        return seen
    assert asyncio.run(main()) == [2]


def test_a_consumer_that_leaves_aborts_the_request():
    async def main():
        stream, aborted = _stream([_output(1), _output(2)])
        async for _ in stream:
            break
        await asyncio.sleep(0)  # the generator's close runs its finally
        return aborted
    assert asyncio.run(main()) == ["r"]


def test_a_steps_outputs_wake_the_event_loop_once_and_reach_each_stream_in_order():
    from sageinfer.engine.frontend import EngineFront
    from sageinfer.sampling_params import SamplingParams

    class Front(EngineFront):
        def _send(self, command):
            pass

    async def main():
        loop = asyncio.get_running_loop()
        wake_ups = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (wake_ups.append(args[0]), original(*args))[1]
        front = Front(inputs=None, max_num_seqs=8, max_waiting_requests=8)
        streams = [front.add([1, 2], SamplingParams(max_tokens=2), f"r{i}") for i in range(3)]

        def output(i, n, finished=False):
            return RequestOutput(f"r{i}", None, [1, 2], [CompletionOutput(0, "x" * n, list(range(n)))], finished)
        front._deliver([output(i, 1) for i in range(3)])  # one step's outputs
        front._deliver([output(i, 2, finished=True) for i in range(3)])
        assert len(wake_ups) == 2
        return [[len(o.outputs[0].token_ids) async for o in s] for s in streams]
    assert asyncio.run(main()) == [[2], [2], [2]]  # both steps waited: the latest of each stream


class _HandOffFails(EngineFront):
    """A transport that cannot hand over the requests whose id ends in -1 (as the engine core's wire encoding
    refuses a lone surrogate)."""

    def __init__(self):
        super().__init__(inputs=None, max_num_seqs=8, max_waiting_requests=8)
        self.sent = []

    def _send(self, command):
        if command[0] == "add" and command[1].endswith("-1"):
            raise ValueError("the request holds text that is not valid Unicode")
        self.sent.append(command[:2])


def test_a_request_the_engine_never_took_is_not_left_open():
    """Left open, it would count against admission until the server answered 503 to everyone, and hold a
    shutdown for its whole grace period."""
    async def main():
        front = _HandOffFails()
        with pytest.raises(ValueError, match="not valid Unicode"):
            front.add([1, 2], SamplingParams(), "r-1")
        assert front.num_unfinished == 0 and front.sent == []
        # two prompts, the second not handed over: the first, already with the engine, is aborted
        server = types.SimpleNamespace(inputs=types.SimpleNamespace(check_sampling_params=lambda params: None),
                                       engine=front)
        prompts = [{"prompt_token_ids": [1], "prompt": "a"}, {"prompt_token_ids": [2], "prompt": "b"}]
        with pytest.raises(ValueError, match="not valid Unicode"):
            OpenAIServer.start(server, prompts, SamplingParams(), "cmpl")
        return front
    front = asyncio.run(main())
    assert front.num_unfinished == 0 and front.sent == [("add", "cmpl-0"), ("abort", "cmpl-0")]
