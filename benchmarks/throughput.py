"""Throughput of nano-vllm-onnx on the workloads of issue 6 (nano-vLLM's bench.py, scaled down).

    python benchmarks/throughput.py                      # A and B, median of 3
    python benchmarks/throughput.py --workload B --sampling --profile
    python benchmarks/throughput.py --with-transformers  # HF transformers as the in-run peer

A: prefill tok/s = 128 / time to first token, decode tok/s = 1 / time per output token (prefix
caching off unless --enable-prefix-caching, so the repeated prompt is really computed).
B: output tok/s = 5,006 / wall seconds, all 32 requests submitted at once.
C (issue 17): each of 3 chat prompts that quote a passage of the Apache-2.0 text, run alone,
256 greedy tokens: decode tok/s as in A, over all three.
--speculative-config JSON runs every workload twice per round, without and with speculative
decoding (interleaved), and reports the ratio, whether the tokens are identical, and acceptance.
--profile splits B's step time into scheduling, model call, sampling, detokenization and the
rest; --sampling also runs B with temperature 0.8, top_p 0.95, top_k 50, repetition_penalty 1.1.
--structured runs, instead of plain B, B with a JSON schema on every request
(grammar_engines.SCHEMA: nested object, enum, array, bounded number) against B unconstrained
with each request's max_tokens set to the length of its constrained answer (same tokens, same
batches), rounds interleaved; it reports the schema's compile time, the mask's ms per step and
its share of the step.
Each workload ends with a `RESULT {json}` line (see compare.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from workloads import (
    B_SHAPES,
    C_MAX_TOKENS,
    PEERS,
    THREADS,
    Workload,
    emit,
    log,
    median,
    peak_rss_mib,
    run_runner,
    workload_a,
    workload_b,
    workload_c_messages,
)

from nanovllm_onnx import LLM, SamplingParams, StructuredOutputsParams
from nanovllm_onnx.config import EngineConfig
from nanovllm_onnx.engine import structured as structured_module
from nanovllm_onnx.engine import tokenizer as tokenizer_module

SAMPLING = dict(temperature=0.8, top_p=0.95, top_k=50, repetition_penalty=1.1)
HERE = Path(__file__).resolve().parent
TRANSFORMERS_PYTHON = PEERS / "transformers/venv/bin/python"


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def run_a(llm: LLM, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """Time to first token, time per output token after it, and the tokens, for one request
    alone (with speculative decoding a step may bring several tokens)."""
    engine = llm.llm_engine
    start = time.perf_counter()
    engine.add_request(engine.new_request_id(), prompt, greedy(n))
    first = last = 0.0
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():  # one request
            last = time.perf_counter()
            first = first or last
            tokens = out.outputs[0].token_ids
    assert len(tokens) == n, (len(tokens), n)
    return first - start, (last - first) / (n - 1), tokens


def run_b(llm: LLM, wl: Workload, sampling: bool = False,
          schema: dict | None = None) -> tuple[float, list[int]]:
    """Wall time and each request's output length (with a schema, the answer may end before
    max_tokens: the grammar completes)."""
    extra = SAMPLING if sampling else dict(temperature=0.0)
    if schema is not None:
        extra["structured_outputs"] = StructuredOutputsParams(json=schema)
    params = [SamplingParams(max_tokens=n, ignore_eos=True, **extra) for n in wl.max_tokens]
    start = time.perf_counter()
    outputs = llm.generate(wl.prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    assert schema is not None or sum(lengths) == wl.output_tokens
    return wall, lengths


def c_prompts(llm: LLM) -> list[list[int]]:
    tok = llm.llm_engine.tokenizer
    return [tok.chat_prompt_ids([{"role": "user", "content": m}]) for m in workload_c_messages()]


def run_c(llm: LLM, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    """Decode tok/s over workload C (every prompt alone; time after each first token) and the
    tokens."""
    seconds, tokens = 0.0, []
    for prompt in prompts:
        _, tpot, out = run_a(llm, prompt, C_MAX_TOKENS)
        seconds += tpot * (C_MAX_TOKENS - 1)
        tokens.append(out)
    return len(prompts) * (C_MAX_TOKENS - 1) / seconds, tokens


def measure(llm: LLM, workload: str) -> tuple[float, list[list[int]] | None]:
    """One run of a workload: A and C decode tok/s with the tokens, B output tok/s."""
    if workload == "A":
        wl = workload_a()
        _, tpot, tokens = run_a(llm, wl.prompts[0], wl.max_tokens[0])
        return 1 / tpot, [tokens]
    if workload in B_SHAPES:
        wl = workload_b(workload)
        return wl.output_tokens / run_b(llm, wl)[0], None
    return run_c(llm, c_prompts(llm))


def compare_speculative(engines: dict[str, LLM], workloads: list[str], repeats: int,
                        weights: str) -> None:
    """Each workload without and with speculative decoding, interleaved round by round."""
    spec = engines["with"]
    for workload in workloads:
        for llm in engines.values():  # warm-up
            run_a(llm, workload_a().prompts[0], 8)
        stats = spec.llm_engine.spec_decode_stats
        before = replace(stats)
        speeds: dict[str, list[float]] = {name: [] for name in engines}
        tokens: dict[str, list] = {name: [] for name in engines}
        for _ in range(repeats):
            for name, llm in engines.items():
                tok_s, out = measure(llm, workload)
                speeds[name].append(tok_s)
                tokens[name].append(out)
        drafts = stats.num_drafts - before.num_drafts
        draft_tokens = stats.num_draft_tokens - before.num_draft_tokens
        accepted = stats.num_accepted_tokens - before.num_accepted_tokens
        ratio = median(speeds["with"]) / median(speeds["without"])
        same = None if tokens["with"][0] is None else all(
            t == tokens["without"][0] for t in tokens["with"] + tokens["without"])
        res = {"engine": "nano-vllm-onnx", "weights": weights, "workload": workload,
               "speculative_config": spec.llm_engine.config.speculative_config,
               "tok_s_without": speeds["without"], "tok_s_with": speeds["with"],
               "ratio": ratio, "identical_tokens": same, "num_drafts": drafts,
               "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted,
               "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
               "mean_accepted_length": 1 + accepted / drafts if drafts else 0.0}
        kind = "output" if workload == "B" else "decode"
        log(f"{workload}: {kind} tok/s without {median(speeds['without']):.1f} "
            f"({', '.join(f'{v:.1f}' for v in speeds['without'])}), with "
            f"{median(speeds['with']):.1f} ({', '.join(f'{v:.1f}' for v in speeds['with'])}) "
            f"-> {ratio:.2f}x; identical tokens: {same}; acceptance "
            f"{res['acceptance_rate']:.2f} of {draft_tokens} draft tokens, mean accepted "
            f"length {res['mean_accepted_length']:.2f} over {drafts} verifications")
        emit(res)


class StepProfile:
    """Wall time of the engine's parts, by wrapping them on this engine instance only."""

    def __init__(self, llm: LLM) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        engine = llm.llm_engine
        det = tokenizer_module.IncrementalDetokenizer
        self._patched: list[tuple[object, str, object | None]] = []
        for obj, name, key in [(engine.scheduler, "schedule", "schedule"),
                               (engine.runner, "run", "model call"),
                               (engine, "sampler", "sampler"),
                               (engine, "_append_token", "append token"),
                               (det, "step", "detokenize"),
                               (engine.structured, "start_masks", "mask start"),
                               (structured_module.TokenMasks, "apply", "mask wait+apply"),
                               # On the mask worker, overlapping the model call: not a part
                               # of the step's own time (left out of "other python").
                               (structured_module.llg_np, "fill_next_token_bitmask_par",
                                "mask compute (worker)")]:
            own = vars(obj).get(name)  # None: a method looked up on the class
            self._patched.append((obj, name, own))
            setattr(obj, name, self._timed(key, getattr(obj, name)))

    def _timed(self, key: str, fn: Callable) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - t
        return wrapper

    def restore(self) -> None:
        for obj, name, own in self._patched:
            if own is None:
                delattr(obj, name)
            else:
                setattr(obj, name, own)

    def report(self, wall: float, steps: int) -> dict:
        s = dict(self.seconds)
        # append token includes detokenize; report them apart.
        s["append token"] = s.get("append token", 0.0) - s.get("detokenize", 0.0)
        worker = s.pop("mask compute (worker)", 0.0)
        s["other python"] = wall - sum(s.values())
        if worker:
            s["mask compute (worker)"] = worker
        return {"wall_s": wall, "steps": steps, "ms_per_step": 1000 * wall / steps,
                "share": {k: v / wall for k, v in s.items()},
                "ms_per_step_by_part": {k: 1000 * v / steps for k, v in s.items()}}


