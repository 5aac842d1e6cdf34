"""Tiny GGUF files written as llama.cpp's convert_hf_to_gguf.py writes them (no llama.cpp needed).

`write_gguf` takes a transformers model and a vocabulary writer (`bpe_vocab` for a byte-level BPE
`tokenizers.Tokenizer`, `sentencepiece_vocab` for a SentencePiece model file) and writes the
metadata, the rotary scaling (linear/yarn keys, llama3 as a `rope_freqs` tensor) and the tensors,
in F32 unless `tensor_type` picks a quantization per tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from tokenizers import Tokenizer

# HF -> GGUF names, as convert_hf_to_gguf.py writes them
BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
VocabWriter = Callable[[gguf.GGUFWriter], None]


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{BLOCK_NAMES[module]}.{kind}"


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def bpe_vocab(tok: Tokenizer, pre: str, bos_id: int, eos_id: int, add_bos: bool) -> VocabWriter:
    """A byte-level BPE: added special tokens as CONTROL, other added tokens as USER_DEFINED."""

    def write(writer: gguf.GGUFWriter) -> None:
        vocab = tok.get_vocab()
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
        added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
        types = [
            gguf.TokenType.CONTROL if added.get(t)
            else gguf.TokenType.USER_DEFINED if t in added
            else gguf.TokenType.NORMAL
            for t in tokens
        ]
        merges = json.loads(tok.to_str())["model"]["merges"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        writer.add_bos_token_id(bos_id)
        writer.add_eos_token_id(eos_id)
        writer.add_pad_token_id(eos_id)
        writer.add_add_bos_token(add_bos)
        writer.add_chat_template(CHAT_TEMPLATE)

    return write


def sentencepiece_vocab(model_file: Path, add_space_prefix: bool | None = None,
                        add_bos: bool | None = None, unk_id: bool = False) -> VocabWriter:
    """A SentencePiece model as convert_hf_to_gguf.py's _set_vocab_sentencepiece writes it:
    pieces, scores and types (llama.cpp's TokenType mirrors SentencePiece's piece types),
    no merges. By default as llama.cpp's converter (0.3.36's) writes a folder holding only
    tokenizer.model: bos and eos ids, no unk id, no add_space_prefix or add_bos_token keys."""
    import sentencepiece as spm

    def write(writer: gguf.GGUFWriter) -> None:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        tokens, scores, types = [], [], []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            types.append(
                gguf.TokenType.UNKNOWN if sp.is_unknown(i)
                else gguf.TokenType.CONTROL if sp.is_control(i)
                else gguf.TokenType.UNUSED if sp.is_unused(i)
                else gguf.TokenType.BYTE if sp.is_byte(i)
                else gguf.TokenType.NORMAL
            )
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
        if unk_id:
            writer.add_unk_token_id(sp.unk_id())
        if add_space_prefix is not None:
            writer.add_add_space_prefix(add_space_prefix)
        if add_bos is not None:
            writer.add_add_bos_token(add_bos)

    return write


def llama3_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: one divisor per frequency."""
    import torch

    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def _add_rope(writer: gguf.GGUFWriter, rope: dict) -> None:
    """ModelBase.set_gguf_parameters' rope keys (llama3 goes into rope_freqs instead)."""
    writer.add_rope_freq_base(rope["rope_theta"])
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        if rope.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])


def write_gguf(
    path: Path, model: object, vocab: VocabWriter, name: str | None = None,
    tensor_type: Callable[[str], GGMLQuantizationType] | None = None,
    raw: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
    sliding_window: int | None = None,
) -> Path:
    """`model` (a transformers llama/mistral/qwen2/qwen3 CausalLM) as llama.cpp writes it.
    Mistral is written as llama (llama.cpp has no mistral architecture for these files), named
    so that transformers' GGUF loader takes it for Mistral. `tensor_type(hf_name)` picks the
    type of each 2-D weight (default F32); `raw` gives tensors (by GGUF name) as quantized
    bytes of a type instead (types gguf cannot quantize to); `sliding_window` writes
    {arch}.attention.sliding_window (llama.cpp's converter writes none for these architectures)."""
    cfg = model.config
    arch = {"mistral": "llama"}.get(cfg.model_type, cfg.model_type)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or f"tiny-{cfg.model_type}")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    rope = cfg.rope_parameters
    _add_rope(writer, rope)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if sliding_window is not None:
        writer.add_sliding_window(sliding_window)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch == "llama":  # LlamaModel.set_gguf_parameters adds these two
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if arch == "qwen3":  # Qwen3's head_dim is its own, not hidden / heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    vocab(writer)

    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(rope, head_dim))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        data = tensor.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in hf_name:
            data = llama_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = llama_permute(data, cfg.num_key_value_heads)
        kind = tensor_type(hf_name) if tensor_type and data.ndim == 2 else GGMLQuantizationType.F32
        if raw and gguf_name(hf_name) in raw:
            data, kind = raw[gguf_name(hf_name)]
            writer.add_tensor(gguf_name(hf_name), data, raw_dtype=kind)
        elif kind == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(hf_name), data)
        else:
            writer.add_tensor(gguf_name(hf_name), quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
