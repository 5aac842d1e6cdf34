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
    opts.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if cfg.execution_mode == "parallel"
                           else ort.ExecutionMode.ORT_SEQUENTIAL)
    opts.enable_mem_pattern = cfg.enable_mem_pattern
    opts.enable_cpu_mem_arena = cfg.enable_cpu_mem_arena
    session = ort.InferenceSession(str(graph), opts, providers=select_providers(cfg.providers))
    logger.info("ONNX Runtime %s: providers %s, %d intra-op / %d inter-op threads, %s execution, "
                "graph optimization %s", ort.__version__, ", ".join(session.get_providers()),
                cfg.intra_op_num_threads, cfg.inter_op_num_threads, cfg.execution_mode,
                cfg.graph_optimization_level)
    return session


def select_providers(names: list[str]) -> list[str]:
    """The asked-for execution providers this onnxruntime has, in order, then CPU; one
    warning for each that is missing (e.g. cuda without onnxruntime-gpu and a GPU)."""
    available = ort.get_available_providers()
    providers = []
    for name in names:
        full = PROVIDERS.get(name.lower(), name)
        if full in available:
            providers.append(full)
        else:
            logger.warning("execution provider %s is not available (this onnxruntime has %s); "
                           "running on the next one, CPU at the latest", full,
                           ", ".join(available))
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")
    return providers


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
        positions = [step.logit_positions(i) for i in range(len(step.seqs))]
        ends = np.cumsum([len(p) for p in positions])
        num_logits = int(ends[-1])
        if 2 * num_logits > len(self._logits):  # room for the result and a group's scratch
            self._logits = np.empty((2 * num_logits, self.cfg.vocab_size), np.float32)
        logits = self._logits[:num_logits]
        groups = self._groups(step)
        for group in groups:
            if len(groups) == 1:
                self._run_group(step, group, positions, logits)
                break
            rows = np.concatenate([np.arange(ends[i] - len(positions[i]), ends[i])
                                   for i in group]).astype(np.int64)
            scratch = self._logits[num_logits:num_logits + len(rows)]
            self._run_group(step, group, positions, scratch)
            logits[rows] = scratch
        return logits

    @staticmethod
    def _groups(step: StepInput) -> list[list[int]]:
        """Split a step into model calls whose padded [rows, longest query] layout wastes
        little: decodes (one token each) go together; prefill chunks are merged while the
        padding stays under the real tokens. A decode row padded to a 512-token chunk costs
        as much as the chunk itself, so a mixed step is cheaper as separate calls."""
        decode = [i for i, n in enumerate(step.num_tokens) if n == 1]
        chunks = sorted((i for i, n in enumerate(step.num_tokens) if n > 1),
                        key=lambda i: step.seqs[i].slot)
        groups = [decode] if decode else []
        current: list[int] = []
        for i in chunks:
            candidate = [*current, i]
            slots = [step.seqs[j].slot for j in candidate]
            counts = [step.num_tokens[j] for j in candidate]
            padded = (max(slots) - min(slots) + 1) * max(counts)
            if current and padded > 2 * sum(counts):
                groups.append(current)
                candidate = [i]
            current = candidate
        if current:
            groups.append(current)
        return [sorted(g) for g in groups]  # in step order: one group is then the whole step

    def _run_group(self, step: StepInput, group: list[int], positions: list[list[int]],
                   logits: np.ndarray) -> None:
        seqs = [step.seqs[i] for i in group]
        counts = [step.num_tokens[i] for i in group]
        slots = [s.slot for s in seqs]
        lo, hi = min(slots), max(slots) + 1
        rows, width = hi - lo, max(counts)
        total = sum(counts)
        input_ids = np.empty(total, np.int64)
        pad_index = np.zeros((rows, width), np.int64)  # padding reads token 0, never used
        unpad_index = np.empty((total, 2), np.int64)
        query_seqlens = np.zeros(rows, np.int32)
        seqlens_k = np.zeros(rows, np.int32)
        logits_index = []
        offset = 0
        for i, seq, n in zip(group, seqs, counts):
            row = seq.slot - lo
            start = seq.num_computed_tokens
            input_ids[offset:offset + n] = seq.token_ids[start:start + n]
            pad_index[row, :n] = np.arange(offset, offset + n)
            unpad_index[offset:offset + n, 0] = row
            unpad_index[offset:offset + n, 1] = np.arange(n)
            query_seqlens[row] = n
            seqlens_k[row] = start + n - 1
            logits_index.extend(offset + j for j in positions[i])
            offset += n
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
        b.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(b)