def profiled_b(llm: LLM, wl: Workload, sampling: bool, schema: dict | None = None) -> dict:
    prof = StepProfile(llm)
    steps0 = llm.llm_engine.num_steps
    try:
        wall, lengths = run_b(llm, wl, sampling, schema)
    finally:
        prof.restore()
    out = prof.report(wall, llm.llm_engine.num_steps - steps0)
    out["output_tok_s"] = sum(lengths) / wall
    return out


def structured_b(llm: LLM, wl: Workload, repeats: int) -> dict:
    """B with a schema on every request vs B unconstrained with the same output lengths."""
    from grammar_engines import SCHEMA

    compiler = llm.llm_engine.structured.compiler
    _ = compiler.tokenizer  # built once per engine, not per schema
    t = time.perf_counter()
    compiler.compile(StructuredOutputsParams(json=SCHEMA))
    compile_s = time.perf_counter() - t
    _, lengths = run_b(llm, wl, schema=SCHEMA)  # warm-up; greedy: the same lengths every run
    same = Workload("B-lengths", wl.prompts, lengths)
    walls: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    for _ in range(repeats):
        walls["unconstrained"].append(run_b(llm, same)[0])
        wall, again = run_b(llm, wl, schema=SCHEMA)
        assert again == lengths
        walls["json_schema"].append(wall)
    tok_s = {k: sum(lengths) / median(v) for k, v in walls.items()}
    prof = profiled_b(llm, wl, False, SCHEMA)
    parts = prof["ms_per_step_by_part"]
    on_step = parts.get("mask start", 0.0) + parts.get("mask wait+apply", 0.0)
    res = {"engine": "nano-vllm-onnx", "workload": "B-structured", "output_tokens": sum(lengths),
           "output_tok_s": tok_s, "ratio": tok_s["json_schema"] / tok_s["unconstrained"],
           "walls_s": walls, "schema_compile_ms": 1000 * compile_s,
           "mask_ms_per_step_on_step": on_step,
           "mask_ms_per_step_worker": parts.get("mask compute (worker)", 0.0),
           "mask_share_of_step": on_step / prof["ms_per_step"], "profile": prof}
    log(f"B structured ({sum(lengths)} output tokens): json_schema "
        f"{tok_s['json_schema']:.1f} tok/s vs unconstrained {tok_s['unconstrained']:.1f} -> "
        f"{res['ratio']:.3f}x; schema compile {res['schema_compile_ms']:.1f} ms; mask on the "
        f"step {on_step:.3f} ms/step ({100 * res['mask_share_of_step']:.1f}% of "
        f"{prof['ms_per_step']:.2f} ms), computing it on the worker "
        f"{res['mask_ms_per_step_worker']:.3f} ms/step (overlaps the model call)")
    print_profile("json_schema", prof)
    return res


