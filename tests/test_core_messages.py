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
