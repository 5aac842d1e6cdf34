"""SlotAttention and SwiGLU alone, build against build, at a model's shapes: a batched decode
step, prompt steps and SwiGLU calls, on random inputs with the caches updated in place (as
the engine binds them).

    python benchmarks/attn_bench.py                          # 1B shapes, fp16 cache
    python benchmarks/attn_bench.py --targets avx512_amx@../main/nanovllm_onnx/kernels \
        avx512_amx                                           # main's build against this one
    python benchmarks/attn_bench.py --cache fp32 --cases decode32 prompt128
    python benchmarks/attn_bench.py --cache fp16 int8     # each build with each cache
    python benchmarks/attn_bench.py --cases prompt4x256 --targets avx512_amx:float avx512_amx

Cases: decodeN (N rows of one token, contexts 256-320), promptN (one row, N tokens from
position 0), prompt4x256 (four rows of 256, the prompt step of a wave of 256-token
prompts), swigluN (N rows of the MLP's width). Each round times every build (with every
cache precision asked for) on every case in turn (interleaved); times are CPU seconds of the
process per call (threads do not spin), the table gives each build's median and its speed
relative to the first build. Also checks that the builds' attention outputs agree (bit for
bit, or the largest difference where not). Each
call gets its tokens' roles as the engine's block formats feed them (prompt_rows: a prompt
case's tokens are prompt tokens, a decode's generated ones); TARGET:float feeds none, as
for fp32 and int8 weights (AMX then runs prompt rows in float too).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnxruntime as ort
from kernel_bench import ops_session, without_role
from onnx import TensorProto, helper, numpy_helper
from workloads import THREADS, medians, time_calls

from nanovllm_onnx.config import kv_width
from nanovllm_onnx.kernels import DOMAIN, EITHER_ROLE, KEY_TILE, PROMPT_ROLE, PROMPT_ROWS

SHAPES = {  # heads, kv_heads, head_dim, MLP width, rows (max_num_seqs), slot capacity
    "1b": (32, 8, 64, 8192, 32, 512),
    "135m": (9, 3, 64, 1536, 32, 512),
}
LAYERS = 16  # caches cycled through call after call: 512 MB at 1B, more than the L3 holds
CACHE = {"fp16": (np.float16, TensorProto.FLOAT16), "fp32": (np.float32, TensorProto.FLOAT),
         "int8": (np.int8, TensorProto.INT8)}


def attention_session(model: str, cache: str, target: str) -> ort.InferenceSession:
    """SlotAttention at the model's shapes, fed prompt_rows unless the target is TARGET:float."""
    heads, kv_heads, d, _, rows, capacity = SHAPES[model]
    dtype, cache_type = CACHE[cache]
    width = kv_width(d, dtype)
    key_shape = [rows, kv_heads, capacity // KEY_TILE, width, KEY_TILE]
    value_shape = [rows, kv_heads, capacity, width]
    roles = [] if fed_no_roles(target) else [PROMPT_ROWS]
    node = helper.make_node(
        "SlotAttention",
        ["qkv", "past_key", "past_value", "past_lens", "query_lens", "cos", "sin", *roles],
        ["out", "present_key", "present_value"], domain=DOMAIN, num_heads=heads,
        kv_num_heads=kv_heads, scale=d ** -0.5)
    angles = np.outer(np.arange(capacity), 10000.0 ** (-np.arange(d // 2) / (d // 2)))
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "slot_attention",
        [info("qkv", TensorProto.FLOAT, ["tokens", (heads + 2 * kv_heads) * d]),
         info("past_key", cache_type, key_shape), info("past_value", cache_type, value_shape),
         info("past_lens", TensorProto.INT32, [rows]),
         info("query_lens", TensorProto.INT32, [rows]),
         *[info(name, TensorProto.UINT8, ["tokens"]) for name in roles]],
        [info("out", TensorProto.FLOAT, ["tokens", heads * d]),
         info("present_key", cache_type, key_shape),
         info("present_value", cache_type, value_shape)],
        [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
         numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")])
    return ops_session(graph, without_role(target))


def fed_no_roles(target: str) -> bool:
    return target.partition("@")[0].endswith(":float")


def swiglu_session(model: str, target: str) -> ort.InferenceSession:
    width = SHAPES[model][3]
    node = helper.make_node("SwiGLU", ["gate_up"], ["act", "scale"], domain=DOMAIN)
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "swiglu", [info("gate_up", TensorProto.FLOAT, ["tokens", 2 * width])],
        [info("act", TensorProto.FLOAT, ["tokens", width]),
         info("scale", TensorProto.FLOAT, ["tokens", 1])])
    return ops_session(graph, target)


class AttentionCase:
    """One call's inputs bound to a session, the caches in place: a call per layer, each its
    own caches (a decode reads its caches from memory, as in the engine, not from the L3); a
    call writes its new keys at the same positions every time."""

    def __init__(self, sess: ort.InferenceSession, model: str, cache: str, past: list[int],
                 query: list[int], rng: np.random.Generator, roles: bool) -> None:
        heads, kv_heads, d, _, rows, capacity = SHAPES[model]
        past += [0] * (rows - len(past))
        query += [0] * (rows - len(query))
        shape = (rows, kv_heads, capacity, d)
        keys, values = rng.standard_normal(shape), rng.standard_normal(shape)
        qkv = rng.standard_normal((sum(query), (heads + 2 * kv_heads) * d)).astype(np.float32)
        self.out = np.empty((len(qkv), heads * d), np.float32)
        self.sess, self.bindings, self.caches, self.calls = sess, [], [], 0
        for _ in range(LAYERS):
            caches = as_cache(keys, cache, tiled=True), as_cache(values, cache, tiled=False)
            binding = sess.io_binding()
            for name, array in zip(("key", "value"), caches):
                value = ort.OrtValue.ortvalue_from_numpy(array)
                binding.bind_ortvalue_input(f"past_{name}", value)
                binding.bind_ortvalue_output(f"present_{name}", value)
            binding.bind_cpu_input("qkv", qkv)
            binding.bind_cpu_input("past_lens", np.array(past, np.int32))
            binding.bind_cpu_input("query_lens", np.array(query, np.int32))
            if roles:  # a decode's token is a generated one, the others prompt tokens
                role = EITHER_ROLE if max(query) == 1 else PROMPT_ROLE
                binding.bind_cpu_input(PROMPT_ROWS, np.full(len(qkv), role, np.uint8))
            binding.bind_output("out", "cpu", 0, np.float32, list(self.out.shape),
                                self.out.ctypes.data)
            self.caches.append(caches)
            self.bindings.append(binding)

    def run(self) -> np.ndarray:
        self.sess.run_with_iobinding(self.bindings[self.calls % LAYERS])
        self.calls += 1
        return self.out


def as_cache(x: np.ndarray, cache: str, tiled: bool) -> np.ndarray:
    """Positions x [rows, kv_heads, capacity, D] in the cache's layout: keys in tiles of
    KEY_TILE positions; int8 as codes of x / 0.03 (|x| < 3.8) with that scale's bytes."""
    if cache == "int8":
        scale = np.full((*x.shape[:-1], 1), 0.03, "<f4").view(np.int8)
        x = np.concatenate([np.clip(np.rint(x / 0.03), -127, 127).astype(np.int8), scale], -1)
    else:
        x = x.astype(CACHE[cache][0])
    if not tiled:
        return x
    r, h, c, d = x.shape
    tiles = x.reshape(r, h, c // KEY_TILE, KEY_TILE, d)
    return np.ascontiguousarray(tiles.transpose(0, 1, 2, 4, 3))


class SwiGLUCase:
    """Its input and outputs bound once (the engine's arena reuses its buffers: a plain run
    would time fresh pages of the outputs)."""

    def __init__(self, sess: ort.InferenceSession, model: str, tokens: int,
                 rng: np.random.Generator) -> None:
        width = SHAPES[model][3]
        self.gate_up = (rng.standard_normal((tokens, 2 * width)) * 2).astype(np.float32)
        self.act = np.empty((tokens, width), np.float32)
        self.scale = np.empty((tokens, 1), np.float32)
        self.sess, self.binding = sess, sess.io_binding()
        self.binding.bind_cpu_input("gate_up", self.gate_up)
        for name, array in (("act", self.act), ("scale", self.scale)):
            self.binding.bind_output(name, "cpu", 0, np.float32, list(array.shape),
                                     array.ctypes.data)

    def run(self) -> np.ndarray:
        self.sess.run_with_iobinding(self.binding)
        return self.act


def lengths(case: str, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(past, query) of an attention case's rows."""
    if case.startswith("decode"):
        n = int(case.removeprefix("decode"))
        return [int(p) for p in rng.integers(256, 321, n)], [1] * n
    rows, _, tokens = case.removeprefix("prompt").rpartition("x")
    return [0] * int(rows or 1), [int(tokens)] * int(rows or 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(SHAPES), default="1b")
    ap.add_argument("--cache", nargs="+", choices=list(CACHE), default=["fp16"])
    ap.add_argument("--cases", nargs="+",
                    default=["decode32", "decode1", "prompt128", "prompt4x256", "swiglu1024",
                             "swiglu32"])
    ap.add_argument("--targets", nargs="+", default=[""],
                    help="builds to compare, first the reference (TARGET or TARGET@DIR, as "
                         "kernel_bench.py takes them; default: this checkout's best build)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5, help="per build, case and round")
    args = ap.parse_args()
    # each build with each cache precision: (target, cache), the first the reference
    builds = [(t, c) for c in args.cache for t in args.targets]
    cases = {}
    for target, cache in builds:
        attn, swiglu = (attention_session(args.model, cache, target),
                        swiglu_session(args.model, without_role(target)))
        for name in args.cases:
            rng = np.random.default_rng(0)  # the same inputs for every build
            if name.startswith("swiglu"):
                cases[target, cache, name] = SwiGLUCase(swiglu, args.model,
                                                        int(name.removeprefix("swiglu")), rng)
            else:
                cases[target, cache, name] = AttentionCase(attn, args.model, cache,
                                                           *lengths(name, rng), rng,
                                                           not fed_no_roles(target))
    names = [f"{t or 'this build'} {c}" if len(args.cache) > 1 else t or "this build"
             for t, c in builds]
    for name in args.cases:
        first, *rest = (cases[b + (name,)].run().copy() for b in builds)
        for label, out in zip(names[1:], rest):
            if not np.array_equal(first, out):
                diff = np.abs(first - out).max() / np.abs(first).max()
                print(f"{label} on {name}: largest difference {diff:.1e} of the largest output")
    times: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for name in args.cases:
            for build in builds:
                times.setdefault(build + (name,), []).append(
                    time_calls(cases[build + (name,)].run, args.seconds))
    print(f"{args.model}, {' / '.join(args.cache)} cache, {THREADS} threads, {args.rounds} "
          f"rounds; load average {os.getloadavg()[0]:.2f}; ms per call, CPU / wall (medians)")
    print("| case | " + " | ".join(names) + "".join(f" | {n} / {names[0]}" for n in names[1:])
          + " |")
    print("|---" * (2 * len(names)) + "|")
    for name in args.cases:
        med = [medians(times[b + (name,)]) for b in builds]
        print(f"| {name} | " + " | ".join(f"{c * 1e3:.3f} / {w * 1e3:.3f}" for c, w in med)
              + "".join(f" | {med[0][0] / c:.2f}x / {med[0][1] / w:.2f}x" for c, w in med[1:])
              + " |")


if __name__ == "__main__":
    main()