def print_profile(name: str, p: dict) -> None:
    log(f"  {name}: {p['output_tok_s']:.1f} tok/s, {p['steps']} steps, "
        f"{p['ms_per_step']:.2f} ms/step")
    for k, v in sorted(p["share"].items(), key=lambda kv: -kv[1]):
        log(f"    {k:<14} {100 * v:5.1f}%  {p['ms_per_step_by_part'][k]:7.3f} ms/step")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF, HF folder or converted folder")
    ap.add_argument("--weights", default=None, help="fp32 | int8 | int4 (when converting)")
    ap.add_argument("--workload", nargs="+", choices=["A", *B_SHAPES, "C"],
                    default=["A", "B"], help="Bs: the smaller B (for 1B models)")
    ap.add_argument("--speculative-config", type=json.loads, default=None,
                    help="JSON, as LLM(speculative_config=...): compare without and with it")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int,
                    default=EngineConfig.max_num_batched_tokens)
    ap.add_argument("--kv-cache-memory-gib", type=float, default=1.0)
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto (fp16) | fp16 | fp32")
    ap.add_argument("--enable-prefix-caching", action="store_true")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--profile", action="store_true", help="B: where the step time goes")
    ap.add_argument("--sampling", action="store_true",
                    help="B: also run with sampling and report the sampler's cost vs greedy")
    ap.add_argument("--structured", action="store_true",
                    help="B: with a JSON schema on every request vs unconstrained (instead of "
                         "plain B)")
    ap.add_argument("--with-transformers", action="store_true",
                    help="also run HF transformers (torch CPU, fp32) as the in-run peer")
    ap.add_argument("--transformers-python", default=None,
                    help="python with torch and transformers (default: the peer venv if "
                         "benchmarks/setup_peers.sh made it, else this one)")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    extra = {"weights": args.weights} if args.weights else {}
    engine_args = dict(max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       kv_cache_memory_gib=args.kv_cache_memory_gib,
                       kv_cache_dtype=args.kv_cache_dtype,
                       enable_prefix_caching=args.enable_prefix_caching,
                       intra_op_num_threads=args.threads)
    llm = LLM(args.model, **extra, **engine_args)
    weights = llm.llm_engine.model_config.weights
    if args.model and args.model.endswith(".gguf"):  # auto runs the file's own blocks: name it
        weights += f" ({Path(args.model).name})"
    log(f"nano-vllm-onnx: loaded in {time.perf_counter() - t:.1f} s, weights {weights}, "
        f"{args.threads} threads, prefix caching {'on' if args.enable_prefix_caching else 'off'}")
    if args.speculative_config is not None:
        spec = LLM(args.model, **extra, **engine_args, speculative_config=args.speculative_config)
        compare_speculative({"without": llm, "with": spec}, args.workload, args.repeats, weights)
        return
    results = []
    if "A" in args.workload:
        wl = workload_a()
        run_a(llm, wl.prompts[0], 8)  # warm-up
        runs = [run_a(llm, wl.prompts[0], wl.max_tokens[0]) for _ in range(args.repeats)]
        ttft, tpot = median([r[0] for r in runs]), median([r[1] for r in runs])
        res = {"engine": "nano-vllm-onnx", "weights": weights, "workload": "A",
               "prefill_tok_s": 128 / ttft, "decode_tok_s": 1 / tpot,
               "runs": [{"ttft_s": a, "tpot_s": b} for a, b, _ in runs]}
        log(f"A: prefill {res['prefill_tok_s']:.0f} tok/s (TTFT {1000 * ttft:.1f} ms), "
            f"decode {res['decode_tok_s']:.1f} tok/s (TPOT {1000 * tpot:.2f} ms)")
        results.append(res)
        emit(res)
    if "C" in args.workload:
        run_a(llm, workload_a().prompts[0], 8)  # warm-up
        speeds = [run_c(llm, c_prompts(llm))[0] for _ in range(args.repeats)]
        res = {"engine": "nano-vllm-onnx", "weights": weights, "workload": "C",
               "decode_tok_s": median(speeds), "runs": speeds}
        log(f"C: decode {res['decode_tok_s']:.1f} tok/s")
        results.append(res)
        emit(res)
    b_name = next((b for b in B_SHAPES if b in args.workload), None)
    if b_name and args.structured:
        emit(structured_b(llm, workload_b(b_name), args.repeats))
    elif b_name:
        wl = workload_b(b_name)
        warm = Workload("warm", wl.prompts[:8], [8] * 8)
        run_b(llm, warm)
        walls = [run_b(llm, wl)[0] for _ in range(args.repeats)]
        res = {"engine": "nano-vllm-onnx", "weights": weights, "workload": b_name,
               "output_tok_s": wl.output_tokens / median(walls), "wall_s": median(walls),
               "walls_s": walls, "peak_rss_mib": peak_rss_mib()}
        log(f"{b_name}: {res['output_tok_s']:.1f} output tok/s (wall {median(walls):.2f} s, "
            f"runs {', '.join(f'{w:.2f}' for w in walls)}), peak RSS {res['peak_rss_mib']:.0f} MiB")
        if args.profile or args.sampling:
            res["profile_greedy"] = profiled_b(llm, wl, sampling=False)
            print_profile("greedy", res["profile_greedy"])
        if args.sampling:
            res["profile_sampling"] = p = profiled_b(llm, wl, sampling=True)
            print_profile("sampling " + ", ".join(f"{k}={v}" for k, v in SAMPLING.items()), p)
            g = res["profile_greedy"]
            extra = p["ms_per_step_by_part"]["sampler"] - g["ms_per_step_by_part"]["sampler"]
            log(f"  sampler vs greedy: {extra:+.3f} ms/step; sampling run "
                f"{p['ms_per_step'] / g['ms_per_step']:.3f}x the greedy step time")
        results.append(res)
        emit(res)
    if args.with_transformers:
        python = args.transformers_python or (
            str(TRANSFORMERS_PYTHON) if TRANSFORMERS_PYTHON.exists() else sys.executable)
        for ours in results:
            peer = run_runner([python, str(HERE / "peer_transformers.py"), "--workload",
                               ours["workload"], "--repeats", str(args.repeats)])
            keys = ["prefill_tok_s", "decode_tok_s"] if ours["workload"] == "A" else [
                "output_tok_s"]
            for k in keys:
                log(f"{ours['workload']} {k}: ours {ours[k]:.1f}, transformers {peer[k]:.1f} "
                    f"-> ours / transformers = {ours[k] / peer[k]:.2f}x")
            if "peak_rss_mib" in peer:
                log(f"B peak RSS: transformers {peer['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
