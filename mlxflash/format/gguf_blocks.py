"""GGUF block types -> MLX affine quantization (codes packed in uint32, a scale and a bias per group).

MLX stores w = scale * q + bias per group of `group_size` consecutive weights of a row, the codes q
packed as one little-endian bit stream into uint32 words. Where a GGUF block is that same math on
sub-blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q8_K), its codes are kept and only the
scale and bias products are formed (exact in float32; float16 rounds them). The other types (Q6_K's
and Q2_K/Q3_K's sub-blocks of 16 with their own scales) are dequantized and requantized at
`REQUANT_BITS` (or the user's bits), and the error is measured. Decoding is vectorized numpy over
chunks of rows, so no float32 copy of a whole model (or of one large tensor) is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as ref

GROUP = 32
# Code bits of the types mapped exactly, with their codes and group scales.
EXACT_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q8_0: 8, T.Q4_K: 4, T.Q5_K: 5, T.Q8_K: 8}
# Requantized types: two more bits than the type's codes, because an MLX group of 32 spans two of their
# sub-blocks of 16 (each with its own scale): the added rounding stays about a quarter of the type's own step.
REQUANT_BITS = {T.Q2_K: 4, T.Q3_K: 5, T.Q6_K: 8}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
SUPPORTED = (*FLOAT_TYPES, *EXACT_BITS, *REQUANT_BITS)
_CHUNK = 1 << 21  # weights decoded at a time


@dataclass
class Affine:
    """One tensor in MLX's layout: weight (rows, cols*bits/32) uint32, scales/biases (rows, cols/32)."""

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int


