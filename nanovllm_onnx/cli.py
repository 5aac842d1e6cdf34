"""`nano-vllm-onnx`: convert, generate, serve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from nanovllm_onnx.config import KV_CACHE_DTYPES, WEIGHT_FORMATS, EngineConfig
from nanovllm_onnx.convert.source import ModelLoadError
from nanovllm_onnx.kernels import KernelBuildError
from nanovllm_onnx.server import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_WAITING

logger = logging.getLogger(__name__)
WEIGHTS_HELP = ("auto (default): a GGUF's quantized tensors run their own blocks, other "
                "weights q8_0 (the default model: fp32, see README); q8_0: 8-bit blocks of 32; "
                "int8: per-channel weights, dynamically quantized activations (ONNX Runtime "
                "repacks them at every start: a private copy per process, ~10 s at 3B, where "
                "q8_0 maps the file in ~1 s); int4: 4-bit blocks of 32 (embedding and LM head "
                "8-bit); int4_all: int4 with a 4-bit embedding and LM head too (faster decode, "
                "lower quality); fp32")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF checkpoint folder, GGUF file or converted folder "
                             "(default: SmolLM2-135M-Instruct)")
    defaults = EngineConfig()
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default=None,
                        help="weight format when converting the model: " + WEIGHTS_HELP)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int,
                        default=defaults.max_num_batched_tokens)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=defaults.kv_cache_memory_gib,
                        help="KV cache budget in GiB")
    parser.add_argument("--kv-cache-dtype", default=defaults.kv_cache_dtype,
                        choices=["auto", *KV_CACHE_DTYPES],
                        help="KV cache precision (auto: fp16; fp32 for an Optimum export). int8: "
                        "symmetric codes with a scale per position and KV head, 53%% of fp16's "
                        "memory and reads at head size 64 (not for an Optimum export)")
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                        action="store_false")
    parser.add_argument("--intra-op-num-threads", type=int,
                        default=defaults.intra_op_num_threads)
    parser.add_argument("--inter-op-num-threads", type=int,
                        default=defaults.inter_op_num_threads)
    parser.add_argument("--intra-op-spinning", action=argparse.BooleanOptionalAction,
                        default=None, help="ONNX Runtime's intra-op threads spin while they "
                        "wait for work (default: on; off for serve)")
    parser.add_argument("--graph-optimization-level", default=defaults.graph_optimization_level,
                        choices=["disable", "basic", "extended", "all"])
    parser.add_argument("--execution-mode", default=defaults.execution_mode,
                        choices=["sequential", "parallel"])
    parser.add_argument("--no-mem-pattern", dest="enable_mem_pattern", action="store_false")
    parser.add_argument("--no-cpu-mem-arena", dest="enable_cpu_mem_arena", action="store_false")
    parser.add_argument("--speculative-config", type=_json_object, default=None,
                        help='speculative decoding, as JSON: \'{"method": "ngram", '
                             '"num_speculative_tokens": 4}\' or \'{"model": DRAFT, '
                             '"num_speculative_tokens": 4}\' (see README)')
    parser.add_argument("--batch-invariant", action="store_true",
                        help="each token's result independent of what shares its step "
                             "(on AMX CPUs big decode steps are then slower; see README)")
    parser.add_argument("--providers", default="cpu",
                        help="comma-separated execution providers in order, e.g. cuda,cpu "
                             "(a missing one is skipped with a warning; CPU is always last)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def engine_config(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in fields(EngineConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values["providers"] = [p.strip() for p in args.providers.split(",") if p.strip()]
    return EngineConfig(**values)


def cmd_convert(args: argparse.Namespace) -> None:
    from nanovllm_onnx.convert.converter import convert

    cfg = convert(Path(args.source), Path(args.out), args.weights)
    print(f"converted {args.source} ({cfg.architecture}, {cfg.num_layers} layers) to {args.out}")


def cmd_generate(args: argparse.Namespace) -> None:
    from nanovllm_onnx import LLM, SamplingParams

    llm = LLM(**vars(engine_config(args)))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed)
    has_template = llm.llm_engine.model_config.chat_template is not None
    if has_template and not args.no_chat:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        out = llm.chat(messages, params, use_tqdm=False)[0]
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    print(out.outputs[0].text)


def cmd_serve(args: argparse.Namespace) -> None:
    from nanovllm_onnx.default_model import DEFAULT_MODEL_NAME
    from nanovllm_onnx.server.api_server import serve
    from nanovllm_onnx.server.async_engine import EngineDeadError

    # The serve subcommand's own --log-level (default info: one line per request).
    logging.getLogger().setLevel(args.serve_log_level.upper())
    args.model = args.model_tag or args.model
    if args.intra_op_spinning is None:  # the event loop and the clients need cores too
        args.intra_op_spinning = False
    name = args.served_model_name or (Path(args.model).name if args.model else DEFAULT_MODEL_NAME)
    if args.ray:
        serve_on_ray(args, name)
        return
    try:
        serve(engine_config(args), name, host=args.host, port=args.port, api_key=args.api_key,
              max_waiting=args.max_waiting, max_request_bytes=args.max_request_bytes,
              log_level=args.serve_log_level, tool_call_parser=args.tool_call_parser,
              log_stats_interval=None if args.disable_log_stats else args.log_stats_interval)
    except EngineDeadError as e:  # exit non-zero: the supervisor restarts the server
        sys.exit(f"error: {e}")


def serve_on_ray(args: argparse.Namespace, name: str) -> None:
    """The same API from Ray Serve: --num-replicas engines on the cluster at --ray-address, or
    on a local one started here. Replicas share the cores: unless told, each gets its share."""
    import ray
    from ray import serve

    from nanovllm_onnx.ray import build_app

    cfg = engine_config(args)
    if cfg.intra_op_num_threads == EngineConfig().intra_op_num_threads:
        cfg.intra_op_num_threads = max(1, cfg.intra_op_num_threads // args.num_replicas)
    engine_args = {k: v for k, v in vars(cfg).items() if k != "model"}
    app = build_app(cfg.model, engine_args, num_replicas=args.num_replicas,
                    served_model_name=name, api_key=args.api_key, max_waiting=args.max_waiting,
                    max_request_bytes=args.max_request_bytes,
                    tool_call_parser=args.tool_call_parser)
    ray.init(address=args.ray_address)
    serve.start(http_options={"host": args.host, "port": args.port})
    logger.info("serving %s from %d Ray Serve replicas on http://%s:%d", name,
                args.num_replicas, args.host, args.port)
    serve.run(app, name="nano-vllm-onnx", route_prefix="/", blocking=True)


def cmd_doctor(args: argparse.Namespace) -> None:
    from nanovllm_onnx.doctor import report

    print(report())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nano-vllm-onnx", description=__doc__)
    parser.add_argument("--log-level", default="INFO",
                        help="logs go to stderr; INFO shows the KV budget, providers, threads")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="print versions, providers, CPU features, threads")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("convert", help="convert a HF folder or GGUF file to this engine's ONNX")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="auto", help=WEIGHTS_HELP)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text for one prompt")
    p.add_argument("prompt")
    add_engine_args(p)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system message (chat models)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible API over HTTP")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="model to serve, as --model (default: SmolLM2-135M-Instruct)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients use (default: the model path's name)")
    p.add_argument("--api-key", default=os.environ.get("NANO_VLLM_ONNX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: "
                        "$NANO_VLLM_ONNX_API_KEY, else none)")
    p.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help="sequences that may wait for a place in the batch; beyond, HTTP 503")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest request body accepted; beyond, HTTP 413")
    p.add_argument("--ray", action="store_true",
                   help="serve from Ray Serve replicas (pip install 'nano-vllm-onnx[ray]')")
    p.add_argument("--num-replicas", type=int, default=1,
                   help="with --ray: engine replicas, with prefix-cache affinity routing")
    p.add_argument("--ray-address", default=None,
                   help="with --ray: the cluster to join (default: $RAY_ADDRESS, else a local "
                        "cluster started here)")
    p.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                   help="the format of the model's tool calls (default: from the chat template)")
    p.add_argument("--log-level", dest="serve_log_level", default="info", type=str.lower,
                   choices=["debug", "info", "warning", "error", "critical"])
    p.add_argument("--log-stats-interval", type=float, default=10.0,
                   help="seconds between vLLM's engine stats lines (prompt and generation "
                        "throughput, running and waiting, KV cache use), logged while the "
                        "engine works; not with --ray (each replica has its /metrics)")
    p.add_argument("--disable-log-stats", action="store_true", help="no engine stats lines")
    p.set_defaults(func=cmd_serve)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ModelLoadError, KernelBuildError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
