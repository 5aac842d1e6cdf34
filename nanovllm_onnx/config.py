"""The converted model's own config, and the engine's arguments."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MODEL_CONFIG_FILE = "nano_vllm_onnx.json"
GRAPH_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
KV_CACHE_DTYPES = {"fp16": "float16", "fp32": "float32", "int8": "int8"}  # -> numpy dtype

# The converter's weight formats. auto: a GGUF's quantized tensors run their own blocks, every
# other weight 8-bit blocks of 128 inputs from min to max where K is a multiple of 128 (a 1B
# 32-row decode step 1.2x faster than q8_0's), else q8_0's blocks of 32. q8_0: 8-bit blocks of
# 32 (GGUF's Q8_0 rounding) of every weight. int8:
# per-channel. int4: 4-bit blocks of 32 (a GGUF's own Q4_0/Q4_1/Q4_K ones where it has them);
# the embedding and LM head stay in 8-bit blocks. int4_all: int4 with the embedding and LM
# head in 4-bit blocks too (OpenVINO's --all-layers, onnxruntime-genai's int4 LM head): fewer
# bytes a decode step, lower quality; only when asked.
WEIGHT_FORMATS = ("auto", "q8_0", "fp32", "int8", "int4", "int4_all")
FOUR_BIT_FORMATS = ("int4", "int4_all")  # projections and MLP in 4-bit blocks


def kv_width(head_dim: int, dtype: np.dtype) -> int:
    """Elements of one position of one KV head in a cache of `dtype`: an int8 cache keeps the
    position's float scale in 4 bytes after its head_dim codes (kernels/ops.cc)."""
    return head_dim + (4 if np.dtype(dtype) == np.int8 else 0)


@dataclass
class ModelConfig:
    """What the engine needs to know about a converted model (written by the converter)."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: list[int]
    bos_token_id: int | None = None
    add_bos_token: bool = False
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    weights: str = "fp32"
    # The model's attention window (transformers' sliding_window where its config applies one):
    # the engine attends to the whole context, so it runs at most this many tokens.
    sliding_window: int | None = None
    # "slots": this engine's own graph (GRAPH_FILE beside this config); "optimum": an Optimum
    # export run as it is, from graph_path (absolute: the export stays where the user put it).
    # ("gqa": a graph of converter versions before 12, which must be converted again.)
    runner: str = "slots"
    graph_path: str | None = None
    # What it was converted from (resolved) and by which converter version: a later conversion
    # of the same source to the same weights replaces it in the cache (resolve_model).
    source: str | None = None
    converter_version: int | None = None

    def graph_file(self, folder: Path) -> Path:
        return Path(self.graph_path) if self.graph_path else folder / GRAPH_FILE

    def kv_bytes_per_token(self, dtype: np.dtype) -> int:
        width = kv_width(self.head_dim, dtype)
        return self.num_layers * 2 * self.num_kv_heads * width * np.dtype(dtype).itemsize

    def save(self, folder: Path) -> None:
        (folder / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> ModelConfig:
        return cls(**json.loads((folder / MODEL_CONFIG_FILE).read_text()))


@dataclass
class EngineConfig:
    """Engine arguments (vLLM's names where vLLM has one)."""

    model: str | None = None  # HF folder, GGUF file or converted folder; None = default model
    weights: str | None = None  # converting: auto (default) | q8_0 | fp32 | int8 | int4 | int4_all
    max_model_len: int | None = None  # default: the model's context, capped at 4096
    max_num_seqs: int = 32
    # Prompt tokens cost more each in larger steps (1B q8_0, AMX bf16 path: 3.2-3.7 ms of CPU
    # a token at 512-1024, 4.1-4.3 at 2048, 5.2-5.8 at 4096; benchmarks/README.md).
    max_num_batched_tokens: int = 1024
    kv_cache_memory_gib: float = 1.0
    kv_cache_dtype: str = "auto"  # auto (fp16; an Optimum export: fp32) | fp16 | fp32 | int8
    block_size: int = 16
    enable_prefix_caching: bool = True
    intra_op_num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    inter_op_num_threads: int = 1
    # ONNX Runtime's intra-op threads spin between parallel sections (its default) or sleep.
    # `serve` turns it off: its event loop, and clients on the same machine, need the cores
    # the spinning threads hold (see benchmarks/README.md, "Served against offline").
    intra_op_spinning: bool = True
    graph_optimization_level: str = "all"  # disable | basic | extended | all
    execution_mode: str = "sequential"  # sequential | parallel (inter-op threads then matter)
    enable_mem_pattern: bool = True
    enable_cpu_mem_arena: bool = True
    providers: list[str] = field(default_factory=lambda: ["cpu"])
    # vLLM's speculative_config: {"method": "ngram", ...} or {"model": DRAFT, ...}
    speculative_config: dict | None = None
    # Each token's result independent of what shares its step (batching, chunked prefill,
    # speculation), as vLLM's VLLM_BATCH_INVARIANT=1: on AMX, generated tokens then stay on the
    # int8 path in any step (off: in big steps, and beside prompt tokens, they run in bf16).
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("max_num_seqs", self.max_num_seqs >= 1),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1),
            ("kv_cache_memory_gib", self.kv_cache_memory_gib > 0),
            ("block_size", self.block_size >= 1),
            ("intra_op_num_threads", self.intra_op_num_threads >= 0),
            ("inter_op_num_threads", self.inter_op_num_threads >= 0),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid engine argument {name}={getattr(self, name)!r}")
        if self.kv_cache_dtype not in ("auto", *KV_CACHE_DTYPES):
            raise ValueError(f"kv_cache_dtype must be auto, {', '.join(KV_CACHE_DTYPES)}; "
                             f"got {self.kv_cache_dtype!r}")
        if self.execution_mode not in ("sequential", "parallel"):
            raise ValueError(f"execution_mode must be sequential or parallel; "
                             f"got {self.execution_mode!r}")
        if self.speculative_config is not None:
            SpeculativeConfig.from_dict(self.speculative_config)  # fail early, with the key named
        if self.graph_optimization_level not in ("disable", "basic", "extended", "all"):
            raise ValueError(
                "graph_optimization_level must be one of disable, basic, extended, all; "
                f"got {self.graph_optimization_level!r}"
            )


