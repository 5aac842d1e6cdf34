"""Every GGUF quantization llama.cpp's presets write runs through BlockLinear from its own blocks,
against `gguf.quants.dequantize` (the reference).

Tensors are made by gguf's quantizer where it has one (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), else as
raw blocks laid out as llama.cpp lays them out (random codes and sub-block scales, sane fp16
super-block scales), which covers every bit of the unpacking rather than one quantizer's habits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize
from onnx import TensorProto, helper, numpy_helper

from nanovllm_onnx.convert import graph
from nanovllm_onnx.convert.gguf_blocks import file_blocks
from nanovllm_onnx.convert.graph import GraphBuilder
from nanovllm_onnx.convert.source import BlockRows
from tests.conftest import ops_session

T = GGMLQuantizationType
ROWS, COLS = 48, 512
QUANTIZED = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# Raw types: byte offset of the fp16 super-block scale d, and for those with minimums the
# offset of dmin and dmin / d, which centres the weights near zero (mean code x mean scale).
RAW = {T.Q2_K: (80, 82, 1.5), T.Q3_K: (108,), T.Q4_K: (0, 2, 7.5), T.Q5_K: (0, 2, 15.5),
       T.Q6_K: (208,), T.IQ4_NL: (0,)}
# The file's own values, exactly (fp16 scale and minimum, codes of 8 bits or fewer).
EXACT = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q3_K, T.IQ4_NL}
FP16_PRODUCTS = {T.Q4_K, T.Q5_K}  # d x a 6-bit scale (and dmin x a 6-bit min), rounded to fp16


def make_tensor(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator,
                std: float = 1.0) -> np.ndarray:
    """A [rows, cols] tensor of `qtype` as GGUF bytes, its weights' spread near `std`."""
    if qtype in QUANTIZED:
        return quantize((rng.standard_normal((rows, cols)) * std).astype(np.float32), qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    offset, *with_min = RAW[qtype]

    def set_scales(d: np.ndarray) -> np.ndarray:
        for at, value in [(offset, d), *([(with_min[0], d * with_min[1])] if with_min else [])]:
            raw[..., at:at + 2] = value.astype(np.float16)[..., None].view(np.uint8)
        return dequantize(raw.reshape(rows, -1), qtype)

    spread = set_scales(np.ones(raw.shape[:2], np.float32)).std()
    set_scales(rng.uniform(0.5, 1.5, raw.shape[:2]).astype(np.float32) * std / spread)
    return raw.reshape(rows, -1)


def block_linear(blocks: object, x: np.ndarray) -> np.ndarray:
    g = GraphBuilder("auto")
    g.linear("x", "w", blocks)
    g.nodes[-1].output[0] = "y"
    info = helper.make_tensor_value_info
    graph = helper.make_graph(g.nodes, "linear", [info("x", TensorProto.FLOAT, x.shape)],
                              [info("y", TensorProto.FLOAT, [len(x), ROWS])], g.initializers)
    sess = ops_session(graph)
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("qtype", [*QUANTIZED, *RAW], ids=lambda t: t.name)
def test_gguf_type_runs_from_its_blocks(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(int(qtype))
    raw = make_tensor(qtype, ROWS, COLS, rng)
    ref = dequantize(raw, qtype).reshape(ROWS, COLS).astype(np.float64)
    blocks = file_blocks(raw, qtype, ROWS, COLS)
    ours = blocks.dequantize().astype(np.float64)
    assert blocks.bits == (4 if qtype in (T.Q4_0, T.Q4_1, T.Q4_K) else 8)

    # The weights the op holds, against the file's.
    if qtype in EXACT:
        np.testing.assert_array_equal(ours, ref)
    elif qtype in FP16_PRODUCTS:  # scale and minimum each within fp16's half ulp (2^-11)
        w = ours.reshape(ROWS, -1, 32)
        minimum = blocks.minimum[..., None]
        slack = 2.0**-11 * (np.abs(w - minimum) + np.abs(minimum))
        assert np.all(np.abs(w - ref.reshape(w.shape)) <= slack * 1.001)
    else:  # rounded again to 8 bits: within half a step, a fraction of the file's own step
        step = blocks.scale.astype(np.float16).astype(np.float64)[..., None]
        assert np.all(np.abs(ours - ref).reshape(ROWS, -1, 32) <= step * 0.5001)
        assert np.abs(ours - ref).mean() < 0.3 * np.abs(ref).mean() / 2**5

    # Through the op, for 1 to 5 tokens (its token tiles): the only other error is the
    # activations' rounding to int8 per block of 32, at most half a step (max |x| / 127)
    # for each input, so |y - x W^T| <= (step / 2) |W|^T + |x| |W_ours - W_file|^T.
    for tokens in (1, 3, 5):
        x = rng.standard_normal((tokens, COLS)).astype(np.float32)
        y = block_linear(blocks, x).astype(np.float64)
        half_step = np.repeat(np.abs(x).reshape(tokens, -1, 32).max(-1) / 127 / 2, 32, axis=1)
        bound = half_step @ np.abs(ours).T + np.abs(x) @ np.abs(ours - ref).T
        err = np.abs(y - x.astype(np.float64) @ ref.T)
        assert np.all(err <= bound * 1.0001 + 1e-5 * np.abs(y).max()), qtype.name
        assert err.max() > 0  # the bound is not vacuous: activations are rounded


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_vocabulary_table_packs_a_range_of_rows_at_a_time(
        qtype: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF's embedding and LM head are packed by ranges of rows (an 8B's whole Q6_K head
    took 4 GB): the same bytes as packed whole."""
    rows = 160
    raw = make_tensor(qtype, rows, COLS, np.random.default_rng(3))
    monkeypatch.setattr(graph, "CHUNK_BYTES", 48 * COLS * 4)  # chunks of 48 rows: 4 of them
    by_rows = BlockRows((rows, COLS), 4 if qtype == T.Q4_K else 8,
                        lambda lo, hi: file_blocks(raw[lo:hi], qtype, hi - lo, COLS))
    packed = []
    for weight in (file_blocks(raw, qtype, rows, COLS), by_rows):
        g = GraphBuilder("auto")
        assert g.block_const("w", weight, bits=8).bits == by_rows.bits
        packed.append(numpy_helper.to_array(g.initializers[0]))
    np.testing.assert_array_equal(*packed)


def tiny_llama(hidden: int = 256, layers: int = 2) -> object:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_gguf import _tiny_tokenizer

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=_tiny_tokenizer().get_vocab_size(), hidden_size=hidden,
        intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False))


def write_blocks_gguf(path: Path, model: object, types: dict[str, GGMLQuantizationType],
               std: float) -> None:
    """The tiny model as a GGUF whose tensors named in `types` are random blocks of that
    type (weights of spread `std`), the rest F32."""
    from tests.gguf_util import bpe_vocab, write_gguf
    from tests.test_gguf import _tiny_tokenizer

    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": model.model.embed_tokens.weight.shape,
              "output.weight": model.lm_head.weight.shape}
    for i, layer in enumerate(model.model.layers):
        for name, module in (("attn_q", layer.self_attn.q_proj), ("attn_k", layer.self_attn.k_proj),
                             ("attn_v", layer.self_attn.v_proj),
                             ("attn_output", layer.self_attn.o_proj),
                             ("ffn_gate", layer.mlp.gate_proj), ("ffn_up", layer.mlp.up_proj),
                             ("ffn_down", layer.mlp.down_proj)):
            shapes[f"blk.{i}.{name}.weight"] = module.weight.shape
    raw = {name: (make_tensor(qtype, *shapes[name], rng, std), qtype)
           for name, qtype in types.items()}
    write_gguf(path, model, bpe_vocab(_tiny_tokenizer(), "smollm", 1, 2, False), raw=raw)


# Q4_K_M's mix on a tiny model, every K-quant and a Q4_K beside a Q6_K in one stacked matrix.
MIXED = {"token_embd.weight": T.Q4_K, "output.weight": T.Q6_K}
for _i, _mix in enumerate([(T.Q4_K, T.Q4_K, T.Q6_K, T.Q5_K, T.Q3_K, T.Q2_K, T.Q6_K),
                           (T.Q5_K, T.Q4_K, T.Q4_K, T.Q6_K, T.Q4_K, T.Q4_K, T.Q3_K)]):
    for _name, _qtype in zip(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                              "ffn_down"), _mix, strict=True):
        MIXED[f"blk.{_i}.{_name}.weight"] = _qtype


def test_mixed_k_quant_gguf_gives_transformers_tokens(tmp_path: Path) -> None:
    """A tiny random model saved in mixed K-quants runs (auto: its own blocks) with the greedy
    tokens transformers gives on the same file, up to near-ties.

    Margin: converted as fp32 the same file matches transformers' logits to 3e-5 of their
    spread, so what is left is BlockLinear's int8 rounding of the activations per block of 32
    (up to half a step of max |x| / 127 per input; the fp16-rounded K-quant scale products are
    ~1000x smaller, Q2_K/Q6_K's 8-bit re-rounding about as large). Through a random network
    that moves single logits by up to 5-9% of the logits' spread (measured, teacher-forced;
    q8_0 weights of the same values: the same), bounded here at MAX_ERROR. Our greedy token can
    then differ from transformers' only where transformers' own top two lie within
    2 x MAX_ERROR of the spread."""
    from transformers import AutoModelForCausalLM

    from nanovllm_onnx import LLM, SamplingParams
    from nanovllm_onnx.convert.converter import convert

    path = tmp_path / "mixed.gguf"
    write_blocks_gguf(path, tiny_llama(), MIXED, std=0.02)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    convert(path, tmp_path / "onnx")
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17], [20, 21], [40, 30, 20]]
    outs = LLM(str(tmp_path / "onnx"), kv_cache_dtype="fp32").generate(
        prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    agree = total = 0
    for prompt, out in zip(prompts, outs, strict=True):
        ours = list(out.outputs[0].token_ids)
        with torch.no_grad():  # transformers' logits at every step of our continuation
            logits = hf(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1:-1].numpy()
        for step, token in enumerate(ours):
            row = logits[step]
            best = int(row.argmax())
            total += 1
            if token == best:
                agree += 1
                continue
            assert row[best] - row[token] <= 2 * MAX_ERROR * row.std(), (prompt, step)
    assert agree >= 0.9 * total, (agree, total)
    assert len({t for o in outs for t in o.outputs[0].token_ids}) > 5  # not one token


MAX_ERROR = 0.1


def test_unsupported_type_names_tensor_and_type(tmp_path: Path) -> None:
    """A type nano-vllm-onnx does not run (IQ2_XXS here) is refused when the file is read,
    naming the tensor and its type."""
    from nanovllm_onnx.convert.gguf_source import load_gguf
    from nanovllm_onnx.convert.source import ModelLoadError

    model = tiny_llama(layers=1)
    path = tmp_path / "iq.gguf"
    rows, cols = model.model.layers[0].mlp.up_proj.weight.shape
    garbage = np.random.default_rng(0).integers(0, 256, (rows, cols // 256 * 66), dtype=np.uint8)
    from tests.gguf_util import bpe_vocab, write_gguf
    from tests.test_gguf import _tiny_tokenizer

    write_gguf(path, model, bpe_vocab(_tiny_tokenizer(), "smollm", 1, 2, False),
               raw={"blk.0.ffn_up.weight": (garbage, T.IQ2_XXS)})
    with pytest.raises(ModelLoadError, match="tensor blk.0.ffn_up.weight is IQ2_XXS, which "
                                             "nano-vllm-onnx does not run"):
        load_gguf(path)


def test_quantized_embedding_gives_the_fp32_tables_tokens(hf_models: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """The embedding gathered from its blocks (BlockGather) against an fp32 table holding the
    same dequantized values (the same graph with a plain Gather): the same greedy tokens and
    log-probabilities, on a tied model whose LM head reads the same blocks."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from nanovllm_onnx import LLM, SamplingParams
    from nanovllm_onnx.config import GRAPH_FILE
    from nanovllm_onnx.convert.converter import convert
    from nanovllm_onnx.convert.graph import quantize_blocks
    from nanovllm_onnx.convert.source import load_hf_folder
    from tests.conftest import random_prompts

    blocks_dir, table_dir = tmp_path / "blocks", tmp_path / "table"
    convert(hf_models["llama_tied"], blocks_dir, "q8_0")
    shutil.copytree(blocks_dir, table_dir)
    model = onnx.load(str(table_dir / GRAPH_FILE))
    (gather,) = [n for n in model.graph.node if n.op_type == "BlockGather"]
    assert [n.op_type for n in model.graph.node if gather.input[1] in n.input] == [
        "BlockGather", "BlockLinear"]  # the tied LM head reads the same blocks
    embedding = load_hf_folder(hf_models["llama_tied"]).tensors["model.embed_tokens.weight"]
    table = quantize_blocks(embedding, 8).dequantize()[:, :embedding.shape[1]]
    model.graph.initializer.append(numpy_helper.from_array(table, "embedding_table"))
    gather.CopyFrom(helper.make_node("Gather", ["embedding_table", "input_ids"], gather.output))
    (table_dir / GRAPH_FILE).unlink()
    (table_dir / (GRAPH_FILE + ".data")).unlink()
    onnx.save_model(model, str(table_dir / GRAPH_FILE), save_as_external_data=True,
                    location=GRAPH_FILE + ".data")
    prompts = random_prompts(3, seed=7)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    runs = [LLM(str(d), kv_cache_dtype="fp32").generate(prompts, params, use_tqdm=False)
            for d in (blocks_dir, table_dir)]
    for ours, theirs in zip(*runs, strict=True):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
        for a, b in zip(ours.outputs[0].logprobs, theirs.outputs[0].logprobs, strict=True):
            assert {k: v.logprob for k, v in a.items()} == {k: v.logprob for k, v in b.items()}
