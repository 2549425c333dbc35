"""`sageinfer` command line: generate (and, as they land, serve and bench)."""
from __future__ import annotations

import argparse
import sys

from sageinfer.frozen_heap import freeze_start_up_heap
from sageinfer.gateway.engine_args import add_engine_args, engine_kwargs


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _generate(args: argparse.Namespace) -> int:
    from sageinfer import LLM, SamplingParams
    params = SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.sampling_seed, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
        stop=args.stop, ignore_eos=args.ignore_eos)
    kwargs = engine_kwargs(args)
    if not args.model:
        print(f"note: no --model given; using the tiny random model at {kwargs['model']} "
              "(random weights: the text is gibberish)", file=sys.stderr)
    llm = LLM(**kwargs)
    prompts = args.prompt or ["Hello, my name is"]
    for output in llm.generate(prompts, params, use_tqdm=len(prompts) > 1):
        for completion in output.outputs:
            print(f"--- prompt: {output.prompt!r} (sample {completion.index}, finish: {completion.finish_reason})")
            print(output.prompt + completion.text)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json
    from sageinfer import LLM
    from sageinfer.bench.runs import run_latency, run_throughput
    from sageinfer.bench.workloads import load_workloads
    from sageinfer.bench.mixed import MIXES
    workloads = load_workloads(args.workloads_file)
    for mix in MIXES:  # mixed-length throughput workloads: a thousand requests unless --num-prompts says
        workloads.setdefault(mix, {"kind": "throughput", "mix": mix, "num_prompts": 1000, "seed": 0})
    if args.workload not in workloads:
        raise ValueError(f"--workload must be one of {sorted(workloads)}, got {args.workload!r}")
    workload = dict(workloads[args.workload])
    if args.bench_kind != workload["kind"]:
        raise ValueError(f"{args.workload} is a {workload['kind']} workload: use `sageinfer bench {workload['kind']}`")
    for key in ("num_prompts", "input_len", "output_len"):
        if getattr(args, key) is not None:
            workload[key] = getattr(args, key)
    llm = LLM(**engine_kwargs(args))
    result = run_throughput(llm, workload) if args.bench_kind == "throughput" else run_latency(llm, workload)
    print(json.dumps({"workload": args.workload, **result}, indent=1))
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump({"workload": workload, "result": result}, f, indent=1)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging
    import os

    import uvicorn

    from sageinfer.config import EngineConfig
    from sageinfer.gateway.api_server import OpenAIServer, build_app
    from sageinfer.gateway.http_server import EngineServer
    from sageinfer.gateway.uvicorn_server import listening_socket

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model_positional:
        args.model = args.model_positional
    # The key from the environment keeps it out of the process list.
    api_key = args.api_key or os.environ.get("SAGEINFER_API_KEY") or None
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    for path in filter(None, (args.ssl_keyfile, args.ssl_certfile)):
        if not os.path.isfile(path):
            raise ValueError(f"no such file {path!r}")
    if args.max_request_body_bytes < 1024:
        raise ValueError(f"--max-request-body-bytes must be >= 1024, got {args.max_request_body_bytes}")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)")
    tool_call_parser = args.tool_call_parser if args.enable_auto_tool_choice else None
    chat_template = None  # read before the engine's load, so that a wrong path fails at once
    if args.chat_template:
        if not os.path.isfile(args.chat_template):
            raise ValueError(f"--chat-template: no such file {args.chat_template!r}")
        with open(args.chat_template) as f:
            chat_template = f.read()
    kwargs = engine_kwargs(args)
    attention_backend = kwargs.pop("attention_backend")
    config = EngineConfig(**kwargs)
    listener = listening_socket(args.host, args.port)  # before the engine's load, which takes a while
    if args.engine_in_thread:
        from sageinfer.engine.async_engine import AsyncEngine
        from sageinfer.engine.engine import LLMEngine
        engine = LLMEngine(config, attention_backend=attention_backend)
        front = AsyncEngine(engine, max_waiting_requests=args.max_waiting_requests)
        num_blocks, block_size = engine.num_kv_blocks, engine.config.block_size
        kv_transfer = engine.kv_transfer_description()
    else:
        from sageinfer.engine.core_client import EngineCoreClient
        try:
            front = EngineCoreClient(config, attention_backend, max_waiting_requests=args.max_waiting_requests)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        num_blocks, block_size = front.ready.num_kv_blocks, front.ready.block_size
        kv_transfer = front.ready.kv_transfer
        print(f"engine core: process {front.ready.pid}", flush=True)
    front.metrics.cache_config = {"block_size": block_size, "num_gpu_blocks": num_blocks - 1,
                                  "cache_dtype": config.kv_cache_dtype,
                                  "enable_prefix_caching": config.enable_prefix_caching}
    print(f"KV cache: {num_blocks - 1} blocks of {block_size} tokens; "
          f"max_model_len {front.inputs.max_model_len}", flush=True)
    name = args.served_model_name or os.path.basename(os.path.normpath(kwargs["model"]))
    app = build_app(OpenAIServer(front, name, chat_template, tool_call_parser, args.reasoning_parser,
                                 args.enable_prompt_tokens_details), api_key=api_key,
                    public_metrics=args.public_metrics, max_request_body_bytes=args.max_request_body_bytes,
                    kv_events=None if config.kv_events_config is None else {**config.kv_events_config,
                                                                            "block_size": block_size},
                    kv_transfer=kv_transfer)
    if args.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                    ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
    server = EngineServer(uvicorn_config, front,
                          grace_seconds=args.shutdown_grace_seconds)
    front.on_dead = server.stop_on_dead_engine
    if front.error is not None:  # died before the callback was set
        server.stop_on_dead_engine(front.error)
    scheme = "https" if args.ssl_certfile else "http"
    print(f"serving {name!r} on {scheme}://{args.host}:{args.port} (OpenAI API under /v1)", flush=True)
    freeze_start_up_heap()  # the server's start-up objects kept out of the collector's full passes
    server.run(sockets=[listener])
    front.shutdown()
    return server.exit_code


