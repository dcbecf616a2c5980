"""Selectors: which FFN neurons a token needs, per layer.

One interface: `select(layer, x)` takes the FFN inputs x (T, d) and returns a boolean mask (T, n), lazily
(an MLX expression), so decode (T = 1) and masked evaluation (T tokens at once) share it.

- `PredictorSelector`: the paper's low-rank predictor `sigmoid(B(A x)) > threshold`, per layer, trained by
  `tools/train_predictors.py` (ReLU FFNs: the non-zero neurons; gated FFNs: the exact gate set).
- `GateSelector`: gated FFNs (SwiGLU) only; keeps the gate rows resident and selects the neurons whose
  |silu(gate . x)| passes a per-layer threshold calibrated for a target density (or the top k). Exact
  for that criterion, at the DRAM cost of the gate (a third of the FFN); or, with `gate_bits`, from a
  1-, 2- or 3-bit sketch of the gate (less DRAM, approximate; selection only, compute stays exact).
- `AllSelector`: every neuron (flash then equals dense). `OracleSelector`: the true non-zero set of a
  ReLU FFN, computed from all weights (tests and measurements only).
"""

from __future__ import annotations

import copy
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import UsageError
from ..format.bundle import Bundle
from ..format.selector_record import SelectorRecord
from .blocks import BlockSource
from .cpu import quantized_matmul
from .reader import FlashReader

PREDICTOR_KEYS = ("a.weight", "b.weight", "b.bias")


def predictor_prefix(layer: int) -> str:
    return f"model.layers.{layer}.mlp.predictor."


class Selector:
    """Base class; `resident_bytes` is the DRAM the selector itself keeps, `density` the share of neurons
    it is set to pick (None: whatever its calibrated thresholds pick, as the bundle's record measured)."""

    kind = "base"
    resident_bytes = 0
    density: float | None = None

    def select(self, layer: int, x: mx.array) -> mx.array:
        raise NotImplementedError


class AllSelector(Selector):
    kind = "all"
    density = 1.0

    def __init__(self, neurons: list[int]):
        self.neurons = neurons

    def select(self, layer: int, x: mx.array) -> mx.array:
        return mx.ones((*x.shape[:-1], self.neurons[layer]), dtype=mx.bool_)


class PredictorSelector(Selector):
    kind = "predictor"

    def __init__(
        self,
        weights: dict[str, mx.array],
        thresholds: list[float] | None = None,
        logits: list[float] | None = None,
        density: float | None = None,
    ):
        """Per-layer thresholds as probabilities, or directly as pre-sigmoid `logits` (chosen to pick `density`)."""
        layers = len(thresholds if logits is None else logits)
        self.a = [weights[predictor_prefix(i) + "a.weight"] for i in range(layers)]  # (r, d)
        self.b = [weights[predictor_prefix(i) + "b.weight"] for i in range(layers)]  # (n, r)
        self.bias = [weights[predictor_prefix(i) + "b.bias"] for i in range(layers)]  # (n,)
        # sigmoid(z) > t  <=>  z > logit(t): no sigmoid at run time
        self.logit = logits if logits is not None else [math.log(t / (1 - t)) for t in thresholds]
        self.resident_bytes = sum(m.nbytes for m in (*self.a, *self.b, *self.bias))
        self.density = density

    def at_density(self, record: SelectorRecord, density: float) -> PredictorSelector:
        """The same predictors, re-thresholded from the record's score quantiles to pick `density`."""
        if not record.score_quantiles:
            raise UsageError("these predictors carry no score quantiles; retrain them to choose a density")
        out = copy.copy(self)
        out.logit = [float(np.interp(density, record.density_grid, q)) for q in record.score_quantiles]
        out.density = density
        return out

    def scores(self, layer: int, x: mx.array) -> mx.array:
        """Pre-sigmoid scores (T, n)."""
        return (x.astype(self.a[layer].dtype) @ self.a[layer].T) @ self.b[layer].T + self.bias[layer]

    def select(self, layer: int, x: mx.array) -> mx.array:
        return self.scores(layer, x) > self.logit[layer]


