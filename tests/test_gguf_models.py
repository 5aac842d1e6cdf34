"""GGUF files of more kinds against transformers on the same file: SentencePiece vocabularies
(Llama 2, Mistral: tokenizer.ggml.model 'llama'), Mistral-style llama files and qwen3."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers as tf
from tokenizers import Tokenizer

from nanovllm_onnx import LLM, SamplingParams
from nanovllm_onnx.convert.converter import convert
from nanovllm_onnx.convert.gguf_source import load_gguf
from nanovllm_onnx.engine.tokenizer import IncrementalDetokenizer, TextTokenizer
from tests.conftest import write_tokenizer
from tests.gguf_util import bpe_vocab, sentencepiece_vocab, write_gguf

SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Café, naïve, résumé: déjà vu. 1234567890 3.14 don't won't I'M YOU'LL",
    "user assistant system hi hello thinking tabs\tand  double  spaces",
    "Le cœur a ses raisons que la raison ne connaît point.",
] * 30
# Spaces (leading, runs, tabs), newlines, digits, accents, characters and emoji the small
# vocabulary has no piece for (byte fallback: <0xNN> tokens), and special tokens in the text.
SP_TEXTS = [
    "Hello world!",
    "  two leading spaces,   a run\tand a tab",
    "line one\nline two\n\n  indented\r\n",
    "digits 0123456789 3.14159 and 1,000,000",
    "Café naïve résumé, déjà vu; Le cœur",
    "emoji 🤗🚀 👍🏽 東京 中文 Ελληνικά ∑∫ ñ",
    "</s> after <s>hi</s>there <unk>",
    " ",
    "",
]


def _sentencepiece_agrees(text: str) -> bool:
    """Whether SentencePiece itself is a reference for `text`: it knows no special tokens in
    text, and before text that starts with a space it adds its prefix space anyway, where
    transformers' GGUF tokenizer (tokenizers' Metaspace) adds none ("  a" -> "▁▁▁a" vs
    "▁▁a"); the converter follows transformers there, as the issue asks."""
    return "<" not in text and not text[:1].isspace()


def _sentencepiece(tmp: Path, add_dummy_prefix: bool) -> Path:
    """A small BPE SentencePiece model trained as Llama 2's was (byte fallback, digits split,
    no normalization)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=0.995, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    path = tmp / "sp.model"
    path.write_bytes(model.getvalue())
    return path


def _tiny_model(arch: str, vocab_size: int, **extra: object) -> tf.PreTrainedModel:
    torch.manual_seed(0)
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[arch]
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
              tie_word_embeddings=False)
    model = model_cls(config_cls(**{**kw, **extra})).eval()
    with torch.no_grad():  # norms start at one: randomize so that they are checked
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def mistral_sp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, spm.SentencePieceProcessor]:
    """A Mistral-style file: llama architecture, named Mistral, SentencePiece vocabulary, the
    metadata llama.cpp's converter writes for it (no add_bos_token, add_space_prefix or unk id:
    the defaults apply; checked against a file made by convert_hf_to_gguf.py itself)."""
    tmp = tmp_path_factory.mktemp("mistral")
    sp_model = _sentencepiece(tmp, add_dummy_prefix=True)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    model = _tiny_model("mistral", sp.vocab_size(), rope_theta=1e6)
    path = write_gguf(tmp / "tiny-mistral.gguf", model, sentencepiece_vocab(sp_model),
                      name="tiny-mistral")
    return path, sp


def test_sentencepiece_tokenizer_matches_transformers(mistral_sp) -> None:  # noqa: ANN001
    path, sp = mistral_sp
    src = load_gguf(path)
    mine = Tokenizer.from_str(src.tokenizer_json)
    theirs = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert src.tokenizer_config["add_bos_token"] is True
    for text in SP_TEXTS:
        ids = mine.encode(text).ids
        assert ids == theirs(text).input_ids, text
        assert mine.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text
        assert mine.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        if _sentencepiece_agrees(text):
            assert ids == [sp.bos_id(), *sp.encode(text)], text
            assert mine.decode(ids) == sp.decode(ids[1:]), text
    # An emoji the vocabulary has no piece for: its UTF-8 bytes as byte-fallback tokens.
    assert mine.encode("🤗").tokens == ["<s>", "▁", "<0xF0>", "<0x9F>", "<0xA4>", "<0x97>"]


