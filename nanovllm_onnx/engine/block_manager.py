"""KV memory accounting in blocks, cache slots, and the prefix cache.

Each running sequence owns a slot: a contiguous row of the KV cache that
GroupQueryAttention updates in place. Slot memory is committed lazily by the OS
and released when the slot is freed, so what a sequence really costs is its
blocks: ceil(tokens / block_size). The KV budget is a number of blocks shared by
the running sequences and the prefix cache.

Prefix cache: a full block is keyed by a hash of its token ids and of every
token before it. When a sequence fills a block, its K/V are copied into the
prefix store; a later prompt that starts with cached blocks copies them into its
own slot instead of recomputing them. Cached blocks are evicted least recently
used when running sequences need the memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from nanovllm_onnx.engine.sequence import Sequence


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


@dataclass
class CacheCopies:
    """K/V copies the runner performs around one model call."""

    # (store block, slot, block index in the slot): before the call, cached prefix into slots
    copy_in: list[tuple[int, int, int]] = field(default_factory=list)
    # (slot, block index in the slot, store block): after the call, newly full blocks to the store
    copy_out: list[tuple[int, int, int]] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_slots: int,
                 enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first
        self.num_seq_blocks = 0  # blocks held by running sequences
        # Prefix store: hash -> (store block, token ids), in LRU order (oldest first).
        self.cached: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()
        self.free_store_blocks = list(range(num_blocks - 1, -1, -1))
        self.evicted_store_blocks: list[int] = []  # for the runner to release their memory
        self.prefix_hits = 0  # blocks reused from the prefix cache
        self.prefix_queries = 0  # full prompt blocks looked up

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self.num_seq_blocks - len(self.cached)

    @property
    def usage(self) -> float:
        return (self.num_seq_blocks + len(self.cached)) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - seq.num_blocks)

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether `num_blocks` can be had, evicting cached blocks if needed."""
        return num_blocks <= self.num_free_blocks + len(self.cached)

    def _reserve(self, num_blocks: int) -> None:
        while self.num_free_blocks < num_blocks:
            _, (store_block, _) = self.cached.popitem(last=False)
            self.free_store_blocks.append(store_block)
            self.evicted_store_blocks.append(store_block)
        self.num_seq_blocks += num_blocks

    def admit(self, seq: Sequence, copies: CacheCopies) -> None:
        """Give a waiting sequence a slot and reuse its cached prefix blocks."""
        assert seq.slot is None and seq.num_blocks == 0
        seq.slot = self.free_slots.pop()
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        if not self.enable_prefix_caching:
            return
        self._hash_full_blocks(seq)
        # Keep at least one token to compute: the model must produce its logits.
        usable = min(len(seq.block_hashes), (len(seq) - 1) // self.block_size)
        self.prefix_queries += usable
        hits = 0
        while hits < usable:
            entry = self.cached.get(seq.block_hashes[hits])
            start = hits * self.block_size
            if entry is None or entry[1] != tuple(seq.token_ids[start:start + self.block_size]):
                break
            self.cached.move_to_end(seq.block_hashes[hits])
            copies.copy_in.append((entry[0], seq.slot, hits))
            hits += 1
        self.prefix_hits += hits
        seq.num_stored_blocks = hits
        seq.num_computed_tokens = seq.num_cached_tokens = hits * self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Account the blocks for `num_new_tokens` more tokens (call can_allocate first)."""
        needed = self.blocks_needed(seq, num_new_tokens)
        self._reserve(needed)
        seq.num_blocks += needed

    def on_computed(self, seq: Sequence, copies: CacheCopies) -> None:
        """After a step: put the sequence's newly full blocks into the prefix store."""
        if not self.enable_prefix_caching:
            return
        self._hash_full_blocks(seq)
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(seq.num_stored_blocks, num_full):
            h = seq.block_hashes[i]
            if h in self.cached:
                continue
            if not self.free_store_blocks or self.num_free_blocks < 1:
                if not self.cached:
                    return  # no memory to spare for caching now
                _, (old, _) = self.cached.popitem(last=False)
                self.free_store_blocks.append(old)
                self.evicted_store_blocks.append(old)
            store_block = self.free_store_blocks.pop()
            start = i * self.block_size
            self.cached[h] = (store_block, tuple(seq.token_ids[start:start + self.block_size]))
            copies.copy_out.append((seq.slot, i, store_block))
        seq.num_stored_blocks = max(seq.num_stored_blocks, num_full)

    def _hash_full_blocks(self, seq: Sequence) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), len(seq) // bs):
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(block_hash(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))

    def free(self, seq: Sequence) -> None:
        """Release a finished, aborted or preempted sequence's slot and blocks."""
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
        self.num_seq_blocks -= seq.num_blocks
        seq.slot, seq.num_blocks, seq.num_stored_blocks = None, 0, 0
        seq.num_computed_tokens = 0
