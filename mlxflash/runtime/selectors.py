"""Selectors: which FFN neurons a token needs, per layer.

One interface: `select(layer, x)` takes the FFN inputs x (T, d) and returns a boolean mask (T, n), lazily
(an MLX expression), so decode (T = 1) and masked evaluation (T tokens at once) share it.

- `PredictorSelector`: the paper's low-rank predictor `sigmoid(B(A x)) > threshold`, per layer, trained by
  `tools/train_predictors.py` (ReLU FFNs: the non-zero neurons; gated FFNs: the exact gate set).
- `GateSelector`: gated FFNs (SwiGLU) only; keeps the gate rows resident and selects the neurons whose
  |silu(gate . x)| passes a per-layer threshold calibrated for a target density (or the top k). Exact
  for that criterion, at the DRAM cost of the gate (a third of the FFN); or, with `gate_bits`, from a
  1-, 2- or 3-bit sketch of the gate (less DRAM, approximate; selection only, compute stays exact).
- `ActivationSelector`: gated FFNs; the top share by |silu(gate . x) * (up . x)| from resident (or
  sketched) gate and up rows: the activation itself, at the DRAM of both.
- `AllSelector`: every neuron (flash then equals dense). `OracleSelector`: the true non-zero set of a
  ReLU-family FFN (relu, fatrelu, drelu), computed from all weights (tests and measurements only).
"""

from __future__ import annotations

import copy
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..arch.activations import SPARSE, UP_ACTIVATED, is_sparse
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

    def _project(self, x: mx.array, rows: tuple, part: str) -> mx.array:
        """x (T, d) @ the kept gate (or up) rows: (T, n)."""
        if self.q:
            # many rows (masked evaluation): dequantize + BLAS on the CPU, not MLX's per-row CPU kernel
            return quantized_matmul(x, *rows, **self.q[part])
        return x @ rows[0].T

    def magnitude(self, layer: int, x: mx.array) -> mx.array:
        """|silu(gate . x)| for every neuron: (T, n)."""
        return mx.abs(nn.silu(self._project(x, self.gates[layer], "gate")))

    def select(self, layer: int, x: mx.array) -> mx.array:
        m = self.magnitude(layer, x)
        if self.top_k:  # the k-th largest by partition (no full sort): (T, 1)
            at = m.shape[-1] - self.top_k
            return m >= mx.partition(m, at, axis=-1)[..., at : at + 1]
        return m > self.thresholds[layer]


class ActivationSelector(GateSelector):
    """Gated FFNs: each token's top `density` share by |silu(gate . x) * (up . x)|, the neuron's activation
    itself, from resident copies (or `bits`-bit sketches) of both the gate and the up rows. Costs the up
    rows' DRAM beside the gate's; buys the criterion the output is made of (on Qwen2.5-1.5B, top 40% by
    |h| loses 7% perplexity where top 40% by |silu(gate)| loses 76%)."""

    kind = "activation"

    def __init__(self, gates: list[tuple], ups: list[tuple], quantization: dict | None, top_k: int):
        super().__init__(gates, quantization, None, top_k)
        self.ups = ups
        self.resident_bytes += sum(sum(a.nbytes for a in u) for u in ups)

    def at_density(self, record: SelectorRecord | None, density: float) -> ActivationSelector:
        n = self.gates[0][0].shape[0]
        return ActivationSelector(self.gates, self.ups, self.q, max(1, int(round(density * n))))

    def magnitude(self, layer: int, x: mx.array) -> mx.array:
        """|silu(gate . x) * (up . x)| for every neuron: (T, n)."""
        gate, up = self._project(x, self.gates[layer], "gate"), self._project(x, self.ups[layer], "up")
        return mx.abs(nn.silu(gate) * up)


class OracleSelector(Selector):
    """The exact non-zero set of a ReLU-family FFN (plain or gated; arch/activations.py), from the full weights."""

    kind = "oracle"

    def __init__(self, ffn_weights: list[dict], activation: str, gated: bool, threshold: float = 0.0):
        if not is_sparse(activation):
            raise UsageError(
                f"the oracle selector needs a ReLU-family FFN ({', '.join(SPARSE)}); a {activation} neuron is never exactly zero"
            )
        self.w, self.gated, self.activation = ffn_weights, gated, activation
        self.threshold = threshold if activation == "fatrelu" else 0.0

    def select(self, layer: int, x: mx.array) -> mx.array:
        w = self.w[layer]
        pre = x @ (w["gate"] if self.gated else w["up"]).T
        if not self.gated and "up_bias" in w:
            pre = pre + w["up_bias"]
        nonzero = pre > self.threshold
        if self.activation in UP_ACTIVATED:  # dReLU: the up projection must be positive too
            nonzero = nonzero & (x @ w["up"].T > 0)
        return nonzero


SKETCH_GROUP = 64


def gate_sketch(gates: list[tuple], quantization: dict | None, bits: int, part: str = "gate") -> list[tuple]:
    """A lossy `bits`-bit copy of each layer's gate (or up: `part`), for selection (1-3 bits: a quarter
    to 3/4 of a 4-bit gate)."""
    out = []
    for g in gates:
        full = mx.dequantize(*g, **quantization[part]) if quantization else g[0]
        sketch = mx.quantize(full.astype(mx.float16), SKETCH_GROUP, bits)
        mx.eval(sketch)
        out.append(tuple(sketch))
    return out


def gate_rows(bundle: Bundle, reader: FlashReader, parts: tuple[str, ...] = ("gate",)) -> list[list[tuple]]:
    """The gate (and up: `parts`) fields of every layer's records, copied out contiguous (resident for
    the gate and activation selectors): per part, per layer; one layer's block is in memory at a time."""
    blocks, layout = BlockSource(bundle, reader), bundle.spec.record
    names = {p: [n for n in (f"{p}.weight", f"{p}.scales", f"{p}.biases") if n in layout.names()] for p in parts}
    out: list[list[tuple]] = [[] for _ in parts]
    for layer in range(bundle.num_layers):
        r = blocks.read_block(layer)
        for rows, part in zip(out, parts):
            g = tuple(mx.contiguous(layout.view(r, n)) for n in names[part])
            mx.eval(g)
            rows.append(g)
    return out


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
    (gates,), q = gate_rows(bundle, reader), spec.quantization
    if gate_bits is not None:  # a lossy, smaller copy of the gate, for selection only
        gates, q = gate_sketch(gates, q, gate_bits), {"gate": {"bits": gate_bits, "group_size": SKETCH_GROUP}}
    if density is not None:
        return GateSelector(gates, q, None).at_density(record, density)
    return GateSelector(gates, q, record.gate_threshold)


def activation_selector(bundle: Bundle, reader: FlashReader, density: float, bits: int | None) -> ActivationSelector:
    """The gate and up rows read from the bundle (or their `bits`-bit sketches), selecting each token's
    top `density` share by |silu(gate . x) * (up . x)|."""
    spec = bundle.spec
    if not spec.smooth_gated:
        raise UsageError(f"{bundle.path}: the activation selector needs a gated (SwiGLU, GeGLU) FFN")
    gates, ups = gate_rows(bundle, reader, ("gate", "up"))
    q = spec.quantization
    if bits is not None:
        gates, ups = gate_sketch(gates, q, bits), gate_sketch(ups, q, bits, "up")
        q = {p: {"bits": bits, "group_size": SKETCH_GROUP} for p in ("gate", "up")}
    n = spec.intermediate_size
    return ActivationSelector(gates, ups, q, max(1, int(round(density * n))))
