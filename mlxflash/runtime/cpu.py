"""CPU-only speed-ups; the math is unchanged and Metal never takes these paths.

- MLX's CPU wheel for Linux carries the reference (netlib) BLAS: about 1 GFLOP/s. Where Debian's
  OpenBLAS is installed, the CLI re-executes itself with it preloaded (MLXFLASH_BLAS=reference opts out).
- MLX's CPU `quantized_matmul` is a plain loop: fine for one token, slow for a prompt. With many rows,
  dequantizing the weight and calling the BLAS is tens of times faster.
"""

from __future__ import annotations

import os
import sys

import mlx.core as mx
import mlx.nn as nn

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
MANY_ROWS = 8  # from here on, dequantize + BLAS beats the CPU quantized kernel
SLICE_ROWS = 4096


def reexec_with_openblas() -> None:
    """Restart this process with OpenBLAS preloaded, once, where it is installed (Linux)."""
    if sys.platform != "linux" or os.environ.get("MLXFLASH_BLAS") == "reference":
        return
    if "openblas" in os.environ.get("LD_PRELOAD", "") or not os.path.exists(OPENBLAS):
        return
    env = {**os.environ, "LD_PRELOAD": f"{OPENBLAS} {os.environ.get('LD_PRELOAD', '')}".strip()}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def quantized_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """x @ dequantize(w).T, the same product as mx.quantized_matmul(..., transpose=True)."""
    rows = x.size // x.shape[-1]
    if rows < MANY_ROWS or not on_cpu():
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
    # Dequantize a slice of output rows at a time: a 49k-token LM head would be 113 MB at once.
    parts = []
    for lo in range(0, w.shape[0], SLICE_ROWS):
        sl = slice(lo, lo + SLICE_ROWS)
        dense = mx.dequantize(
            w[sl], scales[sl], None if biases is None else biases[sl], group_size=group_size, bits=bits
        )
        parts.append(x @ dense.astype(x.dtype).T)
        mx.eval(parts[-1])  # frees this slice's dequantized weights before the next
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


class PromptQuantizedLinear(nn.QuantizedLinear):
    """mlx-lm's QuantizedLinear, with prompts (many rows) routed through `quantized_matmul` above."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < MANY_ROWS or not on_cpu() or getattr(self, "mode", "affine") != "affine":
            return super().__call__(x)
        y = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits)
        return y + self["bias"] if "bias" in self else y


class PromptQuantizedEmbedding(nn.QuantizedEmbedding):
    """mlx-lm's tied LM head (`as_linear`) with the same CPU prompt path."""

    def as_linear(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < MANY_ROWS or not on_cpu() or self.mode != "affine":
            return super().as_linear(x)
        return quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits)


def speed_up_prompts(model: nn.Module) -> None:
    """Give `model`'s quantized layers the CPU prompt path (same parameters, same math)."""
    faster = {nn.QuantizedLinear: PromptQuantizedLinear, nn.QuantizedEmbedding: PromptQuantizedEmbedding}
    for _, module in model.named_modules():
        if type(module) in faster:
            module.__class__ = faster[type(module)]
