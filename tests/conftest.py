"""Tiny random models built with transformers, and transformers as the reference."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from nanovllm_onnx.convert.graph import MS
from nanovllm_onnx.kernels import DOMAIN, TARGET_ENV, custom_ops_library

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Numbers 0123456789 and punctuation !?.,;:'\"()[]{} and café, naïve, 東京, 🙂.",
]
VOCAB = 384


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE (like GPT-2, SmolLM2, Qwen) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": CHATML,
    }))


def build_hf_model(arch: str, folder: Path, **overrides: object) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    kw: dict = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1,
                    eos_token_id=4, tie_word_embeddings=False, rope_theta=10000.0,
                    initializer_range=0.2)  # the default 0.02 gives one token whatever the prompt
    kw.update(overrides)
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[arch]
    if arch == "qwen3":
        kw.setdefault("head_dim", 16)
    return save_tiny_model(model_cls(config_cls(**kw)).eval(), folder, norm_marker="norm")


def save_tiny_model(model: object, folder: Path, norm_marker: str) -> Path:
    """Save a random model with the test tokenizer; biases and norms (parameters whose name
    holds norm_marker) get noise first: random init leaves them trivial."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or norm_marker in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": build_hf_model("llama", root / "llama"),
        "llama_tied": build_hf_model("llama", root / "llama_tied", tie_word_embeddings=True),
        "mistral": build_hf_model("mistral", root / "mistral"),
        "qwen2": build_hf_model("qwen2", root / "qwen2"),
        "qwen3": build_hf_model("qwen3", root / "qwen3"),
    }


@pytest.fixture(scope="session")
def converted(hf_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    """Each tiny model converted once per test session (into a temp folder, not the cache)."""
    from nanovllm_onnx.convert.converter import convert

    root = tmp_path_factory.mktemp("onnx")
    for name, folder in hf_models.items():
        convert(folder, root / name, "fp32")  # compared with transformers token for token
    return {name: root / name for name in hf_models}


def reference_greedy(model_dir: Path | str, prompts: list[list[int]], max_new_tokens: int,
                     **from_pretrained: object) -> list[list[int]]:
    """Greedy continuation by transformers, never stopping at EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 **from_pretrained).eval()
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model(ids, use_cache=True)
            new = []
            for _ in range(max_new_tokens):
                token = int(out.logits[0, -1].argmax())
                new.append(token)
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values,
                            use_cache=True)
            results.append(new)
    return results


def random_prompts(n: int, seed: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="session", autouse=True)
def conversion_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tests' conversions go to a cache of the session's own (each run left its tiny
    models' entries in the user's); the default model's download is the user's cache's."""
    from nanovllm_onnx.default_model import cache_dir

    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("cache")
    (cache / "models").symlink_to(models, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANO_VLLM_ONNX_CACHE", str(cache))
        yield cache


def default_model_or_skip() -> Path:
    """The default model's GGUF. Without it (no PyPI here) its tests skip on a laptop but
    fail under CI=true: a CI run that skipped them would prove nothing about the model."""
    from nanovllm_onnx.default_model import default_model_path

    try:
        return default_model_path()
    except RuntimeError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"default model unavailable under CI=true: {e}")
        pytest.skip(f"default model unavailable: {e}")


def ops_session(graph: onnx.GraphProto, target: str = "") -> ort.InferenceSession:
    """A 2-thread session of a graph made of the engine's ops (and ONNX Runtime's contrib ops),
    in the build the dispatcher picks for this CPU, or the one `target` forces."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(MS, 1),
                                                    helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TARGET_ENV, target)
        opts.register_custom_ops_library(str(custom_ops_library()))
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