def _local_prefill_option(parser) -> None:
    parser.add_argument("--max-local-prefill-tokens", type=int, default=0, metavar="N",
                        help="PD pools: prompts of at most N tokens skip the prefill instances, the decode instance "
                             "computes them itself (0: every prompt through a prefill instance)")


def _router(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from sageinfer.gateway.uvicorn_server import CleanExitServer, listening_socket
    from sageinfer.router.app import build_router_app
    from sageinfer.router.backends import BackendPool, instance_url_error
    from sageinfer.router.policies import Policy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.prefill) != bool(args.decode) or not (args.backend or args.prefill):
        raise ValueError("give --backend URLs, or PD pools: --prefill URLs and --decode URLs")
    for url in args.backend + args.prefill + args.decode:
        why = instance_url_error(url)
        if why is not None:
            raise ValueError(f"--backend, --prefill and --decode take instance URLs: {why}")
    if args.prefill:  # PD pools: the PD flow across them, each side by load
        from sageinfer.router.pd_proxy import build_pd_proxy_app
        if args.backend:
            raise ValueError("--backend cannot be mixed with PD pools (--prefill / --decode)")
        app = build_pd_proxy_app(BackendPool(args.prefill, check_interval=args.health_check_interval),
                                 BackendPool(args.decode, check_interval=args.health_check_interval),
                                 max_local_prefill_tokens=args.max_local_prefill_tokens)
        print(f"routing PD over {len(args.prefill)} prefill and {len(args.decode)} decode instance(s) on "
              f"http://{args.host}:{args.port}", flush=True)
    else:
        app = build_router_app(BackendPool(args.backend, check_interval=args.health_check_interval),
                               Policy(args.policy, kv_events=args.kv_events, tokenizer=args.tokenizer))
        print(f"routing ({args.policy}) over {len(args.backend)} instance(s) on http://{args.host}:{args.port}",
              flush=True)
    listener = listening_socket(args.host, args.port)
    freeze_start_up_heap()
    CleanExitServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")).run(sockets=[listener])
    return 0


