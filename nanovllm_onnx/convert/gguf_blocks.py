"""A GGUF tensor's quantized blocks as BlockLinear blocks (w = q * scale + minimum per 32
inputs), kept as the file has them wherever the format allows.

Each block keeps the scale and minimum the file's own block gives: exact where those are fp16
values (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3_K, IQ4_NL), within fp16 rounding of a product where
they are products (Q4_K, Q5_K: d x a 6-bit sub-block scale). The codes of the common types
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) are unpacked from the file's bytes; Q3_K's and
IQ4_NL's are read back from `gguf.quants.dequantize`'s values (the reference the tests hold
every type to; it takes ~10x longer: over a minute for an 8B Q4_K_M). Q6_K and Q2_K keep a
scale (and Q2_K a minimum) per 16 inputs, which one 8-bit block of 32 cannot hold: those are
rounded again, to 8 bits from their minimum to their maximum per 32 (see
benchmarks/gguf_blocks.py for the error and bytes of each choice).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K, dequantize

from ..kernels import quantize
from .source import QuantBlocks

T = GGMLQuantizationType
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# Blocks of 32 with one fp16 d and w = d * (code - offset): offset per type. IQ4_NL's codes
# index a table of int8 values, which are the 8-bit code minus 128.
_SYMMETRIC = {T.Q4_0: 8, T.Q5_0: 16, T.Q8_0: 128, T.IQ4_NL: 128}
_WITH_MIN = (T.Q4_1, T.Q5_1)  # fp16 d and fp16 m, w = d * code + m
_K_QUANTS = (T.Q4_K, T.Q5_K)  # super-blocks of 256: fp16 d, dmin and 6-bit scales/mins per 32
_REROUNDED = (T.Q2_K, T.Q6_K)  # a scale per 16 inputs: rounded again to 8 bits per 32
SUPPORTED = (*FLOAT_TYPES, *_SYMMETRIC, *_WITH_MIN, T.Q3_K, *_K_QUANTS, *_REROUNDED)
_FOUR_BIT = (T.Q4_0, T.Q4_1, T.Q4_K)


def file_blocks(raw: np.ndarray, qtype: GGMLQuantizationType, rows: int,
                cols: int) -> QuantBlocks:
    """BlockLinear blocks of a quantized [rows, cols] tensor from its raw GGUF bytes."""
    from .graph import quantize_blocks

    if qtype in _REROUNDED:
        return quantize_blocks(dequantize(raw, qtype).reshape(rows, cols), 8, symmetric=False)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.asarray(raw).reshape(rows, cols // block_size, type_size)
    d = _half(blocks, 0)
    if qtype in _SYMMETRIC:
        scale, minimum = d, -_SYMMETRIC[qtype] * d
    elif qtype in _WITH_MIN:
        scale, minimum = d, _half(blocks, 2)
    elif qtype in _K_QUANTS:
        sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
        scale = (d[..., None] * sc.reshape(rows, -1, 8)).reshape(rows, -1)
        minimum = -(_half(blocks, 2)[..., None] * m.reshape(rows, -1, 8)).reshape(rows, -1)
    else:  # Q3_K: w = d * s * c, s a 6-bit signed scale per 16 and c in -4..3, so s * c is in
        # -124..128: 8-bit codes 128 - s * c with scale -d and minimum 128 d, both exact.
        d = np.repeat(_half(blocks, type_size - 2), block_size // 32, axis=1)
        scale, minimum = -d, 128 * d
    bits = block_bits(qtype)
    # Rounded to fp16, as BlockLinear stores them.
    scale, minimum = (a.astype(np.float16).astype(np.float32) for a in (scale, minimum))
    codes = _codes(blocks, qtype)
    if codes is None:  # the nearest code to the reference's values (0 where the scale is 0:
        # a constant block), the file's own where the scale and minimum are exact
        codes = quantize.block_codes(dequantize(raw, qtype).reshape(rows, cols), scale,
                                     minimum, bits)
    return QuantBlocks(codes.reshape(rows, -1, 32), scale, minimum, bits)


def _codes(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray | None:
    """The codes of [rows, blocks, bytes] GGUF blocks, in the order of their weights, as laid
    out by llama.cpp (ggml-quants.c); None for the types read back from their values."""
    if qtype == T.Q8_0:  # int8 after the fp16 d: code - 128 is the int8, its sign bit flipped
        return blocks[..., 2:] ^ np.uint8(0x80)
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):  # 16 bytes last: weights 0-15 in the low
        qs = blocks[..., -16:]                     # nibbles, 16-31 in the high ones
        codes = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)
        if qtype in (T.Q5_0, T.Q5_1):  # before them, weight i's fifth bit as bit i of a u32
            high = np.ascontiguousarray(blocks[..., -20:-16]).view("<u4")
            codes |= ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
        return codes
    if qtype in _K_QUANTS:  # super-blocks of 8 x 32 weights, codes in the last 128 bytes: 32
        # bytes hold sub-blocks 2j (low nibbles) and 2j + 1 (high); Q5_K's fifth bit of
        # sub-block b is bit b of the 32 bytes before them
        rows, supers = blocks.shape[:2]
        qs = blocks[..., -128:].reshape(rows, supers, 4, 1, 32)
        codes = ((qs >> np.array([0, 4], np.uint8)[:, None]) & np.uint8(15)).reshape(
            rows, supers, 8, 32)
        if qtype == T.Q5_K:
            high = blocks[..., 16:48].reshape(rows, supers, 1, 32)
            codes |= ((high >> np.arange(8, dtype=np.uint8)[:, None]) & np.uint8(1)) << 4
        return codes
    return None


def block_bits(qtype: GGMLQuantizationType) -> int:
    """The bits of the BlockLinear blocks a quantized type runs as."""
    return 4 if qtype in _FOUR_BIT else 8


def _half(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 at byte `offset` of each block, as float32."""
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(
        np.float32)
