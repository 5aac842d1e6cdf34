"""Continuous batching: every step mixes running decodes with prefill chunks of waiting ones."""

from __future__ import annotations

from collections import deque

from nanovllm_onnx.engine.block_manager import BlockManager, CacheCopies
from nanovllm_onnx.engine.sequence import Sequence, SequenceStatus
from nanovllm_onnx.runner.model_runner import StepInput


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[StepInput, CacheCopies]:
        """Pick this step's work: running sequences first (FCFS), then waiting ones."""
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        step = StepInput([], [])
        copies = CacheCopies()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            # Draft tokens are verified in this step, so they are run (and hold blocks) too.
            n = min(seq.num_uncomputed_tokens + len(seq.draft_token_ids), budget)
            if n > seq.num_uncomputed_tokens and not bm.can_allocate(bm.blocks_needed(seq, n)):
                n = seq.num_uncomputed_tokens  # drafts never cost another sequence its place
            del seq.draft_token_ids[max(0, n - seq.num_uncomputed_tokens):]
            while not bm.can_allocate(bm.blocks_needed(seq, n)):
                # Out of KV memory: preempt the newest running sequence (maybe this one).
                self._preempt(self.running.pop())
                if seq.status != SequenceStatus.RUNNING:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            bm.allocate(seq, n)
            step.seqs.append(seq)
            step.num_tokens.append(n)
            budget -= n
            i += 1
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and bm.free_slots):
            seq = self.waiting[0]
            hits = bm.cached_prefix_blocks(seq)
            n = min(len(seq) - hits * bm.block_size, budget)
            if not bm.can_allocate(hits + -(-n // bm.block_size)):
                break
            bm.admit(seq, hits, copies)
            bm.allocate(seq, n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.seqs.append(seq)
            step.num_tokens.append(n)
            budget -= n
        return step, copies

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence; it is recomputed later from its tokens (nothing lost)."""
        self.block_manager.free(seq)
        seq.draft_token_ids = []
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence, wherever it is, and free its memory."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