def _launch(args: argparse.Namespace) -> int:
    from sageinfer.router.launcher import run
    return run(args)


def port_number(text: str) -> int:
    """--port: a TCP port (0: any free one), refused with argparse's error line otherwise."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0-65535, got {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    from sageinfer import __version__
    parser = argparse.ArgumentParser(prog="sageinfer", description="sageInfer LLM inference engine")
    parser.add_argument("--version", action="version", version=f"sageinfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions offline and print them")
    gen.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    add_engine_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=_generate)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model_positional", nargs="?", default=None, metavar="MODEL")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port_number, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require this key on every route but /health (default: $SAGEINFER_API_KEY)")
    serve.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
    serve.add_argument("--max-request-body-bytes", type=int, default=32 * 2**20,
                       help="larger request bodies get HTTP 413")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--chat-template", default=None, help="a Jinja chat template file")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='answer tool_choice "auto" by parsing tool calls out of the output (needs --tool-call-parser)')
    serve.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                       help="the model's tool call format: hermes (Qwen 2.5 / 3, Hermes), "
                            "llama3_json (Llama 3.1 / 3.2 / 3.3)")
    serve.add_argument("--enable-prompt-tokens-details", action="store_true",
                       help="report the prompt tokens served from the prefix cache "
                            "(usage.prompt_tokens_details.cached_tokens)")
    serve.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek_r1"],
                       help="send a reasoning model's <think> block as the chat message's reasoning "
                            "(qwen3: Qwen3, QwQ; deepseek_r1: DeepSeek-R1 and its distillations)")
    serve.add_argument("--max-waiting-requests", type=int, default=1024,
                       help="requests beyond max_num_seqs + this get HTTP 503")
    serve.add_argument("--shutdown-grace-seconds", type=float, default=30.0)
    serve.add_argument("--allowed-origins", nargs="*", default=None,
                       help="origins a browser may call from (CORS), e.g. https://app.example or *")
    serve.add_argument("--ssl-keyfile", default=None, help="TLS private key (with --ssl-certfile)")
    serve.add_argument("--ssl-certfile", default=None, help="TLS certificate chain (with --ssl-keyfile)")
    serve.add_argument("--uvicorn-log-level", default="warning",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
    serve.add_argument("--disable-log-requests", action="store_true",
                       help="accepted for vLLM's launch scripts: this server does not log requests")
    serve.add_argument("--engine-in-thread", action="store_true",
                       help="run the engine in a thread of the server process instead of its own process")
    add_engine_args(serve)
    serve.set_defaults(func=_serve)
    router = sub.add_parser("router", help="one OpenAI-compatible front door over several instances")
    router.add_argument("--prefill", nargs="+", action="extend", default=[], metavar="URL",
                        help="PD pools: prefill instances (kv_producer); with --decode, instead of --backend")
    router.add_argument("--decode", nargs="+", action="extend", default=[], metavar="URL",
                        help="PD pools: decode instances (kv_consumer)")
    router.add_argument("--backend", action="append", default=[], metavar="URL",
                        help="an instance's base URL, e.g. http://127.0.0.1:8001 (repeatable)")
    router.add_argument("--policy", default="least_load", choices=["round_robin", "least_load", "session", "prefix"],
                        help="session: a request's x-session-id header or `user` field keeps it on one instance; "
                             "prefix: where the longest prefix of the prompt was sent before, unless that "
                             "instance is much busier")
    router.add_argument("--kv-events", action="store_true",
                        help="prefix policy: follow the KV events of instances started with --kv-events-config and "
                             "route by the blocks they hold (without: by where the router sent each text before)")
    router.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="the instances' tokenizer (their model directory), to measure text prompts and chats "
                             "against their KV events (implies --kv-events; token-id prompts need none)")
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=port_number, default=8000)
    router.add_argument("--health-check-interval", type=float, default=1.0, help="seconds between checks")
    _local_prefill_option(router)
    router.set_defaults(func=_router)
    proxy = sub.add_parser("proxy", help="prefill/decode separation: prefill on some instances, decode on others")
    proxy.add_argument("--prefill", nargs="+", action="extend", required=True, metavar="URL",
                       help="prefill instances (served with --kv-transfer-config ... kv_producer)")
    proxy.add_argument("--decode", nargs="+", action="extend", required=True, metavar="URL",
                       help="decode instances (served with --kv-transfer-config ... kv_consumer)")
    proxy.add_argument("--host", default="127.0.0.1")
    proxy.add_argument("--port", type=port_number, default=8000)
    proxy.add_argument("--health-check-interval", type=float, default=1.0, help="seconds between checks")
    _local_prefill_option(proxy)
    proxy.set_defaults(func=_router, backend=[], policy="least_load", tokenizer=None, kv_events=False)  # the router over PD pools
    launch = sub.add_parser("launch", help="several instances of one model on this host, and the router in front")
    launch.add_argument("model")
    launch.add_argument("--instances", type=int, default=2)
    launch.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, help="devices per instance")
    launch.add_argument("--policy", default="prefix", choices=["round_robin", "least_load", "session", "prefix"])
    launch.add_argument("--host", default="127.0.0.1")
    launch.add_argument("--port", type=port_number, default=8000,
                        help="the router's; instances take the ports after it")
    launch.add_argument("--first-instance-port", type=port_number, default=None)
    launch.add_argument("--log-dir", default=None, help="where each instance's log goes (default: a new temp dir)")
    launch.add_argument("--ray", action="store_true",
                        help="start the instances as Ray actors on the hosts of the Ray cluster RAY_ADDRESS names "
                             "(or a local head), each with its -tp devices; the router stays on this host")
    launch.add_argument("--pd", default=None, metavar="P:D",
                        help="prefill/decode separation: P prefill and D decode instances behind the PD proxy")
    launch.add_argument("--kv-connector", default=None,
                        choices=["DeviceIpcConnector", "SharedMemoryConnector", "NixlConnector",
                                 "TorchDistributedConnector"],
                        help="how KV moves between the --pd instances (default: DeviceIpcConnector, device to "
                             "device on this host; TorchDistributedConnector with --ray, whose hosts may differ)")
    _local_prefill_option(launch)
    launch.set_defaults(func=_launch, serve_args=[])  # flags after `--` go to every instance's serve
    bench = sub.add_parser("bench", help="benchmarks: offline throughput / latency, or a serving benchmark")
    bench_sub = bench.add_subparsers(dest="bench_kind", required=True)
    from sageinfer.bench.serve import add_serve_bench_args, main_from_args
    serve_bench = bench_sub.add_parser("serve", help="load an OpenAI-compatible server and measure it")
    add_serve_bench_args(serve_bench)
    serve_bench.set_defaults(func=main_from_args)
    for kind, default in (("throughput", "T1-prefill-heavy"), ("latency", "L1-single-stream")):
        p = bench_sub.add_parser(kind)
        p.add_argument("--workload", default=default)
        p.add_argument("--workloads-file", default=None, help="default: the standard workloads shipped in sageinfer/bench/standard")
        p.add_argument("--num-prompts", type=int, default=None)
        p.add_argument("--input-len", type=int, default=None)
        p.add_argument("--output-len", type=int, default=None)
        p.add_argument("--result-file", default=None)
        add_engine_args(p)
        p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on = []  # `sageinfer launch ... -- FLAGS`: FLAGS are every instance's, not launch's
    if argv[:1] == ["launch"] and "--" in argv:
        cut = argv.index("--")
        argv, passed_on = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if passed_on:
        args.serve_args = passed_on
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
