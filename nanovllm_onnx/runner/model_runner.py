"""Runs one scheduled step through the ONNX Runtime session with IOBinding."""

from __future__ import annotations

import logging
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from nanovllm_onnx.config import EngineConfig, ModelConfig, kv_width
from nanovllm_onnx.engine.sequence import Sequence
from nanovllm_onnx.kernels import (
    EITHER_ROLE,
    INT8_ROLE,
    PROMPT_ROLE,
    PROMPT_ROWS,
    custom_ops_library,
)
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
    """One step: for each sequence, how many of its uncomputed tokens to run, followed by its
    proposed draft tokens (speculative decoding) when it decodes."""

    seqs: list[Sequence]
    num_tokens: list[int]

    def start(self, i: int) -> int:
        """Tokens of sequence i already in its cache slot: where its new tokens go."""
        return self.seqs[i].num_computed_tokens

    def input_ids(self, i: int) -> list[int]:
        seq, start, n = self.seqs[i], self.start(i), self.num_tokens[i]
        ids = seq.token_ids[start:start + n]
        first_draft = max(0, start - len(seq))
        return ids + seq.draft_token_ids[first_draft:first_draft + n - len(ids)]

    def num_prompt_tokens(self, i: int) -> int:
        """How many of sequence i's new tokens are its prompt's; the rest were generated
        (sampled, drafts to verify, or recomputed after a preemption)."""
        return max(0, min(self.num_tokens[i], self.seqs[i].num_prompt_tokens - self.start(i)))

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token this step (so it samples)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_tokens[i] == len(seq) + len(seq.draft_token_ids)

    def num_samples(self, i: int) -> int:
        """Rows sequence i samples: its next token, and one more per draft token to verify."""
        return 1 + len(self.seqs[i].draft_token_ids) if self.samples(i) else 0

    def logit_positions(self, i: int) -> list[int]:
        """Which of sequence i's new tokens need logits: prompt tokens whose next token's
        prompt logprob is still owed (when asked for), then the last one when it samples
        (and the drafts' positions: each gives the logits that verify the next draft)."""
        seq, n = self.seqs[i], self.num_tokens[i]
        start = seq.num_computed_tokens
        positions: list[int] = []
        if seq.params.prompt_logprobs is not None:
            # Logits at position p give the logprob of prompt token p + 1.
            first = max(start, len(seq.prompt_logprobs) - 1)
            end = min(start + n, seq.num_prompt_tokens - 1)
            positions = list(range(first - start, end - start))
        positions.extend(range(n - self.num_samples(i), n))
        return positions


def make_session(graph: Path | onnx.ModelProto, cfg: EngineConfig,
                 custom_ops: Path | None = None, external_data_dir: Path | None = None,
                 prepack: bool = True,
                 initializers: dict[str, ort.OrtValue] | None = None) -> ort.InferenceSession:
    """A session for a graph file, or for a graph in memory whose weights lie in
    `external_data_dir`. ONNX Runtime maps external weights from their file (one copy, in
    the page cache, shared by every process serving the model), or takes them as given in
    `initializers` (not copied: they must outlive the session); `prepack` lets its kernels
    copy them into their own layouts (a second, private copy)."""
    opts = ort.SessionOptions()
    if custom_ops is not None:
        opts.register_custom_ops_library(str(custom_ops))
    if external_data_dir is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(external_data_dir))
    for name, value in (initializers or {}).items():
        opts.add_initializer(name, value)
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.intra_op_num_threads = cfg.intra_op_num_threads
    if not cfg.intra_op_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = cfg.inter_op_num_threads
    opts.graph_optimization_level = OPT_LEVELS[cfg.graph_optimization_level]
    opts.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if cfg.execution_mode == "parallel"
                           else ort.ExecutionMode.ORT_SEQUENTIAL)
    opts.enable_mem_pattern = cfg.enable_mem_pattern
    opts.enable_cpu_mem_arena = cfg.enable_cpu_mem_arena
    model = graph.SerializeToString() if isinstance(graph, onnx.ModelProto) else str(graph)
    session = ort.InferenceSession(model, opts, providers=select_providers(cfg.providers))
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


def with_cache_dtype(graph: Path, dtype: np.dtype, width: int) -> onnx.ModelProto:
    """The graph (without its weights) with its KV cache inputs and outputs in `dtype`, a
    position `width` elements (config.kv_width): the converter writes them fp32,
    SlotAttention takes fp32, fp16 or int8."""
    model = onnx.load(str(graph), load_external_data=False)
    elem_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key.", "past_value.", "present_key.", "present_value.")):
            value.type.tensor_type.elem_type = elem_type
            value.type.tensor_type.shape.dim[3].dim_value = width  # (both: [.., head_dim, ..])
    return model


