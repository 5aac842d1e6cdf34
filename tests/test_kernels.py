"""The engine's own ops against numpy references: SlotAttention (causal grouped-query
attention with rotary embeddings on ragged batches of cache rows), SwiGLU, SkipRMSNorm,
BlockLinear and BlockGather."""

from __future__ import annotations

import os
import sys
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nanovllm_onnx.convert.graph import pack_blocks
from nanovllm_onnx.convert.source import QuantBlocks
from nanovllm_onnx.kernels import (
    DOMAIN,
    EITHER_ROLE,
    INT8_ROLE,
    KEY_TILE,
    PROMPT_ROLE,
    PROMPT_ROWS,
    TARGET_ENV,
    kernel_target,
    supported_targets,
)
from tests.conftest import ops_session

HEADS, KV_HEADS, CAPACITY, POSITIONS = 6, 2, 96, 128
F32, F16, I32 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32
CACHE_TYPES = {np.float32: F32, np.float16: F16, np.int8: TensorProto.INT8}
SCALE_BYTES = 4  # an int8 cache's per-position scale, after its codes (ops.cc)


def session(head_dim: int, rows: int, cos: np.ndarray, sin: np.ndarray,
            target: str = "", cache: type = np.float32,
            prompt_rows: bool = False) -> ort.InferenceSession:
    """SlotAttention alone; with `prompt_rows`, fed its tokens' roles too."""
    width = head_dim + (SCALE_BYTES if cache == np.int8 else 0)
    key_shape = [rows, KV_HEADS, CAPACITY // KEY_TILE, width, KEY_TILE]
    value_shape = [rows, KV_HEADS, CAPACITY, width]
    cache_type = CACHE_TYPES[cache]
    roles = [PROMPT_ROWS] if prompt_rows else []
    node = helper.make_node(
        "SlotAttention",
        ["qkv", "past_key", "past_value", "past_lens", "query_lens", "cos", "sin", *roles],
        ["out", "present_key", "present_value"], domain=DOMAIN, num_heads=HEADS,
        kv_num_heads=KV_HEADS, scale=head_dim ** -0.5)
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "slot_attention",
        [info("qkv", F32, ["tokens", (HEADS + 2 * KV_HEADS) * head_dim]),
         info("past_key", cache_type, key_shape), info("past_value", cache_type, value_shape),
         info("past_lens", I32, [rows]), info("query_lens", I32, [rows]),
         *[info(name, TensorProto.UINT8, ["tokens"]) for name in roles]],
        [info("out", F32, ["tokens", HEADS * head_dim]),
         info("present_key", cache_type, key_shape),
         info("present_value", cache_type, value_shape)],
        [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")])
    return ops_session(graph, target)


# BlockLinear's code paths, one build each: AMX-INT8 (with AVX-512 VNNI), AVX-512 VNNI, AVX2
# with and without AVX-VNNI, and the portable one; each runs where the CPU has what it needs.
# SlotAttention, SwiGLU, SkipRMSNorm and BlockGather have no VNNI or AMX path: three builds
# cover them.
TARGETS = ["avx512_amx", "avx512_vnni", "avx2_vnni", "avx2", "portable"]
FLOAT_TARGETS = ["avx512_vnni", "avx2", "portable"]
SUPPORTED = supported_targets()


def skip_unless_runnable(target: str) -> None:
    if target not in SUPPORTED:
        pytest.skip(f"this CPU cannot run the {target} build")


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half rotary embedding of x [..., D] with cos/sin [..., D/2]."""
    a, b = np.split(x, 2, axis=-1)
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def tiles(keys: np.ndarray) -> np.ndarray:
    """[rows, kv_heads, capacity, D] -> the kernel's [.., capacity / 16, D, 16] key tiles."""
    r, h, c, d = keys.shape
    return np.ascontiguousarray(keys.reshape(r, h, c // KEY_TILE, KEY_TILE, d)
                                .transpose(0, 1, 2, 4, 3))


def untile(key_tiles: np.ndarray) -> np.ndarray:
    r, h, t, d, _ = key_tiles.shape
    return key_tiles.transpose(0, 1, 2, 4, 3).reshape(r, h, t * KEY_TILE, d)


def encode(x: np.ndarray, cache: type) -> np.ndarray:
    """Positions [.., D] as a cache of type `cache` holds them: int8 [.., D + 4], each
    position's symmetric codes and its float32 scale's bytes, computed in float32 as the op
    quantizes them (ops.cc's quantize_value, quantize_keys)."""
    if cache != np.int8:
        return x.astype(cache)
    x = x.astype(np.float32)
    peak = np.abs(x).max(-1, keepdims=True)
    inv = np.divide(np.float32(127), peak, out=np.zeros_like(peak), where=peak > 0)
    codes = np.rint(x * inv).astype(np.int8)
    scale = peak * (np.float32(1) / np.float32(127))
    return np.concatenate([codes, scale.astype("<f4").view(np.int8)], -1)


def decode(c: np.ndarray) -> np.ndarray:
    """A cache's positions as float64 (int8: codes times scale)."""
    if c.dtype != np.int8:
        return c.astype(np.float64)
    d = c.shape[-1] - SCALE_BYTES
    return c[..., :d] * np.ascontiguousarray(c[..., d:]).view("<f4").astype(np.float64)


def reference(qkv: np.ndarray, keys: np.ndarray, values: np.ndarray, past: list[int],
              query: list[int], cos: np.ndarray, sin: np.ndarray, cache: type = np.float32,
              bf16_rows: tuple[int, ...] = ()) -> tuple[np.ndarray, ...]:
    """float64 attention, row by row; returns (out, keys, values) after the step, the caches
    as `cache` holds them (encode). The new K/V are rounded to the cache's precision before
    attention reads them, as in the op. Rows in `bf16_rows` as AMX's bf16 tiles take them: the
    scaled queries, the keys, the softmax's numerators and the values rounded to bf16 (the
    numerators' sum not)."""
    d = qkv.shape[-1] // (HEADS + 2 * KV_HEADS)
    stored = (keys.copy(), values.copy())
    keys, values = decode(keys), decode(values)
    out = np.zeros((len(qkv), HEADS * d))
    group = HEADS // KV_HEADS
    start = 0
    for row, (p, n) in enumerate(zip(past, query)):
        tok = qkv[start:start + n].astype(np.float64)
        pos = np.arange(p, p + n)
        q = tok[:, :HEADS * d].reshape(n, HEADS, d)
        k = tok[:, HEADS * d:(HEADS + KV_HEADS) * d].reshape(n, KV_HEADS, d)
        v = tok[:, (HEADS + KV_HEADS) * d:].reshape(n, KV_HEADS, d)
        c, s = cos[pos][:, None], sin[pos][:, None]
        for cached, new in zip(stored, (rotate(k, c, s), v)):
            cached[row, :, p:p + n] = encode(new.transpose(1, 0, 2), cache)
        keys[row, :, p:p + n] = decode(stored[0][row, :, p:p + n])
        values[row, :, p:p + n] = decode(stored[1][row, :, p:p + n])
        q = rotate(q, c, s) * d ** -0.5
        rounded = (lambda a: bf16(a).astype(np.float64)) if row in bf16_rows else (lambda a: a)
        for h in range(HEADS):
            k, v = keys[row, h // group, :p + n], values[row, h // group, :p + n]
            scores = rounded(q[:, h]) @ rounded(k).T  # [n, p + n]
            scores[np.arange(p + n)[None, :] > pos[:, None]] = -np.inf
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            out[start:start + n, h * d:(h + 1) * d] = (
                rounded(weights) @ rounded(v) / weights.sum(-1, keepdims=True))
        start += n
    return out, *stored


CACHES = pytest.mark.parametrize("cache", [np.float32, np.float16, np.int8],
                                 ids=["fp32", "fp16", "int8"])


@pytest.mark.parametrize("target", FLOAT_TARGETS)
@CACHES
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_ragged_rows_match_reference_and_update_in_place(head_dim: int, cache: type,
                                                         target: str) -> None:
    """In every cache precision (fp16, the default, at the default model's head size 64
    too) and in every build this CPU can run."""
    skip_unless_runnable(target)
    rng = np.random.default_rng(head_dim)
    # decode, prefill, idle, chunk on top of a cache, decode at the last cache position,
    # a prefill longer than one query block and not a whole number of tiles
    past, query = [40, 0, 17, 33, CAPACITY - 1, 0], [1, 21, 0, 9, 1, 70]
    angles = rng.uniform(0, 2 * np.pi, (POSITIONS, head_dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    shape = (len(past), KV_HEADS, CAPACITY, head_dim)
    keys, values = (encode(rng.standard_normal(shape), cache) for _ in range(2))
    qkv = rng.standard_normal((sum(query), (HEADS + 2 * KV_HEADS) * head_dim)).astype(np.float32)
    ref_out, ref_keys, ref_values = reference(qkv, keys, values, past, query, cos, sin, cache)
    # fp16: the op rotates keys in float32, the reference in float64, so a key rounds to
    # fp16 one unit apart at most (2^-10 relative); the output moves by some 1e-5. int8: a
    # key's code one step apart at most (a step: its max |x| / 127).
    out_atol, key_atol, key_rtol = {
        np.float32: (2e-5, 2e-6, 0.0), np.float16: (2e-4, 2e-6, 2**-10),
        np.int8: (2e-4, np.abs(decode(ref_keys)).max() / 127, 0.0)}[cache]

    sess = session(head_dim, len(past), cos, sin, target, cache)
    key_cache, value_cache = tiles(keys), values.copy()
    binding = sess.io_binding()
    for name, array in (("key", key_cache), ("value", value_cache)):
        value = ort.OrtValue.ortvalue_from_numpy(array)
        binding.bind_ortvalue_input(f"past_{name}", value)
        binding.bind_ortvalue_output(f"present_{name}", value)  # the same buffer: in place
    binding.bind_cpu_input("qkv", qkv)
    binding.bind_cpu_input("past_lens", np.array(past, np.int32))
    binding.bind_cpu_input("query_lens", np.array(query, np.int32))
    out = np.empty((len(qkv), HEADS * head_dim), np.float32)
    binding.bind_output("out", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    sess.run_with_iobinding(binding)

    np.testing.assert_allclose(out, ref_out, atol=out_atol)
    # The new K/V landed at each row's positions; every other position is untouched.
    np.testing.assert_allclose(decode(untile(key_cache)), decode(ref_keys), atol=key_atol,
                               rtol=key_rtol)
    np.testing.assert_array_equal(value_cache, ref_values)

    # A plain run (no binding) leaves its inputs alone and returns the updated caches.
    feeds = {"qkv": qkv, "past_key": tiles(keys), "past_value": values,
             "past_lens": np.array(past, np.int32), "query_lens": np.array(query, np.int32)}
    plain_out, plain_keys, plain_values = sess.run(None, feeds)
    np.testing.assert_array_equal(plain_out, out)
    np.testing.assert_array_equal(plain_keys, key_cache)
    np.testing.assert_array_equal(feeds["past_key"], tiles(keys))


@pytest.mark.parametrize("target", FLOAT_TARGETS)
@pytest.mark.parametrize("head_dim", [16, 64])
def test_a_prompt_gets_the_same_floats_alone_or_among_many(head_dim: int, target: str) -> None:
    """Short prompts (up to 8 tokens) alone are split into more tasks than among 12 others
    (each row's queries in two blocks): every query's output stays the same bit for bit, so
    a request's tokens do not depend on what shares its step (in the AVX2 build they did, at
    head size 16, before the score and weight chains were explicit FMAs)."""
    skip_unless_runnable(target)
    rng = np.random.default_rng(11)
    angles = rng.uniform(0, 2 * np.pi, (POSITIONS, head_dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    query = [int(n) for n in rng.integers(3, 9, 12)]
    prompts = [rng.standard_normal((n, (HEADS + 2 * KV_HEADS) * head_dim)).astype(np.float32)
               for n in query]

    def run(rows: list[int]) -> np.ndarray:
        cache_shape = (len(rows), KV_HEADS, CAPACITY, head_dim)
        out, _, _ = session(head_dim, len(rows), cos, sin, target).run(None, {
            "qkv": np.concatenate([prompts[r] for r in rows]),
            "past_key": tiles(np.zeros(cache_shape, np.float32)),
            "past_value": np.zeros(cache_shape, np.float32),
            "past_lens": np.zeros(len(rows), np.int32),
            "query_lens": np.array([query[r] for r in rows], np.int32)})
        return out

    together = np.split(run(list(range(len(query)))), np.cumsum(query)[:-1])
    for r in range(len(query)):
        np.testing.assert_array_equal(run([r]), together[r])


@pytest.mark.parametrize("target", FLOAT_TARGETS)
@pytest.mark.parametrize("cache", [np.float16, np.int8], ids=["fp16", "int8"])
def test_a_verification_equals_its_tokens_decoded_one_by_one(cache: type, target: str) -> None:
    """A speculative verification (one row, 7 tokens: 21 query vectors of a KV head in
    chunks) gives every token exactly the output that decoding the tokens one at a time
    gives (what makes its greedy tokens the plain decode's), and the reference's."""
    skip_unless_runnable(target)
    head_dim, past, n = 64, 45, 7
    rng = np.random.default_rng(7)
    angles = rng.uniform(0, 2 * np.pi, (POSITIONS, head_dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    shape = (1, KV_HEADS, CAPACITY, head_dim)
    keys, values = (encode(rng.standard_normal(shape), cache) for _ in range(2))
    qkv = rng.standard_normal((n, (HEADS + 2 * KV_HEADS) * head_dim)).astype(np.float32)
    sess = session(head_dim, 1, cos, sin, target, cache)

    def run(key_cache: np.ndarray, value_cache: np.ndarray, start: int, tokens: np.ndarray
            ) -> np.ndarray:
        out, new_keys, new_values = sess.run(None, {
            "qkv": tokens, "past_key": key_cache, "past_value": value_cache,
            "past_lens": np.array([start], np.int32),
            "query_lens": np.array([len(tokens)], np.int32)})
        key_cache[...], value_cache[...] = new_keys, new_values
        return out

    at_once = run(tiles(keys), values.copy(), past, qkv)
    key_cache, value_cache = tiles(keys), values.copy()
    one_by_one = np.concatenate([run(key_cache, value_cache, past + j, qkv[j:j + 1])
                                 for j in range(n)])
    np.testing.assert_array_equal(at_once, one_by_one)
    ref_out, _, _ = reference(qkv, keys, values, [past], [n], cos, sin, cache)
    np.testing.assert_allclose(at_once, ref_out, atol=2e-4)


@CACHES
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_prompt_rows_on_amx_attend_on_bf16_tiles(head_dim: int, cache: type) -> None:
    """With prompt_rows, AMX runs the rows of prompt tokens on the bf16 tiles: their outputs
    are the bf16 reference's (queries, keys, softmax numerators and values rounded to bf16),
    far closer to it than to exact attention; a prompt's queries get the same floats alone, among
    other rows and in chunks on top of the cache; generated tokens (a decode, a verification,
    recomputed ones after a prompt's in its row) keep the float path's floats bit for bit.
    Builds without AMX ignore the roles."""
    rng = np.random.default_rng(head_dim + 1)
    angles = rng.uniform(0, 2 * np.pi, (POSITIONS, head_dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    # a prompt of 70 (three 32-token blocks: the last short), a chunk of 40 on 33 cached
    # tokens, a decode and a verification of 5 (generated: role 2), and a prompt of 20 with 6
    # generated tokens after it (recomputed after a preemption)
    past, query = [0, 33, 40, 20, 0], [70, 40, 1, 5, 26]
    roles = np.concatenate([np.full(n, PROMPT_ROLE if r < 2 else EITHER_ROLE, np.uint8)
                            for r, n in enumerate(query)])
    roles[-6 - 20:-6] = PROMPT_ROLE
    shape = (len(past), KV_HEADS, CAPACITY, head_dim)
    keys, values = (encode(rng.standard_normal(shape), cache) for _ in range(2))
    qkv = (rng.standard_normal((sum(query), (HEADS + 2 * KV_HEADS) * head_dim)) * 2
           ).astype(np.float32)

    def run(target: str, rows: list[int], tokens: list[np.ndarray], start: list[int],
            key_cache: np.ndarray, value_cache: np.ndarray, with_roles: bool = True
            ) -> np.ndarray:
        sess = session(head_dim, len(rows), cos, sin, target, cache, with_roles)
        lengths = [len(t) for t in tokens]
        feeds = {"qkv": np.concatenate(tokens), "past_key": key_cache[rows],
                 "past_value": value_cache[rows], "past_lens": np.array(start, np.int32),
                 "query_lens": np.array(lengths, np.int32)}
        if with_roles:
            feeds[PROMPT_ROWS] = np.concatenate([roles_of[r][:len(t)]
                                                 for r, t in zip(rows, tokens)])
        out, new_keys, new_values = sess.run(None, feeds)
        key_cache[rows], value_cache[rows] = new_keys, new_values
        return out

    bounds = np.cumsum(query)[:-1]
    tokens, roles_of = np.split(qkv, bounds), np.split(roles, bounds)
    everything = list(range(len(query)))
    for target in FLOAT_TARGETS:  # no AMX: the roles change nothing
        if target in SUPPORTED:
            np.testing.assert_array_equal(
                run(target, everything, tokens, past, tiles(keys), values.copy()),
                run(target, everything, tokens, past, tiles(keys), values.copy(), False))
    skip_unless_runnable("avx512_amx")
    out = run("avx512_amx", everything, tokens, past, tiles(keys), values.copy())
    exact, _, _ = reference(qkv, keys, values, past, query, cos, sin, cache)
    rounded, _, _ = reference(qkv, keys, values, past, query, cos, sin, cache, (0, 1, 4))
    prompt = roles == PROMPT_ROLE
    error, gap = np.abs(out - rounded)[prompt].max(), np.abs(exact - rounded)[prompt].max()
    assert error < gap / 4, (error, gap)
    float_path = run("avx512_vnni", everything, tokens, past, tiles(keys), values.copy(), False)
    np.testing.assert_array_equal(out[~prompt], float_path[~prompt])
    # the prompt alone, and in chunks of 32 and 38 (the second reading the first's keys)
    np.testing.assert_array_equal(
        run("avx512_amx", [0], tokens[:1], [0], tiles(keys), values.copy()), out[:70])
    key_cache, value_cache = tiles(keys), values.copy()
    chunked = [run("avx512_amx", [0], [tokens[0][:32]], [0], key_cache, value_cache),
               run("avx512_amx", [0], [tokens[0][32:]], [32], key_cache, value_cache)]
    np.testing.assert_array_equal(np.concatenate(chunked), out[:70])
    np.testing.assert_array_equal(  # the mixed row's prompt tokens: as a prompt alone
        run("avx512_amx", [4], [tokens[4][:20]], [0], tiles(keys), values.copy()),
        out[-26:-6])


def test_bad_lengths_are_clear_errors() -> None:
    head_dim = 16
    cos = np.ones((POSITIONS, head_dim // 2), np.float32)
    sess = session(head_dim, 2, cos, np.zeros_like(cos))
    keys = np.zeros((2, KV_HEADS, CAPACITY // KEY_TILE, head_dim, KEY_TILE), np.float32)
    values = np.zeros((2, KV_HEADS, CAPACITY, head_dim), np.float32)

    def run(past: list[int], query: list[int]) -> None:
        qkv = np.zeros((sum(query), (HEADS + 2 * KV_HEADS) * head_dim), np.float32)
        sess.run(None, {"qkv": qkv, "past_key": keys, "past_value": values,
                        "past_lens": np.array(past, np.int32),
                        "query_lens": np.array(query, np.int32)})

    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                       match="row 1 reaches position 97 beyond the cache capacity"):
        run([0, CAPACITY], [1, 1])
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                       match="query_lens must add up"):
        sess.run(None, {"qkv": np.zeros((3, (HEADS + 2 * KV_HEADS) * head_dim), np.float32),
                        "past_key": keys, "past_value": values,
                        "past_lens": np.zeros(2, np.int32), "query_lens": np.ones(2, np.int32)})
    run([CAPACITY - 1, 0], [1, 0])  # the last position is fine


def swiglu_session(per_token: bool, target: str = "", width: int = 32) -> ort.InferenceSession:
    outputs = ["act", "scale"] if per_token else ["act"]
    node = helper.make_node("SwiGLU", ["gate_up"], outputs, domain=DOMAIN)
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "swiglu", [info("gate_up", F32, ["tokens", 2 * width])],
        [info("act", F32, ["tokens", width])] + [info("scale", F32, ["tokens", 1])] * per_token)
    return ops_session(graph, target)


@pytest.mark.parametrize("target", FLOAT_TARGETS)
def test_swiglu_and_its_per_token_scale(target: str) -> None:
    skip_unless_runnable(target)
    rng = np.random.default_rng(0)
    gate_up = (rng.standard_normal((5, 64)) * 4).astype(np.float32)
    gate_up[1, 32:] *= 1000.0  # an outlier token
    gate_up[3, 32:] = 0.0  # a token of zeros
    gate, up = gate_up[:, :32].astype(np.float64), gate_up[:, 32:].astype(np.float64)
    ref = gate / (1 + np.exp(-gate)) * up

    (act,) = swiglu_session(per_token=False, target=target).run(None, {"gate_up": gate_up})
    np.testing.assert_allclose(act, ref, rtol=1e-5, atol=1e-6)

    scaled, scale = swiglu_session(per_token=True, target=target).run(None, {"gate_up": gate_up})
    peak = np.abs(ref).max(axis=1, keepdims=True)
    np.testing.assert_allclose(scale[[0, 1, 2, 4]], peak[[0, 1, 2, 4]], rtol=1e-5)
    assert scale[3, 0] == np.float32(1e-30) and not scaled[3].any()  # zeros stay zeros
    np.testing.assert_allclose(scaled * scale, act, rtol=1e-5, atol=1e-6)
    assert np.abs(scaled).max(axis=1)[[0, 1, 2, 4]] == pytest.approx(1.0, rel=1e-6)


def skip_rms_norm_session(width: int, gamma: np.ndarray, target: str,
                          op: str = "SkipRMSNorm") -> ort.InferenceSession:
    """SkipRMSNorm alone, or (`op` SkipSimplifiedLayerNormalization) ONNX Runtime's own."""
    outputs, domain = (["y", "sum"], DOMAIN) if op == "SkipRMSNorm" else (
        ["y", "", "", "sum"], "com.microsoft")
    node = helper.make_node(op, ["x", "residual", "gamma"], outputs, domain=domain,
                            epsilon=1e-5)
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node], "skip_rms_norm", [info(n, F32, ["tokens", width]) for n in ("x", "residual")],
        [info(n, F32, ["tokens", width]) for n in ("y", "sum")],
        [numpy_helper.from_array(gamma, "gamma")])
    return ops_session(graph, target)


@pytest.mark.parametrize("target", FLOAT_TARGETS)
def test_skip_rms_norm_against_numpy_and_onnx_runtime(target: str) -> None:
    skip_unless_runnable(target)
    rng = np.random.default_rng(0)
    width = 200  # not a multiple of a vector's 16 floats
    x, residual = (rng.standard_normal((40, width)).astype(np.float32) * 3 for _ in range(2))
    x[7] *= 1e4  # an outlier row
    x[9], residual[9] = 0.0, 0.0  # a row of zeros: epsilon keeps it finite
    gamma = rng.uniform(0.5, 1.5, width).astype(np.float32)
    feed = {"x": x, "residual": residual}
    y, total = skip_rms_norm_session(width, gamma, target).run(None, feed)
    assert np.array_equal(total, x + residual)
    s = total.astype(np.float64)
    ref = s / np.sqrt((s * s).mean(axis=1, keepdims=True) + 1e-5) * gamma
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-7)
    assert not y[9].any()
    theirs, _ = skip_rms_norm_session(width, gamma, "", "SkipSimplifiedLayerNormalization").run(
        None, feed)
    np.testing.assert_allclose(y, theirs, rtol=2e-6, atol=1e-7)
    # A row's floats are its own, whatever shares the call.
    for row in (0, 7, 39):
        alone, _ = skip_rms_norm_session(width, gamma, target).run(
            None, {"x": x[row:row + 1], "residual": residual[row:row + 1]})
        assert np.array_equal(alone[0], y[row])


def block_session(k: int, n: int, bits: int, weights: np.ndarray, target: str = "",
                  prompt_rows: bool = False, swiglu: bool = False) -> ort.InferenceSession:
    """BlockLinear alone (its block the weights' records'); with `prompt_rows`, fed its rows'
    roles too; with `swiglu`, fed gate_up [tokens, 2K] (its width left to the op to check)."""
    roles = [PROMPT_ROWS] if prompt_rows else []
    fused = {"swiglu": 1} if swiglu else {}
    block = (weights.shape[2] - 64) * 8 // (16 * bits)  # (a record: 16 rows' codes, 64 bytes)
    node = helper.make_node("BlockLinear", ["x", "w", *roles], ["y"], domain=DOMAIN, K=k, N=n,
                            bits=bits, block=block, **fused)
    info = helper.make_tensor_value_info
    inputs = [info("x", F32, ["tokens", "width" if swiglu else k])]  # (the op checks 2K)
    inputs += [info(PROMPT_ROWS, TensorProto.UINT8, ["tokens"])] if prompt_rows else []
    graph = helper.make_graph([node], "block_linear", inputs, [info("y", F32, ["tokens", n])],
                              [numpy_helper.from_array(weights, "w")])
    return ops_session(graph, target)


def random_blocks(rng: np.random.Generator, n: int, blocks: int, bits: int, block: int = 32
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes, and fp16-valued scales and minimums (as the records keep them)."""
    q = rng.integers(0, 2**bits, (n, blocks, block), dtype=np.uint8)
    scale = rng.uniform(0.001, 0.05, (n, blocks)).astype(np.float16).astype(np.float32)
    minimum = -rng.uniform(0, 0.3, (n, blocks)).astype(np.float16).astype(np.float32)
    return q, scale, minimum


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def int8_blocks(x: np.ndarray, blocks: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """x [T, K] zero-padded to blocks of `block` and quantized per block as the op does:
    (int8 values, scale per block) with x ~ values * scale."""
    t, k = x.shape
    padded = np.zeros((t, blocks * block))
    padded[:, :k] = x
    padded = padded.reshape(t, blocks, block)
    scale = np.abs(padded).max(axis=-1, keepdims=True) / 127
    values = np.round(np.divide(padded, scale, out=np.zeros_like(padded), where=scale > 0))
    return values, scale


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k, n, block", [(64, 48, 32), (40, 20, 32), (576, 960, 32),
                                         (40, 20, 128), (576, 960, 128), (2048, 64, 128)])
def test_block_linear_matches_reference(target: str, bits: int, k: int, n: int,
                                        block: int) -> None:
    """Blocks of 32 or 128 inputs with a float scale and minimum (Q4_1-style): the op computes,
    on every token count (its 1- to 8-token tiles, AMX's 16-token ones, alone and in passes),
    the exact dot products of the int8-quantized activations (per block) with the 4- or 8-bit
    weights, and lands near the float product; in every build of it this CPU can run."""
    skip_unless_runnable(target)
    rng = np.random.default_rng(k + n + bits + block)
    blocks = -(-k // block)
    q = rng.integers(0, 2**bits, (n, blocks, block), dtype=np.uint8)
    scale = rng.uniform(0.001, 0.05, (n, blocks)) * 16 / 2**bits  # weights of the same spread
    scale = scale.astype(np.float16).astype(np.float32)
    minimum = -rng.uniform(0, 0.3, (n, blocks)).astype(np.float16).astype(np.float32)
    w = (q * scale[..., None] + minimum[..., None]).astype(np.float64)  # [n, blocks, block]
    sess = block_session(k, n, bits, pack_blocks(QuantBlocks(q, scale, minimum, bits)),
                         target)
    for tokens in (1, 2, 3, 4, 7, 37, 70):
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        if k > block:
            x[0, :block] = 0.0  # an all-zero block
        (y,) = sess.run(None, {"x": x})
        values, xs = int8_blocks(x, blocks, block)
        dots = np.einsum("tbi,nbi->tnb", values, q.astype(np.float64))
        ref = (dots * scale[None] * xs[..., 0][:, None, :]).sum(-1)
        ref += (minimum[None] * (values.sum(-1) * xs[..., 0])[:, None, :]).sum(-1)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        exact = x.astype(np.float64) @ w.reshape(n, -1)[:, :k].T
        assert np.abs(y - exact).max() < 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_block_linear_on_amx_is_the_vnni_result_bit_for_bit(bits: int, block: int) -> None:
    """AMX's 16-token tiles give the VNNI tiles' floats exactly, on every token count around
    the tile edges and where AMX takes over, and in passes of several tiles (up to 112), with N
    and K not whole records: so a token's result does not depend on how many tokens share its
    call (each row alone gives it too). The largest dot products too (all codes at their top,
    x of one sign)."""
    if "avx512_amx" not in SUPPORTED:
        pytest.skip("this CPU has no AMX-INT8, or the OS does not let this process use it")
    rng = np.random.default_rng(bits)
    for k, n in ((200, 37), (576, 96)):
        blocks = -(-k // block)
        weights = pack_blocks(QuantBlocks(
            rng.integers(0, 2**bits, (n, blocks, block), dtype=np.uint8),
            rng.uniform(0.001, 0.05, (n, blocks)).astype(np.float32),
            -rng.uniform(0, 0.3, (n, blocks)).astype(np.float32), bits))
        amx, vnni = (block_session(k, n, bits, weights, t) for t in ("avx512_amx", "avx512_vnni"))
        for tokens in [*range(1, 41), 47, 48, 49, 64, 80, 96, 112]:
            x = rng.standard_normal((tokens, k)).astype(np.float32)
            (y,) = amx.run(None, {"x": x})
            np.testing.assert_array_equal(y, vnni.run(None, {"x": x})[0], err_msg=f"{tokens}")
        for t in (0, 17, 63, 111):  # the last call's rows, each alone
            np.testing.assert_array_equal(y[t], amx.run(None, {"x": x[t:t + 1]})[0][0])
    top = np.full((n, blocks, block), 2**bits - 1, dtype=np.uint8)
    weights = pack_blocks(QuantBlocks(top, np.full((n, blocks), 2**-6, np.float32),
                                      np.zeros((n, blocks), np.float32), bits))
    amx, vnni = (block_session(k, n, bits, weights, t) for t in ("avx512_amx", "avx512_vnni"))
    x = np.repeat(np.float32([[1], [-1]]), 16, axis=0) * np.ones((32, k), np.float32)
    (y,) = amx.run(None, {"x": x})
    np.testing.assert_array_equal(y, vnni.run(None, {"x": x})[0])
    np.testing.assert_allclose(y[0], 2**-6 * (2**bits - 1) * k, rtol=1e-5)


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_prompt_rows_on_amx_are_bf16_products_whatever_shares_their_call(bits: int,
                                                                         block: int) -> None:
    """On AMX, prompt rows run in bf16: the weights q * scale + min (one fp32 rounding) and
    the activations rounded to bf16, their products summed in fp32 (within fp32's rounding of
    the sum, far inside the int8 path's error); a prompt row's result is the same bit for bit
    with 1, 5, 16, 40 or 256 prompt rows in the call (256 take larger tasks) and with generated
    rows between them, which get the int8 path's result (the VNNI build's, on those rows alone)."""
    if "avx512_amx" not in SUPPORTED:
        pytest.skip("this CPU has no AMX (INT8 and BF16), or the OS does not let this process "
                    "use it: prompt rows take the int8 path like the others")
    rng = np.random.default_rng(bits + 10)
    for k, n in ((200, 37), (576, 96)):
        blocks = -(-k // block)
        q, scale, minimum = random_blocks(rng, n, blocks, bits, block)
        weights = pack_blocks(QuantBlocks(q, scale, minimum, bits))
        w = q * scale[..., None].astype(np.float64) + minimum[..., None]  # exact: fp32's FMA
        w = bf16(w.astype(np.float32)).reshape(n, -1)[:, :k].astype(np.float64)
        amx = block_session(k, n, bits, weights, "avx512_amx", prompt_rows=True)
        vnni = block_session(k, n, bits, weights, "avx512_vnni")
        x = rng.standard_normal((40, k)).astype(np.float32)
        (y,) = amx.run(None, {"x": x, PROMPT_ROWS: np.ones(40, np.uint8)})
        xb = bf16(x).astype(np.float64)
        bound = k * 2.0**-24 * (np.abs(xb) @ np.abs(w).T)
        assert np.all(np.abs(y - xb @ w.T) <= bound)
        int8 = vnni.run(None, {"x": x})[0]
        assert np.abs(int8 - xb @ w.T).max() > 10 * bound.max()  # the bound tells them apart
        for count in (1, 5, 16, 40):
            (part,) = amx.run(None, {"x": x[:count], PROMPT_ROWS: np.ones(count, np.uint8)})
            np.testing.assert_array_equal(part, y[:count], err_msg=f"{count} prompt rows")
        prompt = rng.random(40) < 0.5
        (mixed,) = amx.run(None, {"x": x, PROMPT_ROWS: prompt.astype(np.uint8)})
        np.testing.assert_array_equal(mixed[prompt], y[prompt])
        np.testing.assert_array_equal(mixed[~prompt], vnni.run(None, {"x": x[~prompt]})[0])
    # 256 rows of K 2048 are 1 MB of A tiles: tasks of 16 groups in passes over K (2100
    # outputs: and a last of 4); 40 rows hold the C tiles over all of K (bf16_plan in ops.cc)
    k, n = 2048, 2100
    weights = pack_blocks(QuantBlocks(*random_blocks(rng, n, k // block, bits, block), bits))
    amx = block_session(k, n, bits, weights, "avx512_amx", prompt_rows=True)
    x = rng.standard_normal((256, k)).astype(np.float32)
    (y,) = amx.run(None, {"x": x, PROMPT_ROWS: np.ones(256, np.uint8)})
    (part,) = amx.run(None, {"x": x[:40], PROMPT_ROWS: np.ones(40, np.uint8)})
    np.testing.assert_array_equal(y[:40], part)


@pytest.mark.parametrize("bits, block, rows", [(4, 32, 24), (8, 32, 48), (8, 128, None)])
def test_generated_rows_free_to_take_either_path_take_bf16_in_big_calls(
        bits: int, block: int, rows: int | None) -> None:
    """Rows of role 2 (generated tokens of an engine that is not batch-invariant) get the int8
    path's result (the VNNI build's) in a call of fewer than `rows` of them, where it is the
    faster path on AMX, and the bf16 path's (as prompt rows, role 1) in a call of `rows` or
    more (8-bit blocks of 128: never, their int8 path is the faster at any count), or beside a
    prompt row, whose dequantized weights they share."""
    if "avx512_amx" not in SUPPORTED:
        pytest.skip("this CPU has no AMX (INT8 and BF16), or the OS does not let this process "
                    "use it: every row takes the int8 path")
    rng = np.random.default_rng(bits + 30)
    k, n = 200, 37
    weights = pack_blocks(QuantBlocks(*random_blocks(rng, n, -(-k // block), bits, block), bits))
    amx = block_session(k, n, bits, weights, "avx512_amx", prompt_rows=True)
    vnni = block_session(k, n, bits, weights, "avx512_vnni")
    x = rng.standard_normal((rows or 1024, k)).astype(np.float32)

    def run(x: np.ndarray, roles: np.ndarray) -> np.ndarray:
        return amx.run(None, {"x": x, PROMPT_ROWS: roles.astype(np.uint8)})[0]

    either = np.full(len(x), EITHER_ROLE)
    bf16_rows = run(x, np.full(len(x), PROMPT_ROLE))
    if rows:
        np.testing.assert_array_equal(run(x, either), bf16_rows)
    few = run(x[:-1], either[:-1])
    np.testing.assert_array_equal(few, vnni.run(None, {"x": x[:-1]})[0])
    assert not np.array_equal(few, bf16_rows[:-1])  # the two paths tell apart
    beside_a_prompt = np.full(4, EITHER_ROLE)
    beside_a_prompt[2] = PROMPT_ROLE
    np.testing.assert_array_equal(run(x[:4], beside_a_prompt), bf16_rows[:4])
    np.testing.assert_array_equal(run(x, np.full(len(x), INT8_ROLE)),
                                  vnni.run(None, {"x": x})[0])


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_large_prompt_calls_blocked_for_the_cache_give_the_rows_small_calls_give(
        bits: int, block: int) -> None:
    """A call of more than 256 prompt rows runs blocked for the L2 (ops.cc bf16_plan): token
    chunks of 8 tiles, K blocks of 64, C tiles through memory between K blocks, stored to y
    directly where the rows are consecutive. Each row's result is the same bit for bit as in
    calls of 40 rows (C held over all of K), also with generated rows between the prompt rows."""
    if "avx512_amx" not in SUPPORTED:
        pytest.skip("this CPU has no AMX (INT8 and BF16), or the OS does not let this process "
                    "use it: prompt rows take the int8 path like the others")
    rng = np.random.default_rng(bits + 20)
    k, n = 2200, 200  # 69 or 72 parts, the last partial: 2 K blocks; 13 groups, the last partial
    weights = pack_blocks(QuantBlocks(*random_blocks(rng, n, -(-k // block), bits, block), bits))
    amx = block_session(k, n, bits, weights, "avx512_amx", prompt_rows=True)
    x = rng.standard_normal((330, k)).astype(np.float32)  # 21 token tiles: chunks 8, 8, 5
    (y,) = amx.run(None, {"x": x, PROMPT_ROWS: np.ones(330, np.uint8)})
    for start in range(0, 330, 40):
        rows = slice(start, start + 40)
        count = len(x[rows])
        (part,) = amx.run(None, {"x": x[rows], PROMPT_ROWS: np.ones(count, np.uint8)})
        np.testing.assert_array_equal(y[rows], part, err_msg=f"rows {start}-{start + count}")
    prompt = np.ones(330, bool)
    prompt[rng.choice(330, 12, replace=False)] = False  # 318 prompt rows, still blocked
    (mixed,) = amx.run(None, {"x": x, PROMPT_ROWS: prompt.astype(np.uint8)})
    np.testing.assert_array_equal(mixed[prompt], y[prompt])


@pytest.mark.parametrize("target", TARGETS[1:])
def test_builds_without_amx_run_prompt_rows_on_the_int8_path(target: str) -> None:
    """prompt_rows changes nothing where there is no AMX: every row the int8 path's."""
    skip_unless_runnable(target)
    rng = np.random.default_rng(3)
    k, n, bits = 96, 40, 4
    weights = pack_blocks(QuantBlocks(*random_blocks(rng, n, 3, bits), bits))
    x = rng.standard_normal((20, k)).astype(np.float32)
    (y,) = block_session(k, n, bits, weights, target, prompt_rows=True).run(
        None, {"x": x, PROMPT_ROWS: np.ones(20, np.uint8)})
    np.testing.assert_array_equal(y, block_session(k, n, bits, weights, target).run(
        None, {"x": x})[0])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits, block", [(4, 32), (8, 32), (8, 128)])
def test_block_linear_fed_gate_up_is_swiglu_then_block_linear(target: str, bits: int,
                                                              block: int) -> None:
    """swiglu = 1 (a down projection fed gate_up [T, 2K]): bit for bit what the SwiGLU op and
    BlockLinear of its output give, on every path of every build this CPU runs: a few rows,
    AMX's int8 tiles (20), its bf16 path (40 prompt rows, or generated rows free to take it),
    and prompt rows beside generated ones."""
    skip_unless_runnable(target)
    rng = np.random.default_rng(bits + 50)
    k, n = 200, 37
    weights = pack_blocks(QuantBlocks(*random_blocks(rng, n, -(-k // block), bits, block), bits))
    fused = block_session(k, n, bits, weights, target, prompt_rows=True, swiglu=True)
    plain = block_session(k, n, bits, weights, target, prompt_rows=True)
    swiglu = swiglu_session(False, target, width=k)
    mixed = (rng.random(40) < 0.5).astype(np.uint8)
    for tokens, roles in ((1, INT8_ROLE), (3, PROMPT_ROLE), (20, INT8_ROLE), (40, PROMPT_ROLE),
                          (40, EITHER_ROLE), (40, mixed)):
        gate_up = (rng.standard_normal((tokens, 2 * k)) * 3).astype(np.float32)
        rows = np.broadcast_to(np.uint8(roles), (tokens,)).copy()
        (act,) = swiglu.run(None, {"gate_up": gate_up})
        (want,) = plain.run(None, {"x": act, PROMPT_ROWS: rows})
        (got,) = fused.run(None, {"x": gate_up, PROMPT_ROWS: rows})
        np.testing.assert_array_equal(got, want, err_msg=f"{tokens} rows, roles {roles}")
    with pytest.raises(Exception, match=r"x must be \[\.\.\., 2K\] \(swiglu: gate, up\)"):
        fused.run(None, {"x": gate_up[:, :k], PROMPT_ROWS: rows})


def test_block_linear_rejects_weights_of_another_shape() -> None:
    weights = pack_blocks(QuantBlocks(np.zeros((32, 2, 32), np.uint8),
                                      np.ones((32, 2), np.float32),
                                      np.zeros((32, 2), np.float32), 4))
    sess = block_session(96, 32, 4, weights)  # K = 96 needs 3 blocks
    with pytest.raises(Exception, match=r"weights must be \[ceil\(N/16\), ceil\(K/32\), 320\]"):
        sess.run(None, {"x": np.zeros((1, 96), np.float32)})
    weights = pack_blocks(QuantBlocks(np.zeros((32, 3, 32), np.uint8),
                                      np.ones((32, 3), np.float32),
                                      np.zeros((32, 3), np.float32), 4))
    sess = block_session(96, 32, 4, weights, prompt_rows=True)
    with pytest.raises(Exception, match="prompt_rows needs one entry per token row of x"):
        sess.run(None, {"x": np.zeros((3, 96), np.float32), PROMPT_ROWS: np.ones(2, np.uint8)})
    wide = pack_blocks(QuantBlocks(np.zeros((32, 1, 128), np.uint8), np.ones((32, 1), np.float32),
                                   np.zeros((32, 1), np.float32), 8))
    with pytest.raises(Exception, match=r"weights must be \[ceil\(N/16\), ceil\(K/128\), 2112\]"):
        block_session(256, 32, 8, wide).run(None, {"x": np.zeros((1, 256), np.float32)})
    node = helper.make_node("BlockLinear", ["x", "w"], ["y"], domain=DOMAIN, K=96, N=32, bits=4,
                            block=64)
    info = helper.make_tensor_value_info
    graph = helper.make_graph([node], "block_linear", [info("x", F32, ["tokens", 96])],
                              [info("y", F32, ["tokens", 32])],
                              [numpy_helper.from_array(weights, "w")])
    with pytest.raises(Exception, match="BlockLinear: block must be 32 or 128"):
        ops_session(graph).run(None, {"x": np.zeros((1, 96), np.float32)})


@pytest.mark.parametrize("target", FLOAT_TARGETS)
@pytest.mark.parametrize("bits, block", [(4, 32), (8, 32), (8, 128)])
def test_block_gather_dequantizes_the_rows_exactly(target: str, bits: int, block: int) -> None:
    """An embedding kept in BlockLinear's blocks: each gathered row is exactly the row's
    q * scale + min (fp32 holds a product of an fp16 and a code of 8 bits or fewer exactly),
    K need not be a whole number of blocks, and an id past N is an error, not a stray read."""
    skip_unless_runnable(target)
    rng = np.random.default_rng(bits)
    k, n = 40 if block == 32 else 200, 37  # K not whole blocks
    count = -(-k // block)
    blocks = QuantBlocks(rng.integers(0, 2**bits, (n, count, block), dtype=np.uint8),
                         rng.uniform(-0.1, 0.1, (n, count)).astype(np.float32),
                         rng.uniform(-1, 1, (n, count)).astype(np.float32), bits)
    node = helper.make_node("BlockGather", ["ids", "w"], ["rows"], domain=DOMAIN, K=k, N=n,
                            bits=bits, block=block)
    info = helper.make_tensor_value_info
    sess = ops_session(helper.make_graph(
        [node], "block_gather", [info("ids", TensorProto.INT64, ["tokens"])],
        [info("rows", F32, ["tokens", k])],
        [numpy_helper.from_array(pack_blocks(blocks), "w")]), target)
    ids = np.array([0, 36, 5, 5, 17, 16, 15], np.int64)
    (rows,) = sess.run(None, {"ids": ids})
    np.testing.assert_array_equal(rows, blocks.dequantize()[ids, :k])
    with pytest.raises(Exception, match="BlockGather: id 37 is not below N = 37"):
        sess.run(None, {"ids": np.array([3, 37], np.int64)})


def test_loading_the_ops_leaves_subnormals_alone() -> None:
    """The library is linked without -ffast-math's crtfastmath.o, which would turn on
    flush-to-zero and denormals-are-zero for the whole process (numpy included) loading it."""
    for target in SUPPORTED:
        swiglu_session(per_token=False, target=target)
    assert sys.float_info.min / 2 > 0
    assert np.float32(1e-40) > 0 and np.float32(1e-40) * np.float32(0.5) > 0
def test_dispatch_picks_the_best_build_and_names_bad_targets() -> None:
    """cpuid picks the first build this CPU runs; a forced target it cannot run, or no
    target at all, fails the session's setup with a message naming it."""
    assert SUPPORTED[-1] == "portable" and set(SUPPORTED) <= set(TARGETS)
    assert SUPPORTED == [t for t in TARGETS if t in SUPPORTED]  # best first
    assert kernel_target() == SUPPORTED[0]
    with mock.patch.dict(os.environ, {TARGET_ENV: "avx2"}):
        assert kernel_target() == "avx2"
    with pytest.raises(Exception, match="NANO_VLLM_ONNX_KERNEL_TARGET=sse9 is not a target"):
        swiglu_session(per_token=False, target="sse9")
    if unsupported := [t for t in TARGETS if t not in SUPPORTED]:
        with pytest.raises(Exception, match="this CPU cannot run it"):
            swiglu_session(per_token=False, target=unsupported[0])
