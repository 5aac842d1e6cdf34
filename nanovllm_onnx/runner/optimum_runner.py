"""Runs an Optimum export (`past_key_values.N.key/value` in, `present.N.key/value` out) as it is.

The export keeps the past K/V outside the graph, so each step gathers every row's past from
its KV cache slot into a padded batch, runs, and writes the new K/V back into the slot: the
scheduler, prefix cache and sampler work on the same slots as with the engine's own graph. The
price is a copy of each row's past per step, which the engine's own graph (updating the slots
in place) does not pay.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nanovllm_onnx.config import EngineConfig, ModelConfig
from nanovllm_onnx.runner.kv_cache import KVCache
from nanovllm_onnx.runner.model_runner import StepInput, make_session

# Optimum's names, shared with the converter, which checks an export against them.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
CACHE_BRANCH = "use_cache_branch"  # decoder_model_merged.onnx: False = no past (first step)
LOGITS = "logits"
PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"
KV = ("key", "value")
KNOWN_INPUTS = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS, CACHE_BRANCH)
KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OptimumRunner:
    def __init__(self, model_dir: Path, model_cfg: ModelConfig, engine_cfg: EngineConfig,
                 kv_cache: KVCache) -> None:
        self.cfg = model_cfg
        self.kv = kv_cache
        self.session = make_session(model_cfg.graph_file(model_dir), engine_cfg)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.has_position_ids = POSITION_IDS in inputs
        self.has_cache_branch = CACHE_BRANCH in inputs
        self.kv_dtype = KV_DTYPES[inputs[PAST.format(0, "key")].type]
        self.outputs = [LOGITS] + [PRESENT.format(layer, kind)
                                   for layer in range(model_cfg.num_layers) for kind in KV]

    def run(self, step: StepInput) -> np.ndarray:
        """Run the step; returns the logits of each sequence's `step.logit_positions`, in order."""
        positions = [step.logit_positions(i) for i in range(len(step.seqs))]
        first_rows = np.cumsum([0] + [len(p) for p in positions])  # sequence i's first row
        logits = np.empty((first_rows[-1], self.cfg.vocab_size), np.float32)
        for group in self._groups(step):
            out = self._run_group(step, group)
            for r, i in enumerate(group):
                logits[first_rows[i]:first_rows[i + 1]] = out[r, positions[i]]
        return logits

    def _groups(self, step: StepInput) -> list[list[int]]:
        if self.has_position_ids:
            return [list(range(len(step.seqs)))]
        # Without position_ids the graph numbers the new tokens from the past's length (GPT-2's
        # learned positions), so only rows with as much past can share a call.
        groups: dict[int, list[int]] = {}
        for i in range(len(step.seqs)):
            groups.setdefault(step.start(i), []).append(i)
        return list(groups.values())

    def _run_group(self, step: StepInput, rows: list[int]) -> np.ndarray:
        """Run some of the step's sequences as one padded batch; returns the graph's logits
        [rows, longest new tokens, vocab]."""
        seqs = [step.seqs[i] for i in rows]
        counts = [step.num_tokens[i] for i in rows]
        starts = [step.start(i) for i in rows]
        batch, past, width = len(rows), max(starts), max(counts)
        input_ids = np.zeros((batch, width), np.int64)
        mask = np.zeros((batch, past + width), np.int64)
        positions = np.empty((batch, width), np.int64)
        for r, (i, start, n) in enumerate(zip(rows, starts, counts)):
            input_ids[r, :n] = step.input_ids(i)
            # The row's past ends where the new tokens start (left padding, as in HF batches);
            # the padding on both sides is masked out, so attention gives it exactly zero weight.
            mask[r, past - start:past + n] = 1
            # Padding repeats the last real position, so learned position tables stay in range.
            positions[r] = start + np.minimum(np.arange(width), n - 1)
        feed: dict[str, np.ndarray] = {INPUT_IDS: input_ids, ATTENTION_MASK: mask}
        if self.has_position_ids:
            feed[POSITION_IDS] = positions
        if self.has_cache_branch:
            feed[CACHE_BRANCH] = np.array([past > 0])
        kvh, hd = self.cfg.num_kv_heads, self.cfg.head_dim
        for layer in range(self.cfg.num_layers):
            for kind, cache in zip(KV, self.kv.layer(layer)):
                buf = np.zeros((batch, kvh, past, hd), self.kv_dtype)
                for r, (seq, start) in enumerate(zip(seqs, starts)):
                    buf[r, :, past - start:] = cache[seq.slot, :, :start]
                feed[PAST.format(layer, kind)] = buf
        out, *presents = self.session.run(self.outputs, feed)
        caches = [cache for layer in range(self.cfg.num_layers) for cache in self.kv.layer(layer)]
        for cache, present in zip(caches, presents):
            for r, (seq, start, n) in enumerate(zip(seqs, starts, counts)):
                cache[seq.slot, :, start:start + n] = present[r, :, past:past + n]
        return out