def test_sentencepiece_without_space_prefix(tmp_path: Path) -> None:
    """add_space_prefix = false (a model trained without SentencePiece's dummy prefix): as
    SentencePiece itself encodes. (transformers' GGUF tokenizer ignores add_space_prefix and
    always prefixes.)"""
    sp_model = _sentencepiece(tmp_path, add_dummy_prefix=False)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    model = _tiny_model("llama", sp.vocab_size(), num_hidden_layers=1)
    path = write_gguf(tmp_path / "m.gguf", model, sentencepiece_vocab(
        sp_model, add_space_prefix=False, add_bos=True, unk_id=True))
    src = load_gguf(path)
    mine = Tokenizer.from_str(src.tokenizer_json)
    assert src.tokenizer_config["add_bos_token"] is True
    for text in SP_TEXTS:
        if _sentencepiece_agrees(text):
            ids = mine.encode(text).ids
            assert ids == [sp.bos_id(), *sp.encode(text)], text
            assert mine.decode(ids) == sp.decode(ids[1:]) == text, text


def test_mistral_style_gguf_generates_transformers_text(mistral_sp, tmp_path: Path  # noqa: ANN001
                                                        ) -> None:
    """Text in, text out: prompt ids, greedy tokens and text as transformers gives them on the
    same file with its own GGUF tokenizer. It runs the file as Llama, as llama.cpp does (a file
    named just "mistral" it would take for Mistral, but the installed gguf package then fails
    it: 'Unknown gguf model_type: mistral'); Mistral's sliding window is never reached here."""
    path, _ = mistral_sp
    hf = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    theirs = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompts = SP_TEXTS[:6]
    expected = []
    with torch.no_grad():
        for text in prompts:
            ids = theirs(text).input_ids
            out = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            expected.append((ids, out[0, len(ids):].tolist()))
    convert(path, tmp_path / "onnx", "fp32")  # compared with transformers token for token
    llm = LLM(str(tmp_path / "onnx"), kv_cache_dtype="fp32")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)
    for out, (ids, tokens) in zip(outs, expected):
        assert (out.prompt_token_ids, out.outputs[0].token_ids) == (ids, tokens)
        assert out.outputs[0].text == theirs.decode(tokens, skip_special_tokens=True)
    # generate() streamed those (random) tokens, lone byte-fallback tokens among them, which
    # tokenizers' DecodeStream rejects. Streamed text is the text, also for a lone lead byte:
    tokenizer = TextTokenizer(tmp_path / "onnx", llm.llm_engine.model_config)
    byte = {b: theirs.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0xF0, 0xE6, 0x9D, 0xB1)}
    word = theirs("hello world").input_ids[1:]
    tokens = [byte[0xF0], *word, byte[0xE6], byte[0x9D], byte[0xB1], *word]
    stream = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    pieces = [stream.step(t) for t in tokens]
    assert "".join(pieces) == theirs.decode(tokens) == "\ufffd hello world\u6771 hello world"
    assert pieces[len(word) + 1:len(word) + 4] == ["", "", "\u6771"]  # no half character shown


def test_qwen3_gguf_matches_transformers(tmp_path: Path) -> None:
    """qwen3: q/k norms per head, head_dim its own (128, not hidden / heads), NeoX rotary (Q and
    K rows not permuted by llama.cpp)."""
    write_tokenizer(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    model = _tiny_model("qwen3", tok.get_vocab_size(), head_dim=128, num_attention_heads=2,
                        num_key_value_heads=1, rope_theta=1e6)
    path = write_gguf(tmp_path / "qwen3.gguf", model, bpe_vocab(tok, "qwen2", 1, 2, False))
    src = load_gguf(path)
    assert (src.config["architectures"], src.config["head_dim"]) == (["Qwen3ForCausalLM"], 128)
    hf = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                 dtype=torch.float32)
    hf_state = hf.state_dict()
    assert set(src.tensors) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(src.tensors[name], tensor.numpy(), err_msg=name)
        np.testing.assert_array_equal(hf_state[name].numpy(), tensor.numpy(), err_msg=name)
    prompts = [[5, 6, 7, 8, 9], list(range(20, 60))]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            expected.append(out[0, len(prompt):].tolist())
    convert(path, tmp_path / "onnx", "fp32")  # compared with transformers token for token
    outs = LLM(str(tmp_path / "onnx"), kv_cache_dtype="fp32").generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
