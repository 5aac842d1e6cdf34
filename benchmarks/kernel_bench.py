"""BlockLinear alone, build against build: one transformer layer's projections (qkv, o,
gate_up, down, at the model's shapes) on random 4- or 8-bit blocks, per token count.

    python benchmarks/kernel_bench.py                      # 1B shapes, int4, AMX vs VNNI
    python benchmarks/kernel_bench.py --targets avx512_amx avx512_amx:prompt   # int8 vs bf16
    python benchmarks/kernel_bench.py --model 135m --bits 8 --tokens 1 7 64
    python benchmarks/kernel_bench.py --prefill default --weights int4   # through the engine
    python benchmarks/kernel_bench.py --targets avx512_amx:prompt@../main/nanovllm_onnx/kernels \
        avx512_amx:prompt --tokens 16 64 128 512     # another checkout's build against this one
    python benchmarks/kernel_bench.py --layers 16 --tokens 1 4 8 16   # weights from memory
    python benchmarks/kernel_bench.py --model 1b-head --bits 8   # the 1B LM head alone
    python benchmarks/kernel_bench.py --bits 8 --layers 16 --tokens 32 128 1024 \
        --targets avx512_amx avx512_amx:prompt vllm     # against vLLM's bf16 GEMMs
    python benchmarks/kernel_bench.py --bits 8 --block 128 --layers 16   # blocks of 128 inputs
    python benchmarks/kernel_bench.py --bits 8 --block 128 --layers 16 --tokens 32 --bounds \
        --targets avx512_amx avx512_amx@/tmp/noepi   # a build without its epilogue: a bound
    python benchmarks/kernel_bench.py --prefill path/to/hf-folder --workload wave \
        --weights auto q8_0 --targets avx512_amx      # two weight formats through the engine

Each round times every build on every token count, in turn (interleaved: a shared machine's
load falls on all alike). Times are CPU seconds of the process per call (ONNX Runtime's
threads do not spin between calls), which other processes' load barely changes, unlike the
wall time: the table gives each build's median over rounds (CPU and wall), its TOP/s per core
(multiply-adds x 2 / CPU second), and its speed relative to the first build. --layers N runs N
distinct layers' weights per call (N copies of the projections, random each), per-layer
figures: one layer's weights stay in the L2/L3 from call to call, while the engine's layers
read theirs from memory (a 1B int4 layer is 38 MB); 16 measure that cold case. Also checks that
the builds' outputs are identical bit for bit (AMX against VNNI must be). A target written
`avx512_amx:prompt` runs every row as a prompt token (prompt_rows: AMX's bf16 path), one
written `avx512_amx:either` as a generated token that may take either path (the kernel's choice
by the call's size, as in an engine that is not batch-invariant); a target whose rows' role is
not the first's prints its largest difference from it instead (two targets of one role must
agree bit for bit too, unless --bounds: builds that leave work out on purpose, wrong sums, to
bound what that work costs). TARGET@DIR takes the build from DIR's ops.so (another
checkout's nanovllm_onnx/kernels, e.g. main's, for a before/after in one process; with
--prefill too, where `TARGET:invariant` is an engine with batch_invariant=True: its generated
tokens on the int8 path in every step).
The target `vllm` is the peer: vLLM's CPU GEMMs (oneDNN's prepacked bf16 matmul, as vLLM runs
an unquantized layer: gemm_vllm.py) on bf16 weights of the same shapes, in a process of the
vLLM peer venv, once a round (its outputs are not compared; its CPU time counts Intel OpenMP's
spinning between calls: compare the wall times).
--prefill MODEL instead times the engine's prefill of workload A's prompt (128 tokens, one
output token: every projection is one 128-token call), an engine per build (and per weight
format, where --weights names several) in one process, in CPU seconds too, and checks that
the builds give the same greedy tokens; with --workload B
(or Bs) it times the whole of workload B instead, greedy (CPU and wall); with --workload
wave, a served-like wave (32 prompts of 256 random ids, 64 greedy tokens each), the median CPU
time of its 32-row decode steps and of its prompt steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import GraphProto, TensorProto, helper, numpy_helper
from peer_vllm import VLLM_VENV, vllm_env, vllm_python
from workloads import (
    RESULT_PREFIX,
    THREADS,
    medians,
    random_prompts,
    time_calls,
    workload_a,
    workload_b,
)

from nanovllm_onnx.convert.graph import pack_blocks
from nanovllm_onnx.convert.source import QuantBlocks
from nanovllm_onnx.kernels import (
    DOMAIN,
    EITHER_ROLE,
    INT8_ROLE,
    PROMPT_ROLE,
    PROMPT_ROWS,
    TARGET_ENV,
    custom_ops_library,
    supported_targets,
)

VLLM = "vllm"  # the peer target: vLLM's GEMMs (gemm_vllm.py)
SHAPES = {  # (K, N) of a layer's projections: qkv, o, gate_up, down
    "1b": [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)],
    "135m": [(576, 960), (576, 576), (576, 3072), (1536, 576)],
    "1b-head": [(2048, 128256)],  # the 1B LM head alone (its tied table: --bits 8)
}


@cache
def random_weights(shapes: tuple[tuple[int, int], ...], bits: int, block: int
                   ) -> list[TensorProto]:
    """Packed random blocks per shape (made once: every build's session takes the same)."""
    rng = np.random.default_rng(0)
    weights = []
    for i, (k, n) in enumerate(shapes):
        blocks = -(-k // block)
        q = rng.integers(0, 2**bits, (n, blocks, block), dtype=np.uint8)
        scale = rng.uniform(0.001, 0.01, (n, blocks)).astype(np.float32)
        minimum = -rng.uniform(0, 0.1, (n, blocks)).astype(np.float32)
        weights.append(numpy_helper.from_array(
            pack_blocks(QuantBlocks(q, scale, minimum, bits)), f"w{i}"))
    return weights


def vllm_times(shapes: list[tuple[int, int]], tokens: list[int], seconds: float
               ) -> dict[int, tuple[float, float]]:
    """The peer target's (CPU, wall) seconds per call for each token count: vLLM's GEMMs
    (gemm_vllm.py) in a process of the vLLM peer venv, on bf16 weights of the same shapes."""
    out = subprocess.run(
        [str(vllm_python()), str(Path(__file__).with_name("gemm_vllm.py")), "--shapes",
         json.dumps(shapes), "--tokens", *map(str, tokens), "--seconds", str(seconds)],
        capture_output=True, text=True, env={**os.environ, **vllm_env(VLLM_VENV)})
    if out.returncode:
        raise SystemExit(f"gemm_vllm.py failed:\n{out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith(RESULT_PREFIX))
    return {int(t): tuple(v) for t, v in json.loads(line[len(RESULT_PREFIX):]).items()}


def layer_session(shapes: list[tuple[int, int]], bits: int, block: int, target: str
                  ) -> ort.InferenceSession:
    """One BlockLinear per shape, each on its own input (all of them on input "prompt_rows"),
    in the `target` build."""
    nodes, inputs, outputs = [], [], []
    weights = random_weights(tuple(shapes), bits, block)
    info = helper.make_tensor_value_info
    for i, (k, n) in enumerate(shapes):
        nodes.append(helper.make_node("BlockLinear", [f"x{i}", f"w{i}", PROMPT_ROWS], [f"y{i}"],
                                      domain=DOMAIN, K=k, N=n, bits=bits, block=block))
        inputs.append(info(f"x{i}", TensorProto.FLOAT, ["tokens", k]))
        outputs.append(info(f"y{i}", TensorProto.FLOAT, ["tokens", n]))
    inputs.append(info(PROMPT_ROWS, TensorProto.UINT8, ["tokens"]))
    return ops_session(helper.make_graph(nodes, "layer", inputs, outputs, weights), target)


def build(target: str) -> tuple[str, Path]:
    """TARGET or TARGET@DIR: the build's name and the ops library that registers it (DIR's
    ops.so, another checkout's, else this one's)."""
    name, _, directory = target.partition("@")
    return name, Path(directory, "ops.so") if directory else custom_ops_library()


def without_role(target: str) -> str:
    """TARGET:ROLE or TARGET:ROLE@DIR as the build alone: TARGET or TARGET@DIR."""
    name, at, directory = target.partition("@")
    return name.partition(":")[0] + at + directory


def ops_session(graph: GraphProto, target: str) -> ort.InferenceSession:
    """A session of a graph of the engine's ops in the `target` build (TARGET or TARGET@DIR;
    "": the best this CPU runs), THREADS threads that do not spin."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # CPU time = work
    name, library = build(target)
    os.environ[TARGET_ENV] = name
    try:
        opts.register_custom_ops_library(str(library))
    finally:
        del os.environ[TARGET_ENV]
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def bind(sess: ort.InferenceSession, feeds: dict[str, np.ndarray],
         shapes: list[tuple[int, int]]) -> tuple[ort.IOBinding, list[np.ndarray]]:
    """The session's inputs and outputs bound to arrays made once: a timed call runs the
    kernels only (sess.run would copy every output into a new array, the 1B layer's 92 MB at
    1024 tokens: page faults and copies that took ~40% of the CPU time there)."""
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    tokens = len(feeds[PROMPT_ROWS])
    outputs = [np.empty((tokens, n), np.float32) for _, n in shapes]
    for i, y in enumerate(outputs):
        binding.bind_output(f"y{i}", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
    return binding, outputs


def run_bound(sess: ort.InferenceSession, binding: ort.IOBinding,
              outputs: list[np.ndarray]) -> list[np.ndarray]:
    sess.run_with_iobinding(binding)
    return outputs


def engine_run(model: str, formats: list[str], targets: list[str], rounds: int,
               workload: str) -> None:
    """CPU seconds per prefill of workload A's prompt (or per workload B), per build and
    weight format (TARGET/FORMAT where several are given), interleaved."""
    from nanovllm_onnx import LLM, SamplingParams
    from nanovllm_onnx.runner import model_runner

    engines = {}
    ours = model_runner.custom_ops_library
    variants = [(t, w) for t in targets for w in formats or [None]]
    targets = [t if len(formats) < 2 else f"{t}/{w}" for t, w in variants]
    for target, (build_name, weights) in zip(targets, variants):
        name, library = build(build_name)
        name, _, invariant = name.partition(":")
        os.environ[TARGET_ENV] = name  # read when the engine registers the ops
        model_runner.custom_ops_library = lambda at=library: at  # (DIR's, or ours)
        try:
            engines[target] = LLM(None if model == "default" else model,
                                  **({"weights": weights} if weights else {}),
                                  intra_op_num_threads=THREADS, intra_op_spinning=False,
                                  batch_invariant=invariant == "invariant",
                                  enable_prefix_caching=False)  # really compute each prefill
        finally:
            del os.environ[TARGET_ENV]
            model_runner.custom_ops_library = ours
    weights = " ".join(formats)
    prompt = {"prompt_token_ids": workload_a().prompts[0]}
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = {t: llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
               for t, llm in engines.items()}
    # AMX computes prompt tokens in bf16: its tokens may part from the int8 builds' ones.
    same = "same greedy tokens" if len({tuple(o) for o in outputs.values()}) == 1 else \
        f"greedy tokens differ: {outputs}"
    if workload == "wave":
        return wave_run(engines, rounds, f"{model} {weights or ''}", same)
    if workload == "A":
        prompts, tokens = [prompt], len(prompt["prompt_token_ids"])
        params = [SamplingParams(temperature=0.0, max_tokens=1)]
        what = f"prefill of workload A's {tokens} tokens"
    else:
        wl = workload_b(workload)
        prompts, tokens = wl.prompts, wl.output_tokens
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                  for n in wl.max_tokens]
        what = f"workload {workload} ({tokens} output tokens)"
    times: dict[str, list[tuple[float, float]]] = {t: [] for t in targets}  # (CPU, wall)
    for _ in range(rounds):
        for target, llm in engines.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            llm.generate(prompts, params, use_tqdm=False)
            times[target].append((time.process_time() - start_cpu, time.perf_counter() - start))
    med = {t: medians(v) for t, v in times.items()}
    cpu, wall = ({t: m[i] for t, m in med.items()} for i in (0, 1))
    print(f"{what}, {model} {weights or ''}, {THREADS} threads, {rounds} rounds; load "
          f"average {os.getloadavg()[0]:.2f}; {same}")
    for t in targets:
        print(f"{t}: {cpu[t] * 1e3:.1f} CPU ms ({tokens / cpu[t]:.0f} tok per CPU second), "
              f"{cpu[targets[0]] / cpu[t]:.2f}x {targets[0]}; wall {wall[t] * 1e3:.1f} ms "
              f"({tokens / wall[t]:.1f} tok/s), {wall[targets[0]] / wall[t]:.2f}x")


def wave_run(engines: dict, rounds: int, model: str, same: str) -> None:
    """Median CPU ms of a 32-row decode step and of a prompt step of a served-like wave (the
    steps of 32 x 256 prompt tokens, 64 out, as the server schedules them), per build,
    interleaved."""
    from nanovllm_onnx import SamplingParams
    from nanovllm_onnx.runner.model_runner import ModelRunner

    prompts = random_prompts(32, 256, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    steps: list[tuple[bool, float]] = []  # (prompt tokens in it, CPU seconds) per model call
    run = ModelRunner.run

    def timed(self: ModelRunner, step: object) -> np.ndarray:
        prompt = any(step.num_prompt_tokens(i) for i in range(len(step.seqs)))
        start = time.process_time()
        logits = run(self, step)
        steps.append((prompt, time.process_time() - start))
        return logits

    kinds = {t: {True: [], False: []} for t in engines}
    ModelRunner.run = timed
    try:
        for _ in range(rounds):
            for target, llm in engines.items():
                steps.clear()
                llm.generate(prompts, params, use_tqdm=False)
                for prompt in (True, False):  # (after the prompts, every step decodes 32)
                    kinds[target][prompt].append(statistics.median(
                        t for p, t in steps if p == prompt) * 1e3)
    finally:
        ModelRunner.run = run
    print(f"served-like wave, {model}, {THREADS} threads, {rounds} rounds; load average "
          f"{os.getloadavg()[0]:.2f}; {same}")
    first = next(iter(engines))
    for prompt, name in ((False, "32-row decode step"), (True, "prompt step")):
        for t in engines:
            med, ref = (statistics.median(kinds[x][prompt]) for x in (t, first))
            print(f"{name}, {t}: {med:.1f} CPU ms, {ref / med:.2f}x {first}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(SHAPES), default="1b")
    ap.add_argument("--bits", type=int, choices=[4, 8], default=4)
    ap.add_argument("--block", type=int, choices=[32, 128], default=32,
                    help="inputs per block of the weights (builds from before blocks of 128 "
                         "reject 128)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 7, 16, 64, 256])
    ap.add_argument("--targets", nargs="+", default=None,
                    help="builds to compare, first the reference; TARGET:prompt runs every row as "
                         "a prompt token (default: avx512_vnni, avx512_amx and "
                         "avx512_amx:prompt where this CPU runs them)")
    ap.add_argument("--layers", type=int, default=1,
                    help="distinct layers' weights per call, times per layer: 16 read them from "
                         "memory as the engine's layers do (1: one layer's, which stays in cache)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.3, help="per build, count and round")
    ap.add_argument("--prefill", metavar="MODEL", default=None,
                    help="time the engine's prefill of MODEL (a path, or 'default') instead")
    ap.add_argument("--weights", nargs="+", default=[],
                    help="with --prefill: the weight formats (fp32 | int8 | int4 | ...), each "
                         "with each build")
    ap.add_argument("--bounds", action="store_true",
                    help="time builds whose sums are wrong on purpose (work left out, an upper "
                         "bound): print their largest difference instead of stopping")
    ap.add_argument("--workload", choices=["A", "B", "Bs", "wave"], default="A",
                    help="with --prefill: A's prefill, the whole of B, or a wave's steps")
    args = ap.parse_args()
    targets = args.targets or [t for t in ("avx512_vnni", "avx512_amx", "avx512_amx:prompt")
                               if t.removesuffix(":prompt") in supported_targets()]
    # each target's rows' role (prompt_rows): TARGET int8, TARGET:prompt, TARGET:either
    roles = {"prompt": PROMPT_ROLE, "either": EITHER_ROLE}
    role = {t: roles.get(t.partition("@")[0].partition(":")[2], INT8_ROLE) for t in targets}
    if args.prefill:  # the engine marks its prompt tokens itself
        plain = [t for t in targets if not role[t] and t != VLLM]
        engine_run(args.prefill, args.weights, plain, args.rounds, args.workload)
        return
    shapes = SHAPES[args.model] * args.layers
    rng = np.random.default_rng(1)
    xs = {tokens: [rng.standard_normal((tokens, k)).astype(np.float32) for k, _ in shapes]
          for tokens in args.tokens}
    builds = [t for t in targets if t != VLLM]
    calls: dict[tuple[str, int], Callable[[], list]] = {}  # each build's call, per token count
    for t in builds:
        sess = layer_session(shapes, args.bits, args.block, without_role(t))
        for tokens, x in xs.items():
            feeds = {**{f"x{i}": a for i, a in enumerate(x)},
                     PROMPT_ROWS: np.full(tokens, role[t], np.uint8)}
            calls[t, tokens] = partial(run_bound, sess, *bind(sess, feeds, shapes))
    for tokens in args.tokens:
        first, *rest = (calls[t, tokens]() for t in builds)
        for target, out in zip(builds[1:], rest):
            if role[target] != role[targets[0]] or args.bounds:
                diff = max(np.abs(a - b).max() / np.abs(a).max() for a, b in zip(first, out))
                print(f"{target} on {tokens} tokens: largest difference {diff:.1e} of the "
                      f"largest output")
            elif not all(np.array_equal(a, b) for a, b in zip(first, out)):
                raise SystemExit(f"{target} differs from {targets[0]} on {tokens} tokens")
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}  # (CPU, wall) per layer
    for _ in range(args.rounds):
        for tokens in args.tokens:
            for target in builds:
                cpu, wall = time_calls(calls[target, tokens], args.seconds)
                times.setdefault((target, tokens), []).append(
                    (cpu / args.layers, wall / args.layers))
        if VLLM in targets:
            for tokens, (cpu, wall) in vllm_times(shapes, args.tokens, args.seconds).items():
                times.setdefault((VLLM, tokens), []).append(
                    (cpu / args.layers, wall / args.layers))
    macs = sum(k * n for k, n in SHAPES[args.model])
    checked = ("bounds: sums wrong on purpose" if args.bounds
               else "outputs identical across builds of a path")
    print(f"{args.model} layer, int{args.bits}, {THREADS} threads, {args.rounds} rounds, "
          f"{args.layers} distinct layers' weights; load average {os.getloadavg()[0]:.2f}; "
          f"{checked}; ms per layer")
    print("| tokens | " + " | ".join(f"{t} CPU ms | wall ms | TOP/s" for t in targets)
          + "".join(f" | {t} / {targets[0]} CPU, wall" for t in targets[1:]) + " |")
    print("|---" * (1 + 4 * len(targets) - 1) + "|")
    for tokens in args.tokens:
        med = {t: medians(times[t, tokens]) for t in targets}
        cpu, wall = ({t: m[i] for t, m in med.items()} for i in (0, 1))
        cells = [f"{cpu[t] * 1e3:.3f} | {wall[t] * 1e3:.3f} | "
                 f"{2 * macs * tokens / cpu[t] / 1e12:.2f}" for t in targets]
        ratios = [f"{cpu[targets[0]] / cpu[t]:.2f}x, {wall[targets[0]] / wall[t]:.2f}x"
                  for t in targets[1:]]
        print(f"| {tokens} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main()
