"""Read a llama.cpp GGUF file as a `ModelSource`.

GGUF keeps the config, the tokenizer and the (often quantized) weights in one file under
llama.cpp's names. This turns them into what a Hugging Face checkpoint would hold: the config.json
dict, HF-named float32 weights (dequantized only when asked for) and a `tokenizers` JSON. Only the
`gguf` package and numpy are used, so no torch or transformers is needed at run time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from .gguf_blocks import FLOAT_TYPES, SUPPORTED, block_bits, file_blocks
from .source import (
    BlockRows,
    LazyMapping,
    LazyTensors,
    ModelLoadError,
    ModelSource,
    QuantBlocks,
    Rows,
)

logger = logging.getLogger(__name__)

# llama covers Mistral's files too: llama.cpp writes them as llama (no sliding window).
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# llama.cpp token types (tokenizer.ggml.token_type)
_UNKNOWN = 2
_CONTROL = 3
_USER_DEFINED = 4

# Split regexes per tokenizer.ggml.pre, as transformers' GGUF tokenizer converter has them. A value
# not listed keeps the GPT-2 split of a plain byte-level BPE, again as transformers does; that
# includes SmolLM2's "smollm" (llama.cpp also splits single digits there, but that vocabulary has no
# token of two characters holding a digit, so the two agree).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_GPT2_SPLIT_PRES = {"default", "gpt2", "gpt-2", "smollm"}


def load_gguf(path: Path) -> ModelSource:
    """Read a GGUF file of a llama, qwen2 or qwen3 model."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError... on a damaged file
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(_ARCHITECTURES))})"
        )
    tensors = {t.name: t for t in reader.tensors}
    config = _config(meta, arch, tensors)
    tokenizer_json, tokenizer_config = _tokenizer(meta)
    generation_config = {
        key: config[key] for key in ("bos_token_id", "eos_token_id") if config.get(key) is not None
    }
    loaders, blocks = _weight_loaders(path, arch, config, tensors)
    # The vocabulary-sized ones are converted a slice at a time.
    vocabulary = {"token_embd.weight": "model.embed_tokens.weight",
                  "output.weight": "lm_head.weight"}
    rows = {hf: _row_reader(path, tensors[name]) for name, hf in vocabulary.items()
            if name in tensors}
    block_rows = {hf: _block_rows(path, tensors[name]) for name, hf in vocabulary.items()
                  if hf in blocks}
    return ModelSource(
        config=config,
        tensors=LazyTensors(loaders, rows),
        quant_blocks=LazyMapping(blocks),
        block_rows=block_rows,
        tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config,
        generation_config=generation_config,
    )


_REQUIRED = object()


