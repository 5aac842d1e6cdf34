"""Runs one scheduled step through the ONNX Runtime session with IOBinding."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nanovllm_onnx.config import EngineConfig, ModelConfig
from nanovllm_onnx.engine.sequence import Sequence
from nanovllm_onnx.runner.kv_cache import KVCache

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass
class StepInput:
    """One step: for each sequence, how many of its uncomputed tokens to run."""

    seqs: list[Sequence]
    num_tokens: list[int]

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token this step (so it samples)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_tokens[i] == len(seq)

    def logit_positions(self, i: int) -> list[int]:
        """Which of sequence i's new tokens need logits: prompt tokens whose next token's
        prompt logprob is still owed (when asked for), then the last one when it samples."""
        seq, n = self.seqs[i], self.num_tokens[i]
        start = seq.num_computed_tokens
        positions: list[int] = []
        if seq.params.prompt_logprobs is not None:
            # Logits at position p give the logprob of prompt token p + 1.
            first = max(start, len(seq.prompt_logprobs) - 1)
            end = min(start + n, seq.num_prompt_tokens - 1)
            positions = list(range(first - start, end - start))
        if self.samples(i):
            positions.append(n - 1)
        return positions


def make_session(graph: Path, cfg: EngineConfig) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg.intra_op_num_threads
    opts.inter_op_num_threads = cfg.inter_op_num_threads
    opts.graph_optimization_level = OPT_LEVELS[cfg.graph_optimization_level]
    available = ort.get_available_providers()
    providers = []
    for name in cfg.providers:
        full = PROVIDERS.get(name.lower(), name)
        if full in available:
            providers.append(full)
        else:
            logger.warning("execution provider %s is not available here (available: %s); "
                           "falling back", full, ", ".join(available))
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    session = ort.InferenceSession(str(graph), opts, providers=providers)
    logger.info("ONNX Runtime %s, providers %s, %d intra-op / %d inter-op threads",
                ort.__version__, session.get_providers(), cfg.intra_op_num_threads,
                cfg.inter_op_num_threads)
    return session


class ModelRunner:
    def __init__(self, model_dir: Path, model_cfg: ModelConfig, engine_cfg: EngineConfig,
                 kv_cache: KVCache) -> None:
        self.cfg = model_cfg
        self.kv = kv_cache
        self.session = make_session(model_cfg.graph_file(model_dir), engine_cfg)
        self.binding = self.session.io_binding()
        self._logits = np.empty((engine_cfg.max_num_seqs, model_cfg.vocab_size), np.float32)
        self._bound_rows: tuple[int, int] | None = None
        self._cache_values: list[ort.OrtValue] = []

    def _bind_cache_rows(self, lo: int, hi: int) -> None:
        """Bind slots [lo, hi) of every layer as both past and present: updated in place."""
        if self._bound_rows == (lo, hi):
            return
        self._cache_values = []  # the binding does not keep the OrtValues alive
        for i in range(self.cfg.num_layers):
            for kind, array in zip(("key", "value"), self.kv.layer(i)):
                value = ort.OrtValue.ortvalue_from_numpy(array[lo:hi])
                self._cache_values.append(value)
                self.binding.bind_ortvalue_input(f"past_{kind}.{i}", value)
                self.binding.bind_ortvalue_output(f"present_{kind}.{i}", value)
        self._bound_rows = (lo, hi)

    def run(self, step: StepInput) -> np.ndarray:
        """Run the step; returns the logits of each sequence's `step.logit_positions`, in order."""
        seqs, counts = step.seqs, step.num_tokens
        slots = np.array([s.slot for s in seqs])
        lo, hi = int(slots.min()), int(slots.max()) + 1
        rows, width = hi - lo, max(counts)
        total = sum(counts)
        input_ids = np.empty(total, np.int64)
        pad_index = np.full(rows * width, total, np.int64)  # `total` is the zero row
        unpad_index = np.empty(total, np.int64)
        query_seqlens = np.zeros(rows, np.int32)
        seqlens_k = np.zeros(rows, np.int32)
        logits_index = []
        offset = 0
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            row = seq.slot - lo
            start = seq.num_computed_tokens
            input_ids[offset:offset + n] = seq.token_ids[start:start + n]
            pad_index[row * width:row * width + n] = np.arange(offset, offset + n)
            unpad_index[offset:offset + n] = np.arange(row * width, row * width + n)
            query_seqlens[row] = n
            seqlens_k[row] = start + n - 1
            logits_index.extend(offset + j for j in step.logit_positions(i))
            offset += n
        num_logits = len(logits_index)
        if num_logits > len(self._logits):
            self._logits = np.empty((num_logits, self.cfg.vocab_size), np.float32)
        b = self.binding
        b.bind_cpu_input("input_ids", input_ids)
        b.bind_cpu_input("pad_index", pad_index)
        b.bind_cpu_input("unpad_index", unpad_index)
        b.bind_cpu_input("logits_index", np.array(logits_index, np.int64))
        b.bind_cpu_input("seqlens_k", seqlens_k)
        b.bind_cpu_input("query_seqlens", query_seqlens)
        b.bind_cpu_input("total_sequence_length",
                         np.array(int(seqlens_k.max()) + 1, np.int32))
        self._bind_cache_rows(lo, hi)
        logits = self._logits[:num_logits]
        b.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(b)
        return logits