def external_data_files(model: onnx.ModelProto) -> set[str]:
    """The files holding the graph's external initializers."""
    return {entry.value for tensor in model.graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


def map_in_huge_pages(path: Path) -> mmap.mmap:
    """A read-only shared mapping of a weight file, read into the page cache as 2 MiB pages
    (Linux: a MADV_HUGEPAGE mapping reads ahead whole huge pages), so that it takes one TLB
    entry per 2 MiB: a decode step reads every weight, and the same 1B int4 file decoded at
    22 tok/s from 4 KiB cached pages, 26-28 from huge ones. Its cached 4 KiB pages are
    dropped first (pages another process maps stay); reading 1 GB back took ~0.5 s here."""
    with open(path, "rb") as f:
        huge = hasattr(mmap, "MADV_HUGEPAGE")
        if huge:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        pages = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    if huge:
        pages.madvise(mmap.MADV_HUGEPAGE)
        for offset in range(0, len(pages), mmap.PAGESIZE):
            pages[offset]  # fault it in (a whole huge page where the kernel can)
    return pages


def map_weights(model: onnx.ModelProto, folder: Path) -> dict[str, ort.OrtValue]:
    """The graph's external initializers as arrays over one mapping of each weight file, all
    of it in 2 MiB pages. ONNX Runtime maps each initializer on its own, and the parts of
    those mappings that do not cover a whole 2 MiB of the file (the ends of each matrix; a 1B
    int4 model's 17%) stay in 4 KiB pages, which a decode streams ~20% slower."""
    maps = {name: map_in_huge_pages(folder / name) for name in external_data_files(model)}
    weights = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        array = np.frombuffer(maps[entry["location"]], dtype, math.prod(tensor.dims),
                              int(entry.get("offset", 0)))
        weights[tensor.name] = ort.OrtValue.ortvalue_from_numpy(array.reshape(tensor.dims))
    return weights


class ModelRunner:
    def __init__(self, model_dir: Path, model_cfg: ModelConfig, engine_cfg: EngineConfig,
                 kv_cache: KVCache) -> None:
        self.cfg = model_cfg
        self.kv = kv_cache
        graph = model_cfg.graph_file(model_dir)
        # int8's DynamicQuantizeMatMul needs its weights prepacked (2-6x slower without,
        # M = 1-256 rows). fp32's Gemm decodes as fast without (1.05x with), but packs its
        # weights again in every call of two or more rows: a prefill is 1.15-1.5x faster prepacked,
        # a speculative verification of 7 rows 1.4x; and packed and unpacked Gemm round apart
        # (logits within 2e-4), so an engine with speculation and one without must both
        # prepack to give the same tokens. BlockLinear reads its blocks as they lie in the file.
        prepack = model_cfg.weights in ("int8", "fp32")
        width = kv_width(model_cfg.head_dim, kv_cache.dtype)
        model = with_cache_dtype(graph, kv_cache.dtype, width)
        # Without prepacking the kernels read the weights from the file's pages at every step.
        self._weights = {} if prepack else map_weights(model, graph.parent)
        self.session = make_session(model, engine_cfg,
                                    custom_ops=custom_ops_library(),
                                    external_data_dir=graph.parent, prepack=prepack,
                                    initializers=self._weights)
        self.binding = self.session.io_binding()
        self._logits = np.empty((engine_cfg.max_num_seqs, model_cfg.vocab_size), np.float32)
        self._bound_rows: tuple[int, int] | None = None
        self._prompt_rows = PROMPT_ROWS in {i.name for i in self.session.get_inputs()}
        self._generated_role = INT8_ROLE if engine_cfg.batch_invariant else EITHER_ROLE
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
        """Run the step as one model call; returns the logits of each sequence's
        `step.logit_positions`, in order. The tokens go in packed by cache slot, as
        SlotAttention reads them; the slots between the step's lowest and highest are idle
        rows (query length 0) that cost nothing."""
        slots = [seq.slot for seq in step.seqs]
        lo, hi = min(slots), max(slots) + 1
        order = sorted(range(len(step.seqs)), key=slots.__getitem__)
        offsets = np.cumsum([0] + [step.num_tokens[i] for i in order])
        input_ids = np.empty(offsets[-1], np.int64)
        # BlockLinear's path for each row (the graph's prompt_rows input, see ops.cc): AMX's
        # bf16 path for prompt tokens (1); generated ones (decodes, drafts, recomputed ones)
        # whichever is faster for the step's size (2), or, batch-invariant, the int8 path (0)
        # whatever shares their step. Other CPUs run every row on the int8 path.
        roles = np.full(offsets[-1], self._generated_role, np.uint8)
        past_lens = np.zeros(hi - lo, np.int32)
        query_lens = np.zeros(hi - lo, np.int32)
        first_token = {}
        for i, offset in zip(order, offsets):
            seq, n = step.seqs[i], step.num_tokens[i]
            start = step.start(i)
            input_ids[offset:offset + n] = step.input_ids(i)
            roles[offset:offset + step.num_prompt_tokens(i)] = PROMPT_ROLE
            past_lens[seq.slot - lo], query_lens[seq.slot - lo] = start, n
            first_token[i] = offset
        logits_index = np.array([first_token[i] + j for i in range(len(step.seqs))
                                 for j in step.logit_positions(i)], np.int64)
        if len(logits_index) > len(self._logits):
            self._logits = np.empty((len(logits_index), self.cfg.vocab_size), np.float32)
        logits = self._logits[:len(logits_index)]
        b = self.binding
        b.bind_cpu_input("input_ids", input_ids)
        b.bind_cpu_input("logits_index", logits_index)
        b.bind_cpu_input("past_lens", past_lens)
        b.bind_cpu_input("query_lens", query_lens)
        if self._prompt_rows:
            b.bind_cpu_input(PROMPT_ROWS, roles)
        self._bind_cache_rows(lo, hi)
        b.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(b)
        return logits
