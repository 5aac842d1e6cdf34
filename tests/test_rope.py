"""Rotary settings read as transformers reads them: configs saved by transformers 5
(`rope_parameters`), transformers-4 dicts (`rope_theta`/`rope_scaling`) and GGUF files
(`rope.scaling.*` keys, llama3's `rope_freqs` tensor); config facts never silently defaulted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGUFReader
from tokenizers import Tokenizer

from nanovllm_onnx import LLM, SamplingParams
from nanovllm_onnx.convert.converter import convert
from nanovllm_onnx.convert.gguf_source import load_gguf
from nanovllm_onnx.convert.graph import inverse_frequencies
from nanovllm_onnx.convert.hf_config import CLASS_DEFAULTS, resolved
from nanovllm_onnx.convert.source import ModelLoadError
from tests.conftest import build_hf_model, random_prompts, reference_greedy, write_tokenizer
from tests.gguf_util import bpe_vocab, write_gguf

THETA = 500000.0  # Llama 3's; not the 10000 a reader falling back to a default would use
MAX_POS = 256
# Small original contexts so that every scaling moves frequencies the prompts reach.
ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_betas": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                   "beta_fast": 16.0, "beta_slow": 2.0},
}
PROMPTS = random_prompts(3, seed=13, lo=40, hi=90)
NEW_TOKENS = 16


def _config(rope: dict) -> tf.LlamaConfig:
    return tf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=MAX_POS,
                          rope_parameters={**rope, "rope_theta": THETA})


def _v4_dict(config: dict) -> dict:
    """A config.json as transformers 4 wrote it: rope_theta and rope_scaling ("type") on top."""
    old = {k: v for k, v in config.items() if k != "rope_parameters"}
    rope = dict(config["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    old["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    return old


def _transformers_frequencies(config: tf.LlamaConfig) -> tuple[np.ndarray, float]:
    rotary = tf.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    return rotary.inv_freq.numpy(), float(rotary.attention_scaling)


@pytest.mark.parametrize("name", ROPES)
def test_frequencies_match_transformers_in_both_config_forms(name: str) -> None:
    config = _config(ROPES[name])
    expected, attention = _transformers_frequencies(config)
    for form in (config.to_dict(), _v4_dict(config.to_dict())):
        hf = resolved({**form, "architectures": ["LlamaForCausalLM"]})
        got, got_attention = inverse_frequencies(16, MAX_POS, hf["rope_parameters"])
        np.testing.assert_allclose(got, expected, rtol=2e-6, err_msg=name)
        assert got_attention == pytest.approx(attention, rel=1e-12)
    if name == "yarn":
        assert attention > 1.05  # the attention factor is checked, not only the frequencies


@pytest.fixture(scope="module")
def rope_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama-3-style checkpoints saved by the installed transformers (5.x), one per
    scaling, all with the same weights."""
    root = tmp_path_factory.mktemp("rope")
    assert tf.__version__.startswith("5.")  # the rope_parameters form is the point here
    return {name: build_hf_model("llama", root / name, rope_theta=None,
                                 max_position_embeddings=MAX_POS,
                                 rope_parameters={**rope, "rope_theta": THETA})
            for name, rope in ROPES.items() if name != "yarn_betas"}