class _Metadata:
    """GGUF key/values, with a ModelLoadError naming the file for a missing one."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self._fields = reader.fields
        self.path = path

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self._fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ModelLoadError(f"{self.path}: GGUF metadata has no {key}")
            return default
        return field.contents()


def _config(meta: _Metadata, arch: str, tensors: dict[str, ReaderTensor]) -> dict:
    path = meta.path
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: no token_embd.weight tensor")

    hidden = int(meta.get(f"{arch}.embedding_length"))
    heads = int(meta.get(f"{arch}.attention.head_count"))
    # Files written before head_count_kv existed mean plain multi-head attention.
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(
        meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", 0))
        or hidden // heads
    )
    # The embedding's rows are what the model computes with; metadata and tokenizer may pad.
    vocab_size = int(tensors["token_embd.weight"].shape[1])
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(meta.get(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.get(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length")),
        "rope_parameters": _rope_parameters(meta, arch, tensors, head_dim),
        "rms_norm_eps": _f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon")),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": arch == "qwen2",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id", None),
    }
    if (pad := meta.get("tokenizer.ggml.padding_token_id", None)) is not None:
        config["pad_token_id"] = pad
    # llama.cpp's llama/qwen2/qwen3 graphs ignore a sliding window, but a file that names one
    # was trained with it: described as transformers' config of that window (llama: Mistral;
    # qwen2/qwen3: every layer), so that the engine never runs past it.
    if window := int(meta.get(f"{arch}.attention.sliding_window", 0)):
        config |= {"sliding_window": window, "use_sliding_window": True, "max_window_layers": 0}
        if arch == "llama":
            config["architectures"] = ["MistralForCausalLM"]
    return config


# YaRN settings that llama.cpp and transformers read apart (llama.cpp multiplies its attention
# factor into YaRN's own, transformers puts one in its place): refused rather than guessed.
_YARN_UNSUPPORTED = ("yarn_attn_factor", "yarn_log_multiplier", "attn_factor")


def _rope_parameters(meta: _Metadata, arch: str, tensors: dict[str, ReaderTensor],
                     head_dim: int) -> dict[str, Any]:
    """The rotary settings as transformers' rope_parameters, read as llama.cpp reads them."""
    path, key = meta.path, f"{arch}.rope.scaling"
    # llama.cpp's default base (llama_model_loader: rope_freq_base_train = 10000).
    rope: dict[str, Any] = {"rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                            "rope_type": "default"}
    # llama.cpp: the factor (or the older rope.scale_linear) with no type means linear.
    factor = meta.get(f"{key}.factor", None) or meta.get(f"{arch}.rope.scale_linear", None)
    kind = meta.get(f"{key}.type", "linear" if factor else "none")
    if kind == "linear" and factor not in (None, 0, 1):
        rope |= {"rope_type": "linear", "factor": _f32(factor)}
    elif kind == "yarn":
        unsupported = [name for name in _YARN_UNSUPPORTED
                       if meta.get(f"{key}.{name}", None) is not None]
        if meta.get(f"{key}.yarn_ext_factor", 1.0) != 1.0:  # 1: llama.cpp's default for YaRN
            unsupported.append("yarn_ext_factor")
        if unsupported:
            raise ModelLoadError(f"{path}: YaRN with {key}.{unsupported[0]} is not supported")
        rope |= {
            "rope_type": "yarn",
            "factor": _f32(meta.get(f"{key}.factor")),
            "original_max_position_embeddings": int(meta.get(f"{key}.original_context_length")),
            "beta_fast": _f32(meta.get(f"{key}.yarn_beta_fast", 32.0)),  # llama.cpp's defaults
            "beta_slow": _f32(meta.get(f"{key}.yarn_beta_slow", 1.0)),
        }
    elif kind not in ("none", "linear"):
        raise ModelLoadError(f"{path}: RoPE scaling {kind!r} is not supported "
                             "(supported: none, linear, yarn, llama3's rope_freqs)")
    # Llama 3.1+: convert_hf_to_gguf.py stores llama3 scaling as one divisor per frequency.
    if (freqs := tensors.get("rope_freqs.weight")) is not None:
        factors = dequantize(freqs.data, freqs.tensor_type).reshape(-1)
        if factors.shape != (head_dim // 2,):
            raise ModelLoadError(f"{path}: rope_freqs has {factors.size} values, expected "
                                 f"{head_dim // 2} (head_dim / 2)")
        rope["freq_factors"] = [float(f) for f in factors]
    return rope


def _f32(value: float) -> float:
    """A float32 from the file as its shortest spelling: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(value)))


# HF name suffix per GGUF name suffix, for the tensors of each block.
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _weight_loaders(
    path: Path, arch: str, config: dict, tensors: dict[str, ReaderTensor]
) -> tuple[dict[str, Callable[[], np.ndarray]], dict[str, Callable[[], QuantBlocks]]]:
    """Loaders of the dequantized weights, and of the BlockLinear blocks of quantized ones."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    q_dim, kv_dim = heads * config["head_dim"], kv_heads * config["head_dim"]
    # GGUF name -> (HF name, HF shape). llama.cpp writes dims innermost first; the reader's
    # numpy layout is already [out_features, in_features], as HF has it.
    wanted: dict[str, tuple[str, tuple[int, ...]]] = {
        "token_embd.weight": ("model.embed_tokens.weight", (config["vocab_size"], hidden)),
        "output_norm.weight": ("model.norm.weight", (hidden,)),
    }
    if not config["tie_word_embeddings"]:
        wanted["output.weight"] = ("lm_head.weight", (config["vocab_size"], hidden))
    shapes = {
        "attn_q": (q_dim, hidden),
        "attn_k": (kv_dim, hidden),
        "attn_v": (kv_dim, hidden),
        "attn_output": (hidden, q_dim),
        "ffn_gate": (inter, hidden),
        "ffn_up": (inter, hidden),
        "ffn_down": (hidden, inter),
        "attn_norm": (hidden,),
        "ffn_norm": (hidden,),
    }
    for i in range(config["num_hidden_layers"]):
        for gguf_name, hf_name in _BLOCK_TENSORS.items():
            wanted[f"blk.{i}.{gguf_name}.weight"] = (
                f"model.layers.{i}.{hf_name}.weight",
                shapes[gguf_name],
            )
        if config["attention_bias"]:
            for gguf_name, rows in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                hf_name = _BLOCK_TENSORS[gguf_name]
                wanted[f"blk.{i}.{gguf_name}.bias"] = (f"model.layers.{i}.{hf_name}.bias", (rows,))
        if arch == "qwen3":  # RMSNorm of each q and k head
            for kind in "qk":
                wanted[f"blk.{i}.attn_{kind}_norm.weight"] = (
                    f"model.layers.{i}.self_attn.{kind}_norm.weight", (config["head_dim"],))

    loaders: dict[str, Callable[[], np.ndarray]] = {}
    blocks: dict[str, Callable[[], QuantBlocks]] = {}
    for gguf_name, (hf_name, shape) in wanted.items():
        tensor = tensors.get(gguf_name)
        if tensor is None:
            raise ModelLoadError(f"{path}: tensor {gguf_name} ({hf_name}) is missing")
        got = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if tensor.tensor_type not in SUPPORTED:
            raise ModelLoadError(
                f"{path}: tensor {gguf_name} is {tensor.tensor_type.name}, which nano-vllm-onnx "
                f"does not run (supported: {', '.join(t.name for t in SUPPORTED)}); "
                "requantize the model to one of those with llama.cpp's llama-quantize")
        if got != shape:
            raise ModelLoadError(f"{path}: tensor {gguf_name} has shape {got}, expected {shape}")
        # llama.cpp reorders the Q and K rows of llama models for its interleaved RoPE; qwen2
        # uses its NeoX RoPE, which matches HF's, so those are left alone.
        permute_heads = None
        if arch == "llama" and ".attn_q." in gguf_name:
            permute_heads = heads
        elif arch == "llama" and ".attn_k." in gguf_name:
            permute_heads = kv_heads
        loaders[hf_name] = _tensor_loader(path, tensor, shape, permute_heads)
        if tensor.tensor_type not in FLOAT_TYPES:
            blocks[hf_name] = _blocks_loader(path, tensor, shape, permute_heads)
    return loaders, blocks


def _data(path: Path, tensor: ReaderTensor, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Rows [lo, hi) of a tensor's data (the reader's layout: [rows, bytes of a row] where
    quantized) in a mapping of their own, which goes with the array: the file's pages count
    towards this process's memory only while a tensor is converted, not until the reader goes
    (an 8B Q4_K_M's 4.7 GB did)."""
    rows = tensor.data.shape[0]
    hi = rows if hi is None else hi
    row_bytes = tensor.data.nbytes // rows
    return np.memmap(path, tensor.data.dtype, "r", int(tensor.data_offset) + lo * row_bytes,
                     (hi - lo, *tensor.data.shape[1:]))


def _blocks_loader(path: Path, tensor: ReaderTensor, shape: tuple[int, ...],
                   permute_heads: int | None) -> Callable[[], QuantBlocks]:
    def load() -> QuantBlocks:
        blocks = file_blocks(_data(path, tensor), tensor.tensor_type, *shape)
        if permute_heads is not None:
            blocks = QuantBlocks(*(_unpermute_rows(getattr(blocks, f), permute_heads)
                                   for f in ("q", "scale", "minimum")), blocks.bits)
        return blocks

    return load


def _tensor_loader(
    path: Path, tensor: ReaderTensor, shape: tuple[int, ...], permute_heads: int | None
) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        weights = _dequantize(_data(path, tensor), tensor.tensor_type).reshape(shape)
        return weights if permute_heads is None else _unpermute_rows(weights, permute_heads)

    return load


def _row_reader(path: Path, tensor: ReaderTensor) -> Rows:
    """A 2-D tensor by ranges of rows (the reader's layout is [rows, bytes of a row])."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return Rows(shape, lambda lo, hi: _dequantize(_data(path, tensor, lo, hi),
                                                  tensor.tensor_type))


def _block_rows(path: Path, tensor: ReaderTensor) -> BlockRows:
    """A quantized 2-D tensor's blocks by ranges of rows."""
    rows, cols = (int(d) for d in reversed(tensor.shape.tolist()))
    return BlockRows((rows, cols), block_bits(tensor.tensor_type), lambda lo, hi: file_blocks(
        _data(path, tensor, lo, hi), tensor.tensor_type, hi - lo, cols))


def _dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Float32 weights of raw GGUF data; a copy, so the result neither pins the memory map nor
    is read-only."""
    return np.array(dequantize(data, qtype), dtype=np.float32)


def _unpermute_rows(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute.

    That stores each head's rows as (2, head_dim // 2) -> (head_dim // 2, 2), interleaving the two
    rotary halves; here they are split back, as transformers' GGUF loader does.
    """
    half = weights.shape[0] // n_heads // 2
    return (
        weights.reshape(n_heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, the alphabet of a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _tokenizer(meta: _Metadata) -> tuple[str, dict]:
    """The file's vocabulary as a `tokenizers` JSON that encodes and decodes as transformers'
    tokenizer for the same file does, and the tokenizer_config facts."""
    path = meta.path
    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    # Without token types nothing is marked special or user-defined.
    types: list[int] = meta.get("tokenizer.ggml.token_type", [])
    alphabet: set[str] | None = None  # a byte-level vocabulary's
    if model == "gpt2":
        tok, alphabet = _byte_level_bpe(meta, tokens)
    elif model == "llama":
        tok = _sentencepiece_bpe(meta, tokens)
    else:
        raise ModelLoadError(f"{path}: tokenizer {model!r} is not supported (supported: byte-level "
                             "BPE 'gpt2', SentencePiece 'llama')")
    ids = {name: meta.get(f"tokenizer.ggml.{key}", None) for name, key in _NAMED_TOKENS.items()}
    named = {name: tokens[i] for name, i in ids.items() if i is not None and 0 <= i < len(tokens)}
    # Control and unknown tokens (<|im_start|>, <unk>...) and the named ones match whole and are
    # never split, in llama.cpp and in transformers (which adds its bos, eos, unk and pad tokens
    # so; its SentencePiece unk is "<unk>" even where the file names none). A control token
    # spelled outside a byte-level alphabet is a converter's mislabel: transformers leaves it
    # out, and so do we.
    special = [token for token, kind in zip(tokens, types) if kind in (_UNKNOWN, _CONTROL)]
    tok.add_special_tokens([
        AddedToken(token, special=True, normalized=False)
        for token in dict.fromkeys([*special, *named.values()])
        if alphabet is None or set(token) <= alphabet
    ])
    # User-defined tokens (like <think>) also match whole, but are ordinary text.
    vocab = tok.get_vocab()
    tok.add_tokens([
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, types) if kind == _USER_DEFINED and token in vocab
    ])

    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama")
    added = {name: bool(add) and name in named for name, add in (
        ("bos_token", add_bos), ("eos_token", meta.get("tokenizer.ggml.add_eos_token", False)))}
    # The BOS/EOS the file asks for are added by the tokenizer itself, as in an HF tokenizer.json.
    def template(sequence: str, type_id: int) -> list[str]:
        bos, eos = ([f"{named[name]}:{type_id}"] if added[name] else []
                    for name in ("bos_token", "eos_token"))
        return [*bos, f"${sequence}:{type_id}", *eos]

    tok.post_processor = processors.TemplateProcessing(
        single=template("A", 0), pair=[*template("A", 0), *template("B", 1)],
        special_tokens=[(named[name], ids[name]) for name, add in added.items() if add],
    )

    tokenizer_config: dict[str, Any] = {
        "bos_token": named.get("bos_token"),
        "eos_token": named.get("eos_token"),
        "add_bos_token": added["bos_token"],
        "add_eos_token": added["eos_token"],
        **{name: named[name] for name in ("unk_token", "pad_token") if name in named},
    }
    if (template := meta.get("tokenizer.chat_template", None)) is not None:
        tokenizer_config["chat_template"] = template
    return tok.to_str(), tokenizer_config


_NAMED_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                 "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _byte_level_bpe(meta: _Metadata, tokens: list[str]) -> tuple[Tokenizer, set[str]]:
    """GPT-2 style BPE over bytes spelled as printable characters, and that alphabet."""
    path = meta.path
    merges: list[str] = meta.get("tokenizer.ggml.merges")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())

    # Some converters store a token in plain text rather than the byte alphabet; respell those so
    # the BPE can reach them (transformers does the same).
    def spelled(token: str) -> str:
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode())

    vocab = {spelled(token): i for i, token in enumerate(tokens)}
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=[tuple(m.split(" ", 1)) for m in merges],
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    pre = meta.get("tokenizer.ggml.pre", "default")
    split = _PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        if pre not in _GPT2_SPLIT_PRES:
            logger.warning("%s: unknown tokenizer.ggml.pre %r, splitting text as GPT-2", path, pre)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok, alphabet


def _sentencepiece_bpe(meta: _Metadata, tokens: list[str]) -> Tokenizer:
    """A SentencePiece vocabulary (Llama 2, Mistral...) as transformers' LlamaTokenizer builds it:
    BPE merges in score order, "▁" for a space, bytes without a token as <0xNN> tokens."""
    scores: list[float] = meta.get("tokenizer.ggml.scores")
    if (merges := meta.get("tokenizer.ggml.merges", None)) is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:  # llama.cpp's converter writes none: merging by score is SentencePiece's BPE
        pairs = _merges_by_score(tokens, scores)
    tok = Tokenizer(BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=pairs,
                        fuse_unk=True, byte_fallback=True, dropout=None))
    # llama.cpp's add_space_prefix (default true): one "▁" before the text, not after
    # special tokens (transformers' non-legacy "first"), and stripped again when decoding.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(content=" ", left=1, right=0)] if prefix else []),
    ])
    return tok


def _merges_by_score(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best score first (transformers'
    generate_merges: ties by the lengths of the parts, then by the parts' ids)."""
    ids = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token))]
        splits = sorted((s for s in splits if s[0] in ids and s[1] in ids),
                        key=lambda s: (ids[s[0]], ids[s[1]]))
        merges += [(left, right, score) for left, right in splits]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


