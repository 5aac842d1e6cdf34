"""Weight quantization for the converter, done by the kernels library's build for this CPU
(ops.cc's conversion functions, through ctypes): numpy's version spent most of a quantized
conversion in it. The C++ does numpy's float32 arithmetic value for value (same bytes), and
releases the GIL, so large weights are split by rows over two threads.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial

import numpy as np
from ml_dtypes import bfloat16

from nanovllm_onnx.kernels import kernel_target, target_library

ROWS = 16  # output rows per packed record
THREADS = 2
SPLIT_BYTES = 1 << 20  # weights smaller than this run on one thread

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "NanovllmQuantizeBlocks": [_P, _I, _I, _I, _I, _I, _I, _P, _P, _P],
    "NanovllmQuantizePacked": [_P, _I, _I, _I, _I, _I, _I, _P],
    "NanovllmBlockCodes": [_P, _I, _I, _I, _P, _P, _I, _P],
    "NanovllmPackBlocks": [_P, _P, _P, _I, _I, _I, _I, _P],
    "NanovllmChannelScales": [_P, _I, _I, _I, _P],
    "NanovllmChannelCodes": [_P, _I, _I, _I, _I, _I, _P, _P, _I],
}


def _library() -> ctypes.CDLL:
    """The build sessions of this process get (NANO_VLLM_ONNX_KERNEL_TARGET may force one);
    asked once per weight, not per thread's part: kernel_target checks the sources' hash."""
    return _build(kernel_target())


@cache
def _build(target: str) -> ctypes.CDLL:
    library = target_library(target)
    for name, argtypes in _SIGNATURES.items():
        getattr(library, name).argtypes = argtypes
        getattr(library, name).restype = None
    return library


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(THREADS, thread_name_prefix="quantize")


def _by_rows(run: Callable[[int, int], None], rows: int, nbytes: int, multiple: int = 1) -> None:
    """run(lo, hi) over [0, rows) in THREADS parts of whole `multiple`s of rows."""
    step = -(-rows // THREADS // multiple) * multiple
    if nbytes < SPLIT_BYTES or step >= rows:
        run(0, rows)
        return
    for future in [_pool().submit(run, lo, min(lo + step, rows)) for lo in range(0, rows, step)]:
        future.result()


def _at(a: np.ndarray, row: int) -> int:
    return a.ctypes.data + row * a.strides[0]


def _weight(weight: np.ndarray) -> tuple[np.ndarray, bool]:
    """A contiguous float32 or bfloat16 weight (the library reads both), and whether bf16."""
    if weight.dtype == bfloat16:
        return np.ascontiguousarray(weight), True
    return np.ascontiguousarray(weight, np.float32), False


def quantize_blocks(weight: np.ndarray, bits: int, symmetric: bool, block: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes uint8 [n, blocks, block], scales and minimums float32 [n, blocks] of weight [n, k]
    (float32 or bfloat16; blocks of 32 or 128 inputs; rounding: graph.quantize_blocks)."""
    w, bf16 = _weight(weight)
    n, k = w.shape
    q = np.empty((n, -(-k // block), block), np.uint8)
    scale, minimum = (np.empty(q.shape[:2], np.float32) for _ in range(2))
    library = _library()
    _by_rows(lambda lo, hi: library.NanovllmQuantizeBlocks(
        _at(w, lo), bf16, hi - lo, k, block, bits, symmetric, _at(q, lo), _at(scale, lo),
        _at(minimum, lo)), n, w.nbytes)
    return q, scale, minimum


def quantize_packed(weight: np.ndarray, bits: int, symmetric: bool, block: int) -> np.ndarray:
    """pack_blocks(*quantize_blocks(weight, bits, symmetric, block), bits) in one pass, without
    the codes array between the two."""
    w, bf16 = _weight(weight)
    n, k = w.shape
    out = _records(n, -(-k // block), bits, block)
    library = _library()
    _by_rows(lambda lo, hi: library.NanovllmQuantizePacked(
        _at(w, lo), bf16, hi - lo, k, block, bits, symmetric, _at(out, lo // ROWS)), n,
        w.nbytes, multiple=ROWS)
    return out


def block_codes(values: np.ndarray, scale: np.ndarray, minimum: np.ndarray, bits: int
                ) -> np.ndarray:
    """Codes uint8 [n, blocks, block] of values [n, blocks * block] against fp16-valued scales
    and minimums float32 [n, blocks]: the nearest of 0 .. 2^bits - 1, 0 where the scale is 0."""
    v = np.ascontiguousarray(values, np.float32)
    scale, minimum = (np.ascontiguousarray(a, np.float32) for a in (scale, minimum))
    n, blocks = scale.shape
    block = v.shape[1] // blocks
    q = np.empty((n, blocks, block), np.uint8)
    library = _library()
    _by_rows(lambda lo, hi: library.NanovllmBlockCodes(
        _at(v, lo), hi - lo, blocks, block, _at(scale, lo), _at(minimum, lo), bits, _at(q, lo)),
        n, v.nbytes)
    return q


def pack_blocks(q: np.ndarray, scale: np.ndarray, minimum: np.ndarray, bits: int) -> np.ndarray:
    """BlockLinear's records uint8 [ceil(n / 16), blocks, record] of blocks of q.shape[2]
    inputs (32 or 128; see graph.pack_blocks)."""
    q = np.ascontiguousarray(q, np.uint8)
    scale, minimum = (np.ascontiguousarray(a, np.float16) for a in (scale, minimum))
    n, blocks, block = q.shape
    out = _records(n, blocks, bits, block)
    library = _library()
    _by_rows(lambda lo, hi: library.NanovllmPackBlocks(
        _at(q, lo), _at(scale, lo), _at(minimum, lo), hi - lo, blocks, block, bits,
        _at(out, lo // ROWS)), n, q.nbytes, multiple=ROWS)
    return out


def _records(n: int, blocks: int, bits: int, block: int) -> np.ndarray:
    """BlockLinear's packed records of n rows, uninitialized: each 16 rows' codes of `block`
    inputs, then their fp16 scales and minimums."""
    return np.empty((-(-n // ROWS), blocks, ROWS * block * bits // 8 + 4 * ROWS), np.uint8)


def quantize_channels(weight: np.ndarray | list[np.ndarray], rows: int
                      ) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """int8's per-channel weights of weight [n, k] (float32 or bfloat16; or a list of such,
    stacked by rows): float32 scales [n], one per output row, max(max |w|, 1e-12) / 127; and
    the codes transposed, [k, n], the nearest to w / scale: as chunks of `rows` rows (inputs),
    each made when asked for (the whole array, in fresh pages, cost more than coding it)."""
    parts = [_weight(part) for part in ([weight] if isinstance(weight, np.ndarray) else weight)]
    n, k = sum(len(w) for w, _ in parts), parts[0][0].shape[1]
    scale = np.empty(n, np.float32)
    library = _library()
    _each_part(parts, lambda w, bf16, first, lo, hi: library.NanovllmChannelScales(
        _at(w, lo), bf16, hi - lo, k, _at(scale, first + lo)))

    def codes(top: int, bottom: int) -> np.ndarray:  # inputs [top, bottom)
        qt = np.empty((bottom - top, n), np.int8)
        _each_part(parts, lambda w, bf16, first, lo, hi: library.NanovllmChannelCodes(
            _at(w, lo), bf16, hi - lo, k, top, bottom, _at(scale, first + lo),
            qt.ctypes.data + first + lo, n))
        return qt

    return scale, (codes(top, min(top + rows, k)) for top in range(0, k, rows))


def _each_part(parts: list[tuple[np.ndarray, bool]],
               run: Callable[[np.ndarray, bool, int, int, int], None]) -> None:
    """run(w, bf16, first, lo, hi) over rows [lo, hi) of each part, `first` = the part's first
    row in the stack (by rows over THREADS)."""
    first = 0
    for w, bf16 in parts:
        _by_rows(partial(run, w, bf16, first), len(w), w.nbytes)
        first += len(w)
