"""Models with a sliding window: the engine has no sliding-window attention, so it runs them at
most up to the window (where full attention is the same), as vLLM's disable_sliding_window."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer

from nanovllm_onnx import LLM, SamplingParams
from nanovllm_onnx.convert.converter import convert, load_source, model_config_from_source
from nanovllm_onnx.convert.hf_config import DEFAULT_SLIDING_WINDOW, sliding_window
from tests.conftest import build_hf_model, reference_greedy, write_tokenizer
from tests.gguf_util import bpe_vocab, write_gguf

WINDOW = 4
CLASSES = {"LlamaForCausalLM": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "MistralForCausalLM": (tf.MistralConfig, tf.MistralForCausalLM),
           "Qwen2ForCausalLM": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "Qwen3ForCausalLM": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}
SLIDING = {"sliding_window": WINDOW, "use_sliding_window": True}
CONFIGS = {
    "llama_key_inert": ("LlamaForCausalLM", {"sliding_window": WINDOW}),
    "mistral": ("MistralForCausalLM", {"sliding_window": WINDOW}),
    "mistral_null": ("MistralForCausalLM", {"sliding_window": None}),
    "qwen2_not_used": ("Qwen2ForCausalLM", {"sliding_window": WINDOW}),
    "qwen2_upper_layer": ("Qwen2ForCausalLM", {**SLIDING, "max_window_layers": 1}),
    "qwen2_no_layer": ("Qwen2ForCausalLM", {**SLIDING, "max_window_layers": 2}),
    "qwen3_layer_types": ("Qwen3ForCausalLM", {**SLIDING, "layer_types": ["sliding_attention",
                                                                          "full_attention"]}),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_window_is_the_one_transformers_applies(name: str) -> None:
    """The window read from config.json is active exactly where transformers' model attends
    differently from the same weights without a window (16 tokens, window 4)."""
    arch, extra = CONFIGS[name]
    config_cls, model_cls = CLASSES[arch]
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    model = model_cls(config_cls(**base, **extra)).eval()
    full = model_cls(config_cls(**base, sliding_window=None)).eval()
    full.load_state_dict(model.state_dict())
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        windowed = not torch.allclose(model(ids).logits, full(ids).logits)
    assert sliding_window({"architectures": [arch], **base, **extra}) == \
        (WINDOW if windowed else None)


def test_default_window_is_the_classes() -> None:
    """A Mistral config.json without the key gets the class's window, as in transformers."""
    assert tf.MistralConfig().sliding_window == DEFAULT_SLIDING_WINDOW
    for config_cls in (tf.Qwen2Config, tf.Qwen3Config):
        assert config_cls(use_sliding_window=True).sliding_window == DEFAULT_SLIDING_WINDOW
    assert sliding_window({"architectures": ["MistralForCausalLM"],
                           "num_hidden_layers": 2}) == DEFAULT_SLIDING_WINDOW


def test_context_capped_at_the_window(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Mistral checkpoint with a 24-token window: max_model_len defaults to it (logged), runs
    transformers' tokens up to it, and an explicit longer one is an error naming both."""
    folder = build_hf_model("mistral", tmp_path / "hf", sliding_window=24,
                            max_position_embeddings=256)
    convert(folder, tmp_path / "onnx", "fp32")  # compared with transformers token for token
    with caplog.at_level(logging.WARNING):
        llm = LLM(str(tmp_path / "onnx"), kv_cache_dtype="fp32")
    assert llm.llm_engine.max_model_len == 24
    assert "sliding window of 24 tokens" in caplog.text
    prompt = list(range(10, 18))
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == reference_greedy(folder, [prompt], 16)[0]  # capped at 24 in all
    with pytest.raises(ValueError, match=r"max_model_len=64 .*sliding window \(24 tokens\)"):
        LLM(str(tmp_path / "onnx"), max_model_len=64)
    assert LLM(str(tmp_path / "onnx"), max_model_len=20).llm_engine.max_model_len == 20


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_window(arch: str, tmp_path: Path) -> None:
    """{arch}.attention.sliding_window in a GGUF caps the context; 0 (or no key) means none."""
    write_tokenizer(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    folder = build_hf_model(arch, tmp_path / "hf", max_position_embeddings=256)
    model = CLASSES[json.loads((folder / "config.json").read_text())["architectures"][0]][1] \
        .from_pretrained(folder)
    for window, expected in ((24, 24), (0, None)):
        path = write_gguf(tmp_path / f"{window}.gguf", model, bpe_vocab(tok, arch, 1, 2, False),
                          sliding_window=window)
        assert model_config_from_source(load_source(path)).sliding_window == expected
