"""The quality table: the `quality` entry of a bundle's flash section (config.json).

Measured by `mlxflash.eval.quality` (run by tools/train_predictors.py after the selectors are trained) on
held-out calibration tokens, never on evaluation text; read by the planner, which picks from it the
operating point of least expected loss that fits a budget, and by `mlxflash plan`, which prints it. Each
point is one way to run flash mode (selector, sketch bits, density, window) with what it cost when
measured: the cache rows it held, what its selector keeps, its NLL increase over dense and the neurons
it read per token. Its DRAM is recomputed by the planner for the machine at hand (I/O buffers differ)::

    {"dense_nll": 2.91, "measured_on": {"text": "tinyshakespeare.txt", "tokens": 255, ...},
     "points": [{"selector": "gate", "gate_bits": 2, "density": 0.3, "window": 2, "capacity": 0.43,
                 "selector_bytes": 96000000, "nll_increase": 0.21, "nll_increase_se": 0.02,
                 "loaded": 0.08}, ...]}

Writing new selectors drops the table (it measured the old ones): `bundle.update_resident`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import BundleError

SELECTOR_KINDS = ("gate", "activation", "predictor")


@dataclass(frozen=True)
class OperatingPoint:
    """One measured way to run flash mode, and what it cost in quality, DRAM and reads."""

    selector: str  # "gate", "activation" or "predictor"
    gate_bits: int | None  # the gate (activation: gate and up) sketches' bits (None: exact rows, or a predictor)
    density: float  # share of each layer's neurons selected per token
    window: int  # tokens whose selections the cache holds (and the FFN computes)
    capacity: float  # cache rows per layer as a share of its neurons (what the window's union needed)
    selector_bytes: int  # what the selector keeps in DRAM
    nll_increase: float  # mean NLL increase over dense on the held-out tokens (nats per token)
    nll_increase_se: float  # its standard error (paired over tokens)
    loaded: float  # share of each layer's neurons read per decoded token (the cache's misses)

    @property
    def perplexity_increase(self) -> float:
        """The relative perplexity increase the NLL increase amounts to (0.05: +5%)."""
        return math.expm1(self.nll_increase)

    def describe(self) -> str:
        exact = " (exact)" if self.selector != "predictor" else ""
        bits = f" ({self.gate_bits}-bit sketch)" if self.gate_bits else exact
        return f"{self.selector}{bits}, density {self.density:.2f} in every layer, window {self.window}"


@dataclass
class QualityTable:
    """The measured operating points of a bundle, and what they were measured on."""

    points: list[OperatingPoint]
    dense_nll: float  # the dense model's mean NLL on the same tokens
    measured_on: dict = field(default_factory=dict)  # text, tokens, context, seconds

    def to_json(self) -> dict:
        return {
            "dense_nll": self.dense_nll,
            "measured_on": self.measured_on,
            "points": [asdict(p) for p in self.points],
        }

    @classmethod
    def from_json(cls, d: dict, where: str) -> QualityTable:
        try:
            points = [OperatingPoint(**p) for p in d["points"]]
            table = cls(points, float(d["dense_nll"]), dict(d.get("measured_on", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: malformed flash.quality ({e})") from e
        for i, p in enumerate(table.points):
            if p.selector not in SELECTOR_KINDS:
                raise BundleError(
                    f"{where}: flash.quality.points[{i}].selector {p.selector!r}, expected one of "
                    f"{', '.join(SELECTOR_KINDS)}"
                )
            if not (0 < p.density <= 1 and 0 < p.capacity <= 1 and p.window >= 1):
                raise BundleError(
                    f"{where}: flash.quality.points[{i}]: density {p.density}, capacity {p.capacity} must be in "
                    f"(0, 1] and window {p.window} >= 1"
                )
        return table
