"""int8 and int4 weights stay close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from ml_dtypes import bfloat16
from onnx import TensorProto, helper

from nanovllm_onnx import LLM, SamplingParams
from nanovllm_onnx.convert.converter import convert
from nanovllm_onnx.convert.graph import GraphBuilder, pack_blocks, quantize_blocks
from tests.conftest import VOCAB, default_model_or_skip, ops_session, random_prompts

PROMPTS = random_prompts(4, seed=21, lo=20, hi=40)


def relative_rms(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(((x - ref) ** 2).mean() / (ref**2).mean()))


def run_linear(weights: str, w: np.ndarray, x: np.ndarray, per_token: bool = False,
               bias: np.ndarray | None = None) -> np.ndarray:
    """x @ w.T (+ bias) through the one linear layer GraphBuilder emits in `weights` format;
    `per_token` (int8): x goes in divided by each token's max |x|, as SwiGLU gives it."""
    g = GraphBuilder(weights)
    g.linear("x", "w", w, bias, token_scale="scale" if per_token else None)
    g.nodes[-1].output[0] = "y"
    info = helper.make_tensor_value_info
    inputs = [info("x", TensorProto.FLOAT, x.shape)]
    if per_token:
        inputs.append(info("scale", TensorProto.FLOAT, [len(x), 1]))
    graph = helper.make_graph(g.nodes, "linear", inputs,
                              [info("y", TensorProto.FLOAT, [len(x), len(w)])], g.initializers)
    session = ops_session(graph)
    if not per_token:
        return session.run(None, {"x": x})[0]
    scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-30)
    return session.run(None, {"x": x / scale, "scale": scale})[0]


# Gaussian weights: 4-bit blocks of 32 from min to max (a range of ~4.1 sigma in 15 steps)
# round each weight with an error of ~0.27 sigma / sqrt(12) ~ 8% of its size (measured 7.5%);
# per-channel int8 with 8-bit dynamically quantized activations stays near 1% (0.9%).
@pytest.mark.parametrize("weights,bound", [("int8", 0.02), ("int4", 0.12)])
def test_one_linear_layer_matches_its_quantization_error(weights: str, bound: float) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 96)).astype(np.float32)
    x = rng.standard_normal((7, 96)).astype(np.float32)
    err = relative_rms(run_linear(weights, w, x), x @ w.T)
    assert 0 < err < bound


def test_int8_activation_scale_per_token_keeps_other_tokens_exact() -> None:
    """One token 1000x larger than the others: one activation scale per tensor leaves the
    others a fraction of one quantization step (error near 100%); one per token does not,
    and a token of zeros gives the bias alone (no 0/0)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    x = rng.standard_normal((6, 96)).astype(np.float32)
    x[2] *= 1000.0
    x[5] = 0.0
    bias = rng.standard_normal(64).astype(np.float32)
    ref = x @ w.T + bias
    others = [0, 1, 3, 4]
    per_token = run_linear("int8", w, x, per_token=True, bias=bias)
    per_tensor = run_linear("int8", w, x, per_token=False, bias=bias)
    assert relative_rms(per_token[others], ref[others]) < 0.02
    assert relative_rms(per_token[2], ref[2]) < 0.02
    assert relative_rms(per_tensor[others], ref[others]) > 0.2
    assert np.array_equal(per_token[5], bias)


def prompt_logprobs(model: Path) -> np.ndarray:
    """The full next-token log-distribution at every prompt position, teacher-forced."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=VOCAB)
    outs = LLM(str(model)).generate(PROMPTS, params, use_tqdm=False)
    return np.concatenate([
        np.array([[lps[t].logprob for t in range(VOCAB)] for lps in o.prompt_logprobs[1:]])
        for o in outs])


# Through the whole tiny random model (2 layers, 7 quantized matmuls on each token's path,
# RMSNorms that rescale the errors) the per-matmul error grows about 5x: measured 3.9-4.2% for
# auto (its down projection in blocks of 128) and q8_0 alike, 6-7% for int8, 38-40% for int4
# and 48-49% for int4_all (its 4-bit LM head) of the logits' spread. The bounds leave room for
# that, and would catch a wrong scale, layout or transposition, which give errors of 100% and
# more.
@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("weights,bound", [("auto", 0.08), ("q8_0", 0.08), ("int8", 0.15),
                                           ("int4", 0.7), ("int4_all", 0.7)])
