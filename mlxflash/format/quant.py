"""MLX affine quantization as the format stores it: mlx-lm's per-module parameters and packed codes.

MLX packs codes into a little-endian bit stream of uint32 words (`32 // bits` per word for 2, 4, 8
bits; 3, 5 and 6-bit codes may straddle two words, every 32 codes filling exactly `bits` words). A bundle keeps the
down projection's codes per neuron (a column of the (d, n) matrix), so the converter transposes packed
matrices and the runtime unpacks a neuron's column to multiply it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def quant_params(qcfg: dict, module: str) -> dict:
    """mlx-lm's quantization config: per-module overrides, else the defaults."""
    own = qcfg.get(module)
    if isinstance(own, dict):
        return {"group_size": own["group_size"], "bits": own["bits"]}
    return {"group_size": qcfg["group_size"], "bits": qcfg["bits"]}


def _stream_positions(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """For 32 codes in `bits` words of MLX's bit stream: each code's first word and bit offset."""
    start = np.arange(32) * bits
    return start // 32, start % 32


def unpack_codes(packed: mx.array, bits: int) -> mx.array:
    """(n, k*bits/32) packed uint32 -> (n, k) uint32 codes, little end first as MLX packs."""
    if 32 % bits == 0:
        per = 32 // bits
        shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
        codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # (n, k/per, per)
        return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)
    # 3, 5, 6 bits: a code may straddle two words; every 32 codes fill exactly `bits` words.
    word, offset = _stream_positions(bits)
    words = packed.reshape(*packed.shape[:-1], -1, bits)  # (n, k/32, bits)
    lo = words[..., mx.array(word)] >> mx.array(offset, dtype=mx.uint32)
    spill = offset + bits > 32  # the code's high bits sit in the next word
    nxt = words[..., mx.array(np.minimum(word + 1, bits - 1))]
    hi = mx.where(mx.array(spill), nxt << mx.array(np.where(spill, 32 - offset, 0), dtype=mx.uint32), 0)
    return ((lo | hi) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], -1)


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Inverse of unpack_codes along the last axis."""
    if 32 % bits == 0:
        per = 32 // bits
        shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
        grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
        return (grouped << shifts).sum(axis=-1).astype(mx.uint32)
    word, offset = _stream_positions(bits)
    grouped = codes.astype(mx.uint32).reshape(*codes.shape[:-1], -1, 32)  # (n, k/32, 32)
    lo = grouped << mx.array(offset, dtype=mx.uint32)  # bits past 32 fall off, into `hi`
    spill = offset + bits > 32
    hi = grouped >> mx.array(np.where(spill, 32 - offset, 0), dtype=mx.uint32)
    words = []
    for j in range(bits):  # bits never overlap, so a sum is an OR
        parts = [lo[..., mx.array(np.nonzero(word == j)[0])]]
        if (into := np.nonzero(spill & (word + 1 == j))[0]).size:
            parts.append(hi[..., mx.array(into)])
        words.append(mx.concatenate(parts, axis=-1).sum(axis=-1).astype(mx.uint32))
    return mx.stack(words, axis=-1).reshape(*codes.shape[:-1], -1)


def transpose_packed(packed: mx.array, bits: int) -> mx.array:
    """Transpose a matrix of packed codes: (a, b*bits/32) -> (b, a*bits/32). Lossless.

    Turns MLX's packed down matrix (d, n) into per-neuron columns (n, d) and back.
    """
    return pack_codes(unpack_codes(packed, bits).T, bits)


def requantize_transposed(
    w: mx.array, scales: mx.array, biases: mx.array, source: dict, target: dict
) -> tuple[mx.array, mx.array, mx.array]:
    """A quantized matrix (a, b) with groups along b -> its transpose (b, a) quantized with groups along a
    (`source`/`target`: {"group_size", "bits"}). Dequantized in float32 (float16 scales would round
    codes * scale); the new scales and biases in the old ones' dtype. One more rounding: not lossless."""
    f32 = scales.astype(mx.float32), biases.astype(mx.float32)
    dense = mx.dequantize(w, *f32, group_size=source["group_size"], bits=source["bits"])
    w2, s2, b2 = mx.quantize(dense.T, target["group_size"], target["bits"])
    return w2, s2.astype(scales.dtype), b2.astype(scales.dtype)
