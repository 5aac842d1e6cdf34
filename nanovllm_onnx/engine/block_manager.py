"""KV memory accounting in blocks, cache slots, and the prefix cache.

Each running sequence owns a slot: a contiguous row of the KV cache that
SlotAttention updates in place. Slot memory is committed lazily by the OS
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
from collections.abc import Callable
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
                 enable_prefix_caching: bool = True,
                 release_slot: Callable[[int], None] = lambda slot: None) -> None:
        # release_slot hands a freed slot's memory back to the OS.
        self.release_slot = release_slot
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first
        self.num_seq_blocks = 0  # blocks held by running sequences
        # Prefix store: hash -> (store block, token ids), in LRU order (oldest first).
        self.cached: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()
        self.free_store_blocks = list(range(num_blocks - 1, -1, -1))
        self.evicted_store_blocks: set[int] = set()  # free store blocks whose memory to release
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

    def _evict_oldest(self) -> None:
        _, (store_block, _) = self.cached.popitem(last=False)
        self.free_store_blocks.append(store_block)
        self.evicted_store_blocks.add(store_block)

    def take_evicted_store_blocks(self) -> list[int]:
        """Store blocks evicted and not reused since: their memory can go back to the OS."""
        blocks, self.evicted_store_blocks = list(self.evicted_store_blocks), set()
        return blocks

    def cached_prefix_blocks(self, seq: Sequence) -> int:
        """How many leading full blocks of a waiting sequence are in the prefix cache."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0  # as vLLM: prompt logprobs need every prompt position computed
        self._hash_full_blocks(seq)
        usable = self._reusable_blocks(seq)
        hits = 0
        while hits < usable:
            entry = self.cached.get(seq.block_hashes[hits])
            start = hits * self.block_size
            if entry is None or entry[1] != tuple(seq.token_ids[start:start + self.block_size]):
                break
            hits += 1
        return hits

    def _reusable_blocks(self, seq: Sequence) -> int:
        """Full prompt blocks a cache hit may cover: at least one token is left to compute,
        since the model must produce its logits."""
        return min(len(seq.block_hashes), (len(seq) - 1) // self.block_size)

    def admit(self, seq: Sequence, num_cached_blocks: int, copies: CacheCopies) -> None:
        """Give a waiting sequence a slot and copy its cached prefix blocks into it."""
        assert seq.slot is None and seq.num_blocks == 0
        seq.slot = self.free_slots.pop()
        for i in range(num_cached_blocks):
            h = seq.block_hashes[i]
            self.cached.move_to_end(h)
            copies.copy_in.append((self.cached[h][0], seq.slot, i))
        self.prefix_queries += self._reusable_blocks(seq)
        self.prefix_hits += num_cached_blocks
        seq.num_stored_blocks = num_cached_blocks
        seq.num_computed_tokens = seq.num_cached_tokens = num_cached_blocks * self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Account the blocks for `num_new_tokens` more tokens (call can_allocate first)."""
        needed = self.blocks_needed(seq, num_new_tokens)
        while self.num_free_blocks < needed:
            self._evict_oldest()
        self.num_seq_blocks += needed
        seq.num_blocks += needed

    def on_computed(self, seq: Sequence, copies: CacheCopies) -> None:
        """After a step: put the sequence's newly full blocks into the prefix store."""
        if not self.enable_prefix_caching:
            return
        self._hash_full_blocks(seq)
        # Accepted draft tokens are computed before the engine appends them: their blocks are
        # stored next step, once their tokens are known.
        num_full = min(seq.num_computed_tokens, len(seq)) // self.block_size
        for i in range(seq.num_stored_blocks, num_full):
            h = seq.block_hashes[i]
            if h in self.cached:
                continue
            if self.num_free_blocks < 1:
                if not self.cached:
                    return  # no memory to spare for caching now; retried next step
                self._evict_oldest()
            store_block = self.free_store_blocks.pop()
            self.evicted_store_blocks.discard(store_block)
            start = i * self.block_size
            self.cached[h] = (store_block, tuple(seq.token_ids[start:start + self.block_size]))
            copies.copy_out.append((seq.slot, i, store_block))
        seq.num_stored_blocks = max(seq.num_stored_blocks, num_full)

    def release_rejected(self, seq: Sequence) -> None:
        """After verification: give back the blocks that held only rejected draft tokens."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        if seq.num_blocks > keep:
            self.num_seq_blocks -= seq.num_blocks - keep
            seq.num_blocks = keep

    def _hash_full_blocks(self, seq: Sequence) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), len(seq) // bs):
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(block_hash(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))

    def free(self, seq: Sequence) -> None:
        """Release a finished, aborted or preempted sequence's slot and blocks."""
        if seq.slot is not None:
            self.release_slot(seq.slot)
            self.free_slots.append(seq.slot)
        self.num_seq_blocks -= seq.num_blocks
        seq.slot, seq.num_blocks, seq.num_stored_blocks = None, 0, 0
        seq.num_computed_tokens = seq.num_draft_computed = 0