@dataclass
class SpeculativeConfig:
    """Speculative decoding (vLLM's speculative_config keys; `weights` is this engine's own:
    the draft's weight format when converting it, e.g. the target's own checkpoint in int4)."""

    num_speculative_tokens: int
    method: str = "ngram"  # ngram | draft_model (implied by `model`)
    # The draft: HF folder, GGUF file or converted folder; with method draft_model and no
    # model, the target's own source (converted with `weights`).
    model: str | None = None
    weights: str | None = None  # one of WEIGHT_FORMATS for the draft (as EngineConfig.weights)
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # No proposals while more sequences than this run: a big batch is compute-bound, so
    # verifying rejected tokens costs real time (measured: benchmarks/README.md).
    disable_by_batch_size: int = 4

    METHODS = ("ngram", "draft_model")
    MAX_TOKENS = 16

    @classmethod
    def from_dict(cls, values: dict) -> SpeculativeConfig:
        if not isinstance(values, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(values).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: "
                             f"{sorted(known)}")
        if "num_speculative_tokens" not in values:
            raise ValueError("speculative_config needs num_speculative_tokens")
        values = dict(values)
        if values.get("model") is not None:
            values.setdefault("method", "draft_model")
        cfg = cls(**values)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.method not in self.METHODS:
            raise ValueError(f"speculative_config method must be one of {', '.join(self.METHODS)}"
                             f"; got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or not 1 <= k <= self.MAX_TOKENS:
            raise ValueError(f"speculative_config num_speculative_tokens must be an integer in "
                             f"[1, {self.MAX_TOKENS}]; got {k!r}")
        if self.method == "ngram":
            if self.model is not None or self.weights is not None:
                raise ValueError("speculative_config method ngram takes no 'model' or 'weights'")
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= "
                                 f"prompt_lookup_max; got {lo!r} and {hi!r}")
        if self.weights is not None and self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"speculative_config weights must be one of "
                             f"{', '.join(WEIGHT_FORMATS)}; got {self.weights!r}")
        if not isinstance(self.disable_by_batch_size, int) or self.disable_by_batch_size < 1:
            raise ValueError("speculative_config disable_by_batch_size must be at least 1; got "
                             f"{self.disable_by_batch_size!r}")
