"""MLX affine quantization as the format stores it: mlx-lm's per-module parameters and packed codes.

MLX packs `32 // bits` codes into each uint32, the first code in the lowest bits. A bundle keeps the
down projection's codes per neuron (a column of the (d, n) matrix), so the converter transposes packed
matrices and the runtime unpacks a neuron's column to multiply it.
"""

from __future__ import annotations

import mlx.core as mx


def quant_params(qcfg: dict, module: str) -> dict:
    """mlx-lm's quantization config: per-module overrides, else the defaults."""
    own = qcfg.get(module)
    if isinstance(own, dict):
        return {"group_size": own["group_size"], "bits": own["bits"]}
    return {"group_size": qcfg["group_size"], "bits": qcfg["bits"]}


def unpack_codes(packed: mx.array, bits: int) -> mx.array:
    """(..., k) uint32, `32 // bits` codes each -> (..., k * 32 // bits) uint32 codes, lowest bits first."""
    per = 32 // bits
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # (..., k, per)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Inverse of unpack_codes along the last axis."""
    per = 32 // bits
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    return (grouped << shifts).sum(axis=-1).astype(mx.uint32)


def transpose_packed(packed: mx.array, bits: int) -> mx.array:
    """Transpose a matrix of packed codes: (a, b*bits/32) -> (b, a*bits/32). Lossless.

    Turns MLX's packed down matrix (d, n) into per-neuron columns (n, d) and back.
    """
    return pack_codes(unpack_codes(packed, bits).T, bits)