def _ours(source: Path, out: Path) -> list[list[int]]:
    convert(source, out, "fp32")  # compared with transformers token for token
    llm = LLM(str(out), kv_cache_dtype="fp32", max_model_len=MAX_POS)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                                ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_saved_by_transformers_5_match_transformers(rope_models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    saved = json.loads((rope_models["llama3"] / "config.json").read_text())
    assert "rope_theta" not in saved and saved["rope_parameters"]["rope_theta"] == THETA
    expected = {name: reference_greedy(folder, PROMPTS, NEW_TOKENS)
                for name, folder in rope_models.items()}
    for name, folder in rope_models.items():
        assert _ours(folder, tmp_path / name) == expected[name], name
    # Each scaling changes transformers' tokens (so a reader ignoring it fails above), except
    # dynamic NTK, which leaves the frequencies alone up to max_position_embeddings.
    for name in ("linear", "llama3", "yarn"):
        assert expected[name] != expected["default"], name
    assert expected["dynamic"] == expected["default"]


def test_transformers_4_config_dict(rope_models: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(rope_models["llama3"], tmp_path / "v4")
    config = _v4_dict(json.loads((folder / "config.json").read_text()))
    (folder / "config.json").write_text(json.dumps(config))
    assert config["rope_scaling"]["type"] == "llama3" and config["rope_theta"] == THETA
    assert _ours(folder, tmp_path / "out") == reference_greedy(folder, PROMPTS, NEW_TOKENS)


def test_class_defaults_are_transformers(tmp_path: Path) -> None:
    """CLASS_DEFAULTS are what transformers' config classes use for a key config.json lacks."""
    classes = {"LlamaForCausalLM": tf.LlamaConfig, "MistralForCausalLM": tf.MistralConfig,
               "Qwen2ForCausalLM": tf.Qwen2Config, "Qwen3ForCausalLM": tf.Qwen3Config}
    assert set(classes) == set(CLASS_DEFAULTS)
    for arch, defaults in CLASS_DEFAULTS.items():
        config = classes[arch]()
        for key, value in defaults.items():
            got = getattr(config, key) if key != "rope_theta" else \
                config.rope_parameters["rope_theta"]
            assert got == value, (arch, key)


def test_missing_facts(hf_models: dict[str, Path], tmp_path: Path) -> None:
    """A size config.json lacks is an error naming it; one transformers' class defines a
    default for runs with that default, as transformers runs it."""
    folder = shutil.copytree(hf_models["llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers"):
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                        if k != key}))
        with pytest.raises(ModelLoadError, match=rf"config.json \(LlamaForCausalLM\) has no {key}"):
            convert(folder, tmp_path / "out")
    for key, value in (("rope_parameters", {"rope_type": "longrope", "factor": 2.0}),
                       ("partial_rotary_factor", 0.5)):
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ModelLoadError, match="longrope|partial_rotary_factor"):
            convert(folder, tmp_path / "out")
    # rope_theta and rms_norm_eps left out: transformers uses 10000 and 1e-6 (the model was
    # saved with 1e-5), and so must we.
    defaulted = {k: v for k, v in config.items() if k not in ("rope_parameters", "rms_norm_eps")}
    (folder / "config.json").write_text(json.dumps(defaulted))
    prompts = PROMPTS[:2]
    out = tmp_path / "defaulted"
    convert(folder, out, "fp32")
    got = LLM(str(out), kv_cache_dtype="fp32").generate(
        prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == reference_greedy(folder, prompts, 8)


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn_betas"])
def test_gguf_frequencies_match_transformers(name: str, tmp_path: Path) -> None:
    """The file llama.cpp's converter writes for the model (rope.scaling.* keys; llama3 as
    rope_freqs) gives the frequencies transformers uses for the model's HF config."""
    config = _config(ROPES[name])
    config.vocab_size, config.intermediate_size, config.num_hidden_layers = 384, 128, 1
    model = tf.LlamaForCausalLM(config)
    write_tokenizer(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    path = write_gguf(tmp_path / "m.gguf", model, bpe_vocab(tok, "default", 1, 2, False))
    tensors = {t.name for t in GGUFReader(path).tensors}
    assert ("rope_freqs.weight" in tensors) is (name == "llama3")
    hf = resolved(load_gguf(path).config)
    expected, attention = _transformers_frequencies(model.config)
    got, got_attention = inverse_frequencies(16, MAX_POS, hf["rope_parameters"])
    np.testing.assert_allclose(got, expected, rtol=2e-6)
    assert got_attention == pytest.approx(attention, rel=1e-6)


def test_llama3_gguf_matches_transformers_gguf_loader(rope_models: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """A tiny Llama-3.1-style GGUF runs token for token as transformers runs the same file
    (its GGUF loader reads the weights; it reads no llama rope scaling from a file, so the
    model's HF config is handed to it)."""
    folder = rope_models["llama3"]
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    path = write_gguf(tmp_path / "llama3.gguf", model, bpe_vocab(tok, "default", 1, 4, False))
    expected = reference_greedy(tmp_path, PROMPTS, NEW_TOKENS, gguf_file=path.name,
                                config=model.config)
    assert expected == reference_greedy(folder, PROMPTS, NEW_TOKENS)
    assert _ours(path, tmp_path / "out") == expected
