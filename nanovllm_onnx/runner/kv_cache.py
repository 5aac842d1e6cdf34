"""KV cache memory: per-sequence slots that SlotAttention updates in place, and the prefix
store that cached blocks are copied to and from.

For the engine's own graph a slot's keys lie in tiles of KEY_TILE positions, dimension-major
([tiles, head_dim, KEY_TILE]: SlotAttention scores a whole tile with one vector per
dimension); everything else (values, an Optimum export's keys, the store's blocks) lies
position-major ([positions, head_dim]). An int8 cache's position is head_dim codes and its
scale's 4 bytes, head_dim + 4 elements wherever a float cache has head_dim (kernels/ops.cc).

Both live in anonymous memory maps: the OS commits a page only when it is first
written, and `release_*` hands pages back (MADV_DONTNEED), so the memory really
used follows the blocks the BlockManager accounts, not the capacity reserved.
"""

from __future__ import annotations

import mmap

import numpy as np

from nanovllm_onnx.config import ModelConfig, kv_width
from nanovllm_onnx.kernels import KEY_TILE

PAGE = mmap.PAGESIZE


def _lazy_array(shape: tuple[int, ...], dtype: np.dtype) -> tuple[mmap.mmap, np.ndarray]:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    buf = mmap.mmap(-1, nbytes, flags=flags)
    return buf, np.frombuffer(buf, dtype=dtype).reshape(shape)


class KVCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, capacity: int, num_blocks: int,
                 block_size: int, tiled_keys: bool, dtype: np.dtype) -> None:
        if tiled_keys and capacity % KEY_TILE:
            raise ValueError(f"slot capacity {capacity} is not a multiple of {KEY_TILE}")
        self.capacity = capacity
        self.block_size = block_size
        self.tiled_keys = tiled_keys
        self.dtype = dtype
        # A position's head_dim elements (int8: and its scale's bytes, see ops.cc)
        kvh, hd = cfg.num_kv_heads, kv_width(cfg.head_dim, dtype)
        key_shape = ((num_slots, kvh, capacity // KEY_TILE, hd, KEY_TILE) if tiled_keys
                     else (num_slots, kvh, capacity, hd))
        # [layer][key/value] -> (mmap, array)
        self._slots = [[_lazy_array(key_shape, dtype),
                        _lazy_array((num_slots, kvh, capacity, hd), dtype)]
                       for _ in range(cfg.num_layers)]
        self._store = [[_lazy_array((num_blocks, kvh, block_size, hd), dtype) for _ in range(2)]
                       for _ in range(cfg.num_layers)]
        self.slot_bytes = kvh * capacity * hd * dtype.itemsize
        self.store_block_bytes = kvh * block_size * hd * dtype.itemsize
        self._heads = np.arange(kvh)[None, :, None]
        self._offsets = np.arange(block_size)[None, None, :]

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self._slots[i][0][1], self._slots[i][1][1]

    def release_slot(self, slot: int) -> None:
        self._release(self._slots, slot * self.slot_bytes, self.slot_bytes)

    def release_store_blocks(self, blocks: list[int]) -> None:
        for b in blocks:
            self._release(self._store, b * self.store_block_bytes, self.store_block_bytes)

    @staticmethod
    def _release(maps: list[list[tuple[mmap.mmap, np.ndarray]]], start: int, length: int) -> None:
        # Only whole pages can be handed back; a partial page stays committed.
        lo = -(-start // PAGE) * PAGE
        hi = (start + length) // PAGE * PAGE
        if hi > lo:
            for pair in maps:
                for buf, _ in pair:
                    buf.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def _block_index(self, slots: list[int],
                     blocks: list[int]) -> tuple[tuple[np.ndarray | slice, ...], ...]:
        """Index of the blocks' positions in the key and the value slot arrays, each giving
        [blocks, kv_heads, block_size, head_dim] like the store."""
        s = np.asarray(slots)[:, None, None]
        pos = np.asarray(blocks)[:, None, None] * self.block_size + self._offsets
        value = (s, self._heads, pos)
        if not self.tiled_keys:
            return value, value
        return (s, self._heads, pos // KEY_TILE, slice(None), pos % KEY_TILE), value

    def copy_in(self, copies: list[tuple[int, int, int]]) -> None:
        """(store block, slot, block index in slot): cached K/V into slots."""
        if not copies:
            return
        store_ids, slots, blocks = (list(c) for c in zip(*copies))
        indices = self._block_index(slots, blocks)
        for slot_pair, store_pair in zip(self._slots, self._store):
            for (_, cache), (_, store), index in zip(slot_pair, store_pair, indices):
                cache[index] = store[store_ids]

    def copy_out(self, copies: list[tuple[int, int, int]]) -> None:
        """(slot, block index in slot, store block): newly full blocks into the store."""
        if not copies:
            return
        slots, blocks, store_ids = (list(c) for c in zip(*copies))
        indices = self._block_index(slots, blocks)
        for slot_pair, store_pair in zip(self._slots, self._store):
            for (_, cache), (_, store), index in zip(slot_pair, store_pair, indices):
                store[store_ids] = cache[index]
