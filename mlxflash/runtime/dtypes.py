"""The dtype the runtime computes in: float32 on the CPU, the bundle's own dtype on Metal.

MLX's CPU build multiplies float16/bfloat16 many times slower than float32 (about 45x for a float16
matmul on this project's Linux machine), so on the CPU every float weight that stays in memory is
converted once at load and the records read from disk are converted as they come out (selected rows
only). On Metal float16/bfloat16 are the fast types and stay as stored.
"""

from __future__ import annotations

import mlx.core as mx


def compute_dtype(stored: str | mx.Dtype) -> mx.Dtype:
    """float32 on the CPU whatever the bundle stores; the stored float dtype elsewhere (Metal)."""
    stored = getattr(mx, stored) if isinstance(stored, str) else stored
    if mx.default_device() == mx.cpu or not mx.issubdtype(stored, mx.floating):
        return mx.float32
    return stored


def cast_floats(arrays: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Float arrays in `dtype`; integers (quantized codes) untouched. Lazy: nothing is copied until used."""
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype else v for k, v in arrays.items()
    }