@dataclass
class TypeReport:
    """What became of one GGUF tensor type."""

    tensors: int = 0
    weights: int = 0
    exact: bool = True  # codes kept; only float rounding of scale/bias products
    bits: set[int] = field(default_factory=set)  # MLX bit widths its tensors went to (empty: float)
    max_error: float = 0.0  # largest |mapped - gguf dequantized| over all weights of the type
    max_abs: float = 0.0  # largest |weight|, for scale

    def add(self, rows: int, cols: int, bits: int, err: float, absmax: float) -> None:
        self.tensors += 1
        self.weights += rows * cols
        if bits:
            self.bits.add(bits)
        self.max_error = max(self.max_error, err)
        self.max_abs = max(self.max_abs, absmax)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, k) codes < 2**bits -> (rows, k*bits/32) uint32, MLX's little-endian bit stream."""
    rows, k = codes.shape
    eight = codes.reshape(rows, k // 8, 8).astype(np.uint64)  # 8 codes = `bits` whole bytes
    word = (eight << (np.arange(8, dtype=np.uint64) * np.uint64(bits))).sum(axis=-1, dtype=np.uint64)
    raw = word[..., None].view(np.uint8).reshape(rows, k // 8, 8)[..., :bits]  # little-endian machine
    return np.ascontiguousarray(raw).reshape(rows, k * bits // 8).view(np.uint32)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack`: (rows, k*bits/32) uint32 -> (rows, k) uint8."""
    rows = packed.shape[0]
    raw = packed.view(np.uint8).reshape(rows, -1, bits)  # (rows, k/8, bits bytes)
    wide = np.zeros((*raw.shape[:2], 8), np.uint8)
    wide[..., :bits] = raw
    word = wide.view(np.uint64)  # (rows, k/8, 1)
    codes = (word >> (np.arange(8, dtype=np.uint64) * np.uint64(bits))) & np.uint64((1 << bits) - 1)
    return codes.reshape(rows, -1).astype(np.uint8)


def _f16(a: np.ndarray) -> np.ndarray:
    return a.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32): low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bit i of element i."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def decode(qtype: T, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, type_size) blocks -> codes (n*B/32, 32) uint8, scales and biases (n*B/32,) float32.

    w = scale * code + bias for each group of 32, the same numbers gguf's dequantizer computes.
    """
    n = blocks.shape[0]
    if qtype in (T.Q4_0, T.Q5_0, T.Q8_0):
        d = _f16(blocks[:, :2])[:, 0]
        if qtype == T.Q8_0:
            codes = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            return codes, d, -128 * d
        if qtype == T.Q4_0:
            return _nibbles(blocks[:, 2:]), d, -8 * d
        return _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4), d, -16 * d
    if qtype in (T.Q4_1, T.Q5_1):
        d, m = _f16(blocks[:, :2])[:, 0], _f16(blocks[:, 2:4])[:, 0]
        if qtype == T.Q4_1:
            return _nibbles(blocks[:, 4:]), d, m
        return _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4), d, m
    if qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])  # (n, 1)
        sc, mins = ref.Q4_K.get_scale_min(blocks[:, 4:16])  # (n, 8) each, 6-bit
        qs = blocks[:, -128:].reshape(n, 4, 1, 32)  # sub-blocks 2p and 2p+1 share 32 bytes
        codes = ((qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
        if qtype == T.Q5_K:
            qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            codes = codes | ((qh & 1) << 4)  # sub-block j takes bit j of each qh byte
        scale = d * sc.astype(np.float32)  # (n, 8)
        bias = -(dmin * mins.astype(np.float32))
        return codes.reshape(n * 8, 32), scale.reshape(-1), bias.reshape(-1)
    if qtype == T.Q8_K:  # float32 d, 256 int8, 16 int16 sums (unused)
        d = np.repeat(blocks[:, :4].copy().view(np.float32)[:, 0], 8)
        codes = (blocks[:, 4:260].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return codes.reshape(n * 8, 32), d, -128 * d
    raise ValueError(f"{qtype.name} has no exact affine decoding")


def dequantize_q8_k(blocks: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q8_K (gguf-py has none): w = d * q."""
    d = blocks[:, :4].copy().view(np.float32)
    return d * blocks[:, 4:260].view(np.int8).astype(np.float32)


def reference(qtype: T, raw: np.ndarray) -> np.ndarray:
    """float32 weights of raw GGUF rows, by gguf's own dequantizer."""
    if qtype in FLOAT_TYPES:
        return ref.dequantize(raw, qtype).astype(np.float32, copy=False)
    if qtype == T.Q8_K:
        block, size = 256, 292
        return dequantize_q8_k(raw.reshape(-1, size)).reshape(raw.shape[0], raw.shape[1] // size * block)
    return ref.dequantize(raw, qtype)


def _row_chunks(rows: int, cols: int):
    step = max(1, _CHUNK // cols)
    for r in range(0, rows, step):
        yield slice(r, min(rows, r + step))


def _empty_affine(rows: int, cols: int, bits: int, dtype: np.dtype) -> Affine:
    """An (rows, cols) tensor's MLX affine arrays, groups of 32, to be filled chunk by chunk."""
    groups = cols // GROUP
    return Affine(
        np.empty((rows, cols * bits // 32), np.uint32),
        np.empty((rows, groups), dtype),
        np.empty((rows, groups), dtype),
        bits,
    )


def map_exact(qtype: T, raw: np.ndarray, cols: int, bits: int, dtype: np.dtype) -> tuple[Affine, float, float]:
    """An exactly mappable tensor (raw (rows, bytes) uint8) at `bits` >= its code bits.

    Returns the tensor, the largest error (float rounding of scales/biases) and the largest |w|.
    """
    rows = raw.shape[0]
    block, size = ref.GGML_QUANT_SIZES[qtype]
    groups = cols // GROUP
    out = _empty_affine(rows, cols, bits, dtype)
    err = absmax = 0.0
    for rs in _row_chunks(rows, cols):
        n = rs.stop - rs.start
        codes, scale, bias = decode(qtype, np.asarray(raw[rs]).reshape(-1, size))
        out.weight[rs] = pack(codes.reshape(n, cols), bits)
        out.scales[rs], out.biases[rs] = scale.reshape(n, groups), bias.reshape(n, groups)
        exact = reference(qtype, np.asarray(raw[rs])).reshape(-1, GROUP)  # (groups, 32): gguf's numbers
        stored = out.scales[rs].reshape(-1, 1).astype(np.float32) * codes + out.biases[rs].reshape(-1, 1)
        err = max(err, float(np.abs(stored - exact).max()))
        absmax = max(absmax, float(np.abs(exact).max()))
    return out, err, absmax


def requantize(qtype: T, raw: np.ndarray, cols: int, bits: int, dtype: np.dtype) -> tuple[Affine, float, float]:
    """Any dequantizable tensor -> MLX affine, group 32, `bits`, through float32 chunk by chunk."""
    rows = raw.shape[0]
    out = _empty_affine(rows, cols, bits, dtype)
    err = absmax = 0.0
    mdtype = {np.float16: mx.float16, np.float32: mx.float32}[np.dtype(dtype).type]
    for rs in _row_chunks(rows, cols):
        w = reference(qtype, np.asarray(raw[rs]))
        q, s, b = mx.quantize(mx.array(w), group_size=GROUP, bits=bits)
        s, b = s.astype(mdtype), b.astype(mdtype)
        back = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=GROUP, bits=bits)
        err = max(err, mx.abs(back - mx.array(w)).max().item())
        absmax = max(absmax, float(np.abs(w).max()))
        out.weight[rs], out.scales[rs], out.biases[rs] = np.array(q), np.array(s), np.array(b)
    return out, err, absmax


def promote(t: Affine, bits: int) -> Affine:
    """The same codes, scales and biases at more bits (exact: codes < 2**t.bits fit)."""
    if bits == t.bits:
        return t
    return Affine(pack(unpack(t.weight, t.bits), bits), t.scales, t.biases, bits)
