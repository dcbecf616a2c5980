"""The dtype the runtime computes in: float32 on the CPU, the bundle's own dtype on Metal.

MLX's CPU build multiplies float16/bfloat16 many times slower than float32 (about 45x for a float16
matmul on this project's Linux machine), so on the CPU every float weight that stays in memory is
converted once at load and the records read from disk are converted as they come out (selected rows
only). On Metal float16/bfloat16 are the fast types and stay as stored.

Quantization scales and biases stay as stored everywhere: MLX's quantized matmul takes float16 scales with
float32 inputs and gives the same float32 result, and where a weight is dequantized its scales are
converted first (`f32_dequantize`), so the math is unchanged and memory is what the bundle says (on the
default model the float32 copies were 8 MB beyond the plan).
"""

from __future__ import annotations

import mlx.core as mx


def compute_dtype(stored: str | mx.Dtype) -> mx.Dtype:
    """float32 on the CPU whatever the bundle stores; the stored float dtype elsewhere (Metal)."""
    stored = getattr(mx, stored) if isinstance(stored, str) else stored
    if mx.default_device() == mx.cpu or not mx.issubdtype(stored, mx.floating):
        return mx.float32
    return stored


QUANT_PARAMS = ("scales", "biases")  # how the names of quantization parameters end (mlx-lm's, and down_scales)


def cast_floats(arrays: dict[str, mx.array], dtype: mx.Dtype, keep_quant: bool = False) -> dict[str, mx.array]:
    """Float arrays in `dtype`; integers (quantized codes) untouched, and with `keep_quant` the quantization
    scales and biases too. Lazy: nothing is copied until used."""

    def cast(k: str, v: mx.array) -> bool:
        return (
            mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype and not (keep_quant and k.endswith(QUANT_PARAMS))
        )

    return {k: v.astype(dtype) if cast(k, v) else v for k, v in arrays.items()}


def f32_dequantize(
    w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int, dtype: mx.Dtype
) -> mx.array:
    """mx.dequantize in `dtype`: float16 scales are converted first, so codes * scale + bias is not rounded
    to float16 on the way (GGUF's dequantization multiplies in float32 too)."""
    return mx.dequantize(
        w, scales.astype(dtype), None if biases is None else biases.astype(dtype), group_size=group_size, bits=bits
    )
