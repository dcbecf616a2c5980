"""The FFN module that replaces an mlx-lm block's MLP, and the math on neuron records.

Records (n, R) uint8, one per neuron (see bundle.py), are read as views: nothing is copied to get
at gate, up or down. The dense math (all neurons, in order) is used by `resident` and `naive`;
the sparse math (any subset of neurons, in any row order) by `flash`. Both are exact for the
neurons they are given.
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn

from .bundle import FFNSpec
from .stats import RuntimeStats

ACTIVATIONS = {"silu": nn.silu, "relu": nn.relu, "gelu": nn.gelu}


def unpack_codes(packed: mx.array, bits: int) -> mx.array:
    """(n, k*32/bits... packed) uint32 -> (n, k) uint32 codes, little end first as MLX packs."""
    per = 32 // bits
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # (n, k/per, per)
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


def _qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, q: dict) -> mx.array:
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=q["group_size"], bits=q["bits"])


class FFN(nn.Module):
    """One layer's FFN; subclasses decide where the records come from.

    Its parameters are the resident pieces only: the down projection's group scales (quantized
    bundles) and the output bias (FFNs with biases). The records themselves never are parameters.
    """

    def __init__(self, layer: int, spec: FFNSpec, stats: RuntimeStats, down_bias: bool = False):
        super().__init__()
        self._layer = layer
        self._spec = spec
        self._stats = stats
        self._act = ACTIVATIONS[spec.activation]
        n, d = spec.layers[layer].neurons, spec.hidden_size
        dtype = getattr(mx, spec.dtype)
        if spec.quantization:
            groups = n // spec.quantization["down"]["group_size"]
            self.down_scales = mx.zeros((d, groups), dtype=dtype)
            self.down_biases = mx.zeros((d, groups), dtype=dtype)
        if down_bias:
            self.down_bias = mx.zeros((d,), dtype=dtype)

    def dense_weights(self, records: mx.array) -> dict[str, mx.array]:
        """All of a layer's records, in neuron order -> the weights `dense` multiplies with."""
        layout, q = self._spec.record, self._spec.quantization
        w = {name: layout.view(records, name) for name in layout.names()}
        if q:
            w["down.weight"] = transpose_packed(w["down.weight"], q["down"]["bits"])
        return w

    def dense(self, x: mx.array, w: dict[str, mx.array]) -> mx.array:
        """x: (..., d) -> (..., d) through every neuron. Same math as mlx-lm's MLP."""
        q = self._spec.quantization
        if q:
            up = _qmm(x, w["up.weight"], w["up.scales"], w["up.biases"], q["up"])
        else:
            up = x @ w["up.weight"].T
        if "up.bias" in w:
            up = up + w["up.bias"][:, 0]
        if self._spec.gated:
            if q:
                gate = _qmm(x, w["gate.weight"], w["gate.scales"], w["gate.biases"], q["gate"])
            else:
                gate = x @ w["gate.weight"].T
            h = self._act(gate) * up
        else:
            h = self._act(up)
        if q:
            y = _qmm(h, w["down.weight"], self.down_scales, self.down_biases, q["down"])
        else:
            y = h @ w["down.weight"]
        if "down_bias" in self:
            y = y + self.down_bias
        return y


class ResidentFFN(FFN):
    """The whole FFN in memory: the reference every other mode is checked against."""

    def set_records(self, records: mx.array) -> None:
        self._w = self.dense_weights(records)
        mx.eval(self._w)

    def __call__(self, x: mx.array) -> mx.array:
        return self.dense(x, self._w)


class NaiveFFN(FFN):
    """Reads the layer's whole block from the bundle at every call: the paper's naive baseline."""

    def __init__(self, layer: int, spec: FFNSpec, stats: RuntimeStats, blocks, down_bias: bool = False):
        super().__init__(layer, spec, stats, down_bias)
        self._blocks = blocks

    def __call__(self, x: mx.array) -> mx.array:
        records = self._blocks.read_block(self._layer)
        t0 = time.perf_counter()
        w = self.dense_weights(records)
        mx.eval(w)
        self._stats.mem_seconds += time.perf_counter() - t0
        y = self.dense(x, w)
        mx.eval(y)  # the block buffer is reused by the next layer: finish with it first
        return y
