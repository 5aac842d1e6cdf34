"""load_gguf against transformers' own GGUF loading.

Tiny random llama/qwen2 models are written to GGUF the way llama.cpp's convert_hf_to_gguf.py
writes them (F32, so every comparison is exact); transformers reading the same file back to the
HF weights proves the layout is llama.cpp's. The real default model (SmolLM2, Q4_1) is checked
too when it can be fetched.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
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
from tests.conftest import default_model_or_skip
from tests.gguf_util import CHAT_TEMPLATE, bpe_vocab, write_gguf

Q4_0, F32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<think>"
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
    write_gguf(path, model, bpe_vocab(tok, pre, 1, 2, add_bos))
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
    assert cfg["rope_parameters"] == {"rope_theta": ref.rope_parameters["rope_theta"],
                                      "rope_type": "default"}
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
    return default_model_or_skip()


def test_default_model(default_gguf: Path) -> None:
    src = load_gguf(default_gguf)
    cfg = src.config
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]) == (30, 576, 64)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert (cfg["vocab_size"], cfg["tie_word_embeddings"]) == (49152, True)
    assert (cfg["rope_parameters"]["rope_theta"], cfg["rms_norm_eps"]) == (100000.0, 1e-5)
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
    write_gguf(path, hf, bpe_vocab(_tiny_tokenizer(), "smollm", 1, 2, add_bos=True),
               tensor_type=lambda name: Q4_0 if name.endswith("proj.weight") else F32)
    src = load_gguf(path)
    assert len(src.quant_blocks) == 2 * 7  # every projection of the 2 layers
    for name, blocks in src.quant_blocks.items():
        np.testing.assert_array_equal(blocks.minimum, -8 * blocks.scale)
        np.testing.assert_array_equal(blocks.dequantize(), src.tensors[name])
