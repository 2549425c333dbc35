"""Outputs cross the process boundary as differences and come back whole."""
import msgspec

from sageinfer import LLM, SamplingParams
from sageinfer.engine import core_messages as msg


def test_outputs_rebuilt_from_differences_equal_the_engines(llama_dir):
    """An engine that outputs whole outputs, then one that outputs only new tokens (as the engine
    core process runs): rebuilt on the front side, both give what the first engine output, step by
    step."""
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=256, show_progress=False)
    engine = llm.engine
    full = llm.generate("The capital of", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    requests = {
        "stop": ("The capital of", SamplingParams(temperature=0, max_tokens=30, stop=[full[5:9]], ignore_eos=True)),
        "logprobs-n": ("Hello", SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=25, logprobs=3,
                                               ignore_eos=True)),
        "chinese": ("你好，世界", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)),
        "prompt-logprobs": ("A longer prompt, whose logprobs come back once", SamplingParams(
            temperature=0, max_tokens=5, prompt_logprobs=2, ignore_eos=True)),
    }
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(msg.CoreMessage)
    runs = []
    for kind in ("cumulative", "delta"):
        engine.output_kind = kind
        deltas, assembler = msg.DeltaEncoder(token_deltas=kind == "delta"), msg.OutputAssembler()
        for request_id, (prompt, params) in requests.items():
            engine.add_request(request_id, prompt, params)
            parent = engine.requests[request_id]
            assembler.start(request_id, prompt, parent.prompt_token_ids, params.n)
        finished, rebuilt_all = set(), []
        while engine.has_unfinished_requests():
            originals = engine.step()
            wire = decoder.decode(encoder.encode(msg.StepOutputs([deltas.encode(o) for o in originals], {}, {})))
            for original, delta in zip(originals, wire.outputs):
                rebuilt = assembler.apply(delta)
                if kind == "cumulative":
                    assert rebuilt == original
                rebuilt_all.append((rebuilt.request_id, rebuilt.outputs, rebuilt.finished, rebuilt.prompt_logprobs))
                if rebuilt.finished:
                    finished.add(rebuilt.request_id)
        assert finished == set(requests)
        # nothing kept for finished requests
        assert not deltas._sent and not deltas._prompt_logprobs_sent and not assembler._requests
        runs.append(rebuilt_all)
    assert runs[1] == runs[0]


def test_an_offline_engine_outputs_finished_requests_only(llama_dir):
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=256, show_progress=False)
    assert llm.engine.output_kind == "final"
    llm.engine.add_request("a", {"prompt_token_ids": [3, 4, 5]}, SamplingParams(max_tokens=6, ignore_eos=True))
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += llm.engine.step()
    assert len(outputs) == 1 and outputs[0].finished and len(outputs[0].outputs[0].token_ids) == 6


def _delta(request_id, keep, text, tokens, finished=False, logprobs=None):
    return msg.OutputDelta(request_id, [msg.CompletionDelta(0, keep, text, tokens, logprobs, None,
                                                            "length" if finished else None, None)],
                           finished, 0, None, None)


def test_outputs_handed_out_stay_as_they_were_without_copies():
    """While a request runs, its outputs hold fixed-length views of lists that only grow (no copy per
    step); later steps leave them unchanged, and the finished output holds plain lists."""
    assembler = msg.OutputAssembler()
    assembler.start("r", "p", [1, 2], 1)
    lp = {7: msg.Logprob(-0.5)}
    first = assembler.apply(_delta("r", 0, "ab", [7], logprobs=[lp]))
    second = assembler.apply(_delta("r", 1, "xy", [8, 9], logprobs=[lp, lp]))  # "b" cut back
    c1, c2 = first.outputs[0], second.outputs[0]
    assert (c1.text, c1.token_ids, len(c1.logprobs)) == ("ab", [7], 1)
    assert (c2.text, list(c2.token_ids), len(c2.logprobs)) == ("axy", [7, 8, 9], 3)
    assert c2.token_ids._items is c1.token_ids._items  # one list, not a copy per step
    assert c2.token_ids[1:] == [8, 9] and c2.token_ids[-1] == 9 and [7, 8, 9] == c2.token_ids
    assert c2.token_ids != [7, 8] and c2.token_ids != "abc"
    final = assembler.apply(_delta("r", 3, "z", [10], finished=True, logprobs=[lp]))
    c3 = final.outputs[0]
    assert type(c3.token_ids) is list and type(c3.logprobs) is list
    assert (c3.text, c3.token_ids, len(c3.logprobs), c3.finish_reason) == ("axyz", [7, 8, 9, 10], 4, "length")
    assert list(c1.token_ids) == [7] and len(c2.token_ids) == 3  # still as they were
    assert not assembler._requests


def test_growing_list_prefix_reads_like_a_list():
    from sageinfer.engine.growing_list import GrowingListPrefix
    items = [1, 2, 3]
    view = GrowingListPrefix(items, 2)
    items.append(4)
    assert len(view) == 2 and list(view) == [1, 2] and view[::-1] == [2, 1] and view[5:] == []
    assert repr(view) == "[1, 2]" and 2 in view and view.index(2) == 1
    for bad in (2, -3):
        try:
            view[bad]
        except IndexError:
            continue
        raise AssertionError(f"view[{bad}] should raise IndexError")
