"""The selector record: the `selector` entry of a bundle's flash section (config.json).

Written with the predictors by `mlxflash.runtime.train` (and by tools/make_synthetic.py for random
ones) through `bundle.update_resident` / `convert.write_bundle`; read by the planner (density, window,
re-thresholding) and by the selectors (thresholds, score quantiles). The JSON is the dataclass's
fields, `stats` keyed by selector kind ("predictor", "gate")::

    {"kind": "gate", "target": "gate", "rank": [64, ...], "predictor_threshold": [...],
     "density_grid": [0.05, ...], "score_quantiles": [[...], ...], "target_recall": 0.9,
     "gate_threshold": [...], "gate_density": 0.5, "gate_bits": 2,
     "stats": {"predictor": {"density": 0.41, "window_union": [0.41, 0.55, ...]}, "gate": {...}},
     "trained_on": {"text": "tinyshakespeare.txt", "tokens": 4096, ...}}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BundleError

KINDS = ("predictor", "gate")  # the selectors a record can name as the bundle's default


@dataclass(frozen=True)
class SelectionStats:
    """How one selector picked on held-out tokens: what the planner sizes the cache and the window from."""

    density: float  # mean share of a layer's neurons selected per token
    window_union: tuple[float, ...]  # share held by the union of the last k tokens' selections, k = 1, 2, ...

    def to_json(self) -> dict:
        return {"density": self.density, "window_union": list(self.window_union)}


@dataclass
class SelectorRecord:
    """The `selector` entry of the flash section: how flash mode picks neurons by default, and the
    calibration the planner re-thresholds from. Per-layer lists have one entry per layer (or none)."""

    kind: str  # the selector flash mode uses unless told otherwise: "predictor" or "gate"
    target: str = "nonzero"  # what the predictors learned: "nonzero" (ReLU FFNs), "gate" or "activation"
    rank: list[int] = field(default_factory=list)  # predictor rank per layer
    predictor_threshold: list[float] = field(default_factory=list)  # per layer: select where sigmoid(B(A x)) > t
    density_grid: list[float] = field(default_factory=list)  # densities the predictors can be re-thresholded to
    score_quantiles: list[list[float]] = field(default_factory=list)  # per layer: the score selecting each
    target_recall: float | None = None
    gate_threshold: list[float] = field(default_factory=list)  # per layer: select where |silu(gate . x)| > t
    gate_density: float | None = None  # the density gate_threshold was calibrated for
    gate_bits: int | None = None  # the gate selector's default sketch (None: the exact gate)
    stats: dict[str, SelectionStats] = field(default_factory=dict)  # per selector kind
    trained_on: dict = field(default_factory=dict)  # provenance: text, tokens, seconds (or how it was made)

    def stats_for(self, kind: str) -> SelectionStats | None:
        return self.stats.get(kind)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "stats"}
        return {**out, "stats": {kind: s.to_json() for kind, s in self.stats.items()}}

    @classmethod
    def from_json(cls, d: dict, where: str, layers: int) -> SelectorRecord:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise BundleError(
                f"{where}: flash.selector has unknown fields {sorted(unknown)} (an older writer's record; "
                "retrain the predictors or rewrite the bundle)"
            )
        try:
            stats = {k: SelectionStats(s["density"], tuple(s["window_union"])) for k, s in d.get("stats", {}).items()}
            record = cls(**{**d, "stats": stats})
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where}: malformed flash.selector ({e})") from e
        if record.kind not in KINDS:
            raise BundleError(f"{where}: flash.selector.kind {record.kind!r}, expected one of {', '.join(KINDS)}")
        for name in ("rank", "predictor_threshold", "score_quantiles", "gate_threshold"):
            found = len(getattr(record, name))
            if found not in (0, layers):
                raise BundleError(
                    f"{where}: flash.selector.{name} has {found} entries, expected {layers} (one a layer)"
                )
        return record