def test_quantized_model_stays_close_to_fp32(name: str, weights: str, bound: float,
                                             hf_models: dict[str, Path],
                                             converted: dict[str, Path], tmp_path: Path) -> None:
    assert convert(hf_models[name], tmp_path / weights, weights).weights == weights
    ref, q = prompt_logprobs(converted[name]), prompt_logprobs(tmp_path / weights)
    # Centre each row: a constant shift of a log-distribution is not an error.
    diff = (q - q.mean(1, keepdims=True)) - (ref - ref.mean(1, keepdims=True))
    assert np.sqrt((diff**2).mean() / ref.var(1).mean()) < bound


def block_widths(folder: Path) -> dict[str, set[int]]:
    """The `block` of each kind of BlockLinear and BlockGather in a converted graph, by K."""
    widths: dict[str, set[int]] = {}
    for node in onnx.load(folder / "model.onnx", load_external_data=False).graph.node:
        if node.op_type in ("BlockLinear", "BlockGather"):
            attrs = {a.name: a.i for a in node.attribute}
            widths.setdefault(f"{node.op_type} K={attrs['K']}", set()).add(attrs["block"])
    return widths


def test_auto_takes_blocks_of_128_where_k_is_a_multiple(hf_models: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """A float checkpoint's auto weights: 8-bit blocks of 128 inputs where K is a multiple of
    128 (the tiny model's down projection, K = 128), of 32 elsewhere (K = 64); q8_0 and int4
    keep blocks of 32 everywhere."""
    convert(hf_models["llama"], tmp_path / "auto", "auto")
    assert block_widths(tmp_path / "auto") == {
        "BlockGather K=64": {32}, "BlockLinear K=64": {32}, "BlockLinear K=128": {128}}
    for weights in ("q8_0", "int4"):
        convert(hf_models["llama"], tmp_path / weights, weights)
        assert set().union(*block_widths(tmp_path / weights).values()) == {32}


@pytest.mark.parametrize("weights,table_bits", [("int4", 8), ("int4_all", 4)])
def test_int4_all_keeps_the_vocabulary_table_in_4_bit_blocks(
        weights: str, table_bits: int, hf_models: dict[str, Path], tmp_path: Path) -> None:
    """int4 keeps the embedding (the tied LM head) in 8-bit blocks; int4_all, only when asked,
    rounds it to 4-bit blocks like the projections: the gather and the head read those."""
    convert(hf_models["llama"], tmp_path, weights)
    nodes = onnx.load(tmp_path / "model.onnx", load_external_data=False).graph.node
    bits = {n.op_type: next(a.i for a in n.attribute if a.name == "bits") for n in nodes
            if n.op_type == "BlockGather" or "logits" in n.output}
    assert bits == {"BlockGather": table_bits, "BlockLinear": table_bits}
    projections = {next(a.i for a in n.attribute if a.name == "bits") for n in nodes
                   if n.op_type == "BlockLinear" and "logits" not in n.output}
    assert projections == {4}


def test_converted_folder_keeps_its_weights(converted: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="already converted with fp32 weights"):
        LLM(str(converted["llama"]), weights="int8")


def test_gguf_q4_blocks_are_kept_exactly() -> None:
    """The default GGUF is Q4_1 with a Q8_0 embedding (the tied LM head): the Q4_1 blocks
    become BlockLinear records as they are (fp16 scale and minimum), and the embedding's 8-bit
    blocks come back exactly, so both dequantize to exactly what the gguf package dequantizes
    (Q/K rows un-permuted alike)."""
    from nanovllm_onnx.convert.gguf_source import load_gguf

    src = load_gguf(default_model_or_skip())
    assert len(src.quant_blocks) == 30 * 7 + 1  # every projection of the 30 layers, embedding
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight"):
        blocks, ref = src.quant_blocks[name], src.tensors[name]
        assert blocks.bits == 4
        np.testing.assert_array_equal(blocks.dequantize(), ref)
        np.testing.assert_array_equal(unpack(pack_blocks(blocks), 4), ref)
    embedding = src.tensors["model.embed_tokens.weight"]
    np.testing.assert_array_equal(unpack(pack_blocks(src.quant_blocks[
        "model.embed_tokens.weight"]), 8), embedding)
    np.testing.assert_array_equal(unpack(pack_blocks(quantize_blocks(embedding, 8)), 8), embedding)


def numpy_blocks(weight: np.ndarray, bits: int, symmetric: bool, block: int
                 ) -> tuple[np.ndarray, ...]:
    """The numpy reference of quantize_blocks (what it ran before the kernels library did)."""
    n, k = weight.shape
    w = np.zeros((n, -(-k // block) * block), np.float32)
    w[:, :k] = weight
    w = w.reshape(n, -1, block)
    tiny = np.finfo(np.float16).tiny

    def fp16(a: np.ndarray, toward: float | None = None) -> np.ndarray:
        h = a.astype(np.float16)
        if toward is not None:
            h = np.where(h < a if toward > 0 else h > a, np.nextafter(h, np.float16(toward)), h)
        return h.astype(np.float32)

    if symmetric:
        half = 2 ** (bits - 1)
        scale = fp16(np.maximum(np.abs(w).max(axis=-1) / (half - 1), tiny))
        low = fp16(-half * scale)
    else:
        low = fp16(w.min(axis=-1), toward=-np.inf)
        scale = fp16(np.maximum((w.max(axis=-1) - low) / (2**bits - 1), tiny), toward=np.inf)
    q = np.clip(np.rint((w - low[..., None]) / scale[..., None]), 0, 2**bits - 1)
    return q.astype(np.uint8), scale, low


@pytest.mark.parametrize("target", ["avx512_amx", "avx512_vnni", "avx2", "portable"])
def test_quantization_is_numpys_float32_arithmetic_bit_for_bit(target: str,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The kernels library quantizes as numpy's float32 arithmetic does, in every build:
    blocks of 32 and of 128 (rows split over threads, K and rows not whole blocks, constant,
    tiny and huge values, values on the codes' midpoints), packed in one pass as in two, and
    int8's per-channel codes; from bf16 as from the same values in float32."""
    from nanovllm_onnx.kernels import TARGET_ENV, quantize, supported_targets

    if target not in supported_targets():
        pytest.skip(f"this CPU cannot run the {target} build")
    monkeypatch.setenv(TARGET_ENV, target)
    rng = np.random.default_rng(5)
    cases = [rng.standard_normal((300, 1024), dtype=np.float32) * 0.02,
             rng.standard_normal((37, 100), dtype=np.float32), np.zeros((16, 64), np.float32),
             np.full((5, 40), 3.0, np.float32), rng.standard_normal((20, 64), np.float32) * 1e-6,
             -np.abs(rng.standard_normal((17, 96), np.float32)) * 1e4,
             rng.integers(-8, 8, (33, 64)).astype(np.float32) / 4 + 1 / 8]
    for w in cases:
        for bits, symmetric, block in ((4, False, 32), (8, True, 32), (8, False, 32),
                                       (4, True, 32), (8, False, 128), (4, False, 128)):
            blocks = quantize_blocks(w, bits, symmetric, block)
            q, scale, minimum = numpy_blocks(w, bits, symmetric, block)
            np.testing.assert_array_equal(blocks.q, q)
            np.testing.assert_array_equal(blocks.scale, scale)
            np.testing.assert_array_equal(blocks.minimum, minimum)
            np.testing.assert_array_equal(unpack(pack_blocks(blocks), bits)[:len(w)],
                                          (q * scale[..., None] + minimum[..., None]
                                           ).reshape(len(w), -1))
            # The converter's one pass (codes packed 16 rows at a time): the same records.
            np.testing.assert_array_equal(quantize.quantize_packed(w, bits, symmetric, block),
                                          pack_blocks(blocks))
        per_channel = np.maximum(np.abs(w).max(axis=1), 1e-12) / 127
        scale, qt = channels(w)
        np.testing.assert_array_equal(scale, per_channel)
        np.testing.assert_array_equal(
            qt, np.clip(np.rint(w / per_channel[:, None]), -127, 127).astype(np.int8).T)
        # Stacked parts (q, k, v) each into its columns: as the stacked weight.
        for a, b in zip(channels([w[:len(w) // 3], w[len(w) // 3:]]), (scale, qt)):
            np.testing.assert_array_equal(a, b)
        # A bf16 checkpoint's weights are read as they are: the same as their float32 values.
        half = w.astype(bfloat16)
        blocks, same = quantize_blocks(half, 4), quantize_blocks(half.astype(np.float32), 4)
        for field in ("q", "scale", "minimum"):
            np.testing.assert_array_equal(getattr(blocks, field), getattr(same, field))
        np.testing.assert_array_equal(quantize.quantize_packed(half, 4, False, 32),
                                      pack_blocks(same))
        for a, b in zip(channels(half), channels(half.astype(np.float32))):
            np.testing.assert_array_equal(a, b)


def channels(weight: np.ndarray | list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """int8's scales and whole transposed codes, made 7 inputs at a time (not whole chunks)."""
    from nanovllm_onnx.kernels import quantize

    scale, chunks = quantize.quantize_channels(weight, rows=7)
    return scale, np.concatenate(list(chunks))


def unpack(records: np.ndarray, bits: int) -> np.ndarray:
    """BlockLinear's records [groups, blocks, bytes] (blocks of 32 or 128: parts of 32 one after
    another) back to float weights [groups * 16, K]."""
    groups, blocks, size = records.shape
    parts = (size - 64) * 8 // (16 * 32 * bits)
    # [g, b, part, byte vector, row, c]
    values = records[..., :-64].reshape(groups, blocks, parts, -1, 16, 4)
    if bits == 4:  # vectors 2p and 2p + 1: low and high nibbles
        values = np.stack([values & 0x0F, values >> 4], axis=4).reshape(
            groups, blocks, parts, 8, 16, 4)
    q = values.transpose(0, 4, 1, 2, 3, 5).reshape(groups * 16, blocks, parts * 32
                                                    ).astype(np.float32)
    halves = np.ascontiguousarray(records[..., -64:]).view(np.float16).astype(np.float32)
    scale, minimum = (h.transpose(0, 2, 1).reshape(groups * 16, blocks)
                      for h in (halves[..., :16], halves[..., 16:]))
    return (q * scale[..., None] + minimum[..., None]).reshape(groups * 16, -1)


def test_big_decode_steps_take_bf16_on_amx_unless_batch_invariant(hf_models: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """24 sequences decoding together (int4): on AMX their steps are big enough that the
    generated tokens take BlockLinear's bf16 path (test_kernels: role 2), so their logprobs
    part from those each gets decoded alone (int8 path); with batch_invariant=True each
    sequence's are the same bit for bit batched or alone. Without AMX every generated token
    takes the int8 path: batched and alone the same in both engines."""
    from nanovllm_onnx.kernels import kernel_target

    convert(hf_models["llama"], tmp_path, "int4")
    prompts = random_prompts(24, seed=5, lo=5, hi=15)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2)

    def logprobs(llm: LLM, prompts: list[list[int]]) -> list[list[dict[int, float]]]:
        return [[{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                for o in llm.generate(prompts, params, use_tqdm=False)]

    alone = {}
    for invariant in (True, False):
        llm = LLM(str(tmp_path), batch_invariant=invariant, kv_cache_dtype="fp32",
                  enable_prefix_caching=False)
        batched = logprobs(llm, prompts)
        alone[invariant] = [logprobs(llm, [p])[0] for p in prompts]
        assert (batched == alone[invariant]) == (invariant or kernel_target() != "avx512_amx")
    assert alone[True] == alone[False]  # one row a step: the int8 path in both