class GateSelector(Selector):
    kind = "gate"

    def __init__(
        self, gates: list[tuple], quantization: dict | None, thresholds: list[float] | None, top_k: int | None = None
    ):
        self.gates, self.q = gates, quantization
        self.thresholds, self.top_k = thresholds, top_k
        self.resident_bytes = sum(sum(a.nbytes for a in g) for g in gates)
        self.density = top_k / gates[0][0].shape[0] if top_k else None  # top-k picks exactly its share

    def at_density(self, record: SelectorRecord | None, density: float) -> GateSelector:
        """The same gate rows, selecting each token's top `density` share."""
        n = self.gates[0][0].shape[0]
        return GateSelector(self.gates, self.q, None, top_k=max(1, int(round(density * n))))

    def magnitude(self, layer: int, x: mx.array) -> mx.array:
        """|silu(gate . x)| for every neuron: (T, n)."""
        g = self.gates[layer]
        if self.q:
            # many rows (masked evaluation): dequantize + BLAS on the CPU, not MLX's per-row CPU kernel
            gate = quantized_matmul(x, *g, **self.q["gate"])
        else:
            gate = x @ g[0].T
        return mx.abs(nn.silu(gate))

    def select(self, layer: int, x: mx.array) -> mx.array:
        m = self.magnitude(layer, x)
        if self.top_k:
            kth = mx.sort(m, axis=-1)[..., -self.top_k][..., None]
            return m >= kth
        return m > self.thresholds[layer]


class OracleSelector(Selector):
    """The exact non-zero set of a ReLU FFN (plain or gated), from the full weights."""

    kind = "oracle"

    def __init__(self, ffn_weights: list[dict], activation_is_relu: bool, gated: bool):
        if not activation_is_relu:
            raise UsageError("the oracle selector needs a ReLU FFN (a SwiGLU neuron is never exactly zero)")
        self.w, self.gated = ffn_weights, gated

    def select(self, layer: int, x: mx.array) -> mx.array:
        w = self.w[layer]
        pre = x @ (w["gate"] if self.gated else w["up"]).T
        if not self.gated and "up_bias" in w:
            pre = pre + w["up_bias"]
        return pre > 0


SKETCH_GROUP = 64


def gate_sketch(gates: list[tuple], quantization: dict | None, bits: int) -> list[tuple]:
    """A lossy `bits`-bit copy of each layer's gate, for selection (1-3 bits: a quarter to 3/4 of a 4-bit gate)."""
    out = []
    for g in gates:
        full = mx.dequantize(*g, **quantization["gate"]) if quantization else g[0]
        sketch = mx.quantize(full.astype(mx.float16), SKETCH_GROUP, bits)
        mx.eval(sketch)
        out.append(tuple(sketch))
    return out


def gate_rows(bundle: Bundle, reader: FlashReader) -> list[tuple]:
    """The gate parts of every layer's records, copied out contiguous (resident for GateSelector);
    one layer's block is in memory at a time."""
    blocks, layout = BlockSource(bundle, reader), bundle.spec.record
    names = [n for n in ("gate.weight", "gate.scales", "gate.biases") if n in layout.names()]
    gates = []
    for layer in range(bundle.num_layers):
        r = blocks.read_block(layer)
        g = tuple(mx.contiguous(layout.view(r, n)) for n in names)
        mx.eval(g)
        gates.append(g)
    return gates


def predictor_selector(bundle: Bundle, weights: dict[str, mx.array], density: float | None) -> PredictorSelector:
    """The bundle's trained predictors at their recorded thresholds, or re-thresholded to `density`."""
    record = bundle.spec.selector
    if record is None or not record.predictor_threshold or predictor_prefix(0) + "a.weight" not in weights:
        raise UsageError(
            f"{bundle.path}: no predictors in this bundle; train them with `python tools/train_predictors.py {bundle.path} --text FILE`"
        )
    if density is not None and not record.score_quantiles:
        raise UsageError(f"{bundle.path}: these predictors carry no score quantiles; retrain them to choose a density")
    selector = PredictorSelector(weights, record.predictor_threshold)
    return selector if density is None else selector.at_density(record, density)


def gate_selector(bundle: Bundle, reader: FlashReader, density: float | None, gate_bits: int | None) -> GateSelector:
    """The gate rows read from the bundle (or their `gate_bits` sketch), at the record's calibrated
    thresholds or, with `density`, the top share per token."""
    spec, record = bundle.spec, bundle.spec.selector
    if not spec.gated:
        raise UsageError(f"{bundle.path}: the gate selector needs a gated (SwiGLU) FFN")
    if density is None and not (record and record.gate_threshold):
        raise UsageError(
            f"{bundle.path}: no calibrated gate thresholds; run `python tools/train_predictors.py {bundle.path} "
            "--text FILE`, or give a --density"
        )
    gates, q = gate_rows(bundle, reader), spec.quantization
    if gate_bits is not None:  # a lossy, smaller copy of the gate, for selection only
        gates, q = gate_sketch(gates, q, gate_bits), {"gate": {"bits": gate_bits, "group_size": SKETCH_GROUP}}
    if density is not None:
        return GateSelector(gates, q, None).at_density(record, density)
    return GateSelector(gates, q, record.gate_threshold)
