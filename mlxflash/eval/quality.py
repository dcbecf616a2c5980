"""Calibration of the quality table (format/quality_record.py): a grid of operating points, each
evaluated on held-out calibration tokens exactly as flash mode runs it (masked evaluation: every position
computes the neurons its cache holds, the union of the window's selections), paired against the dense
model's NLL on the same tokens. Run by tools/train_predictors.py after the selectors are trained; never
on evaluation text.

A point's cache need is a high quantile of what its replayed caches held (the planner gives it that
many rows per layer), its reads per token what they loaded after each position.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..format.bundle import Bundle, update_quality
from ..format.quality_record import OperatingPoint, QualityTable
from ..runtime.dtypes import cast_floats, compute_dtype
from ..runtime.model import load_model
from ..runtime.planner import make_selector
from ..runtime.reader import FlashReader
from ..runtime.selectors import Selector
from ..runtime.stats import MaskedCounts
from ..runtime.train import tokenize_text
from .perplexity import perplexity
from .stats import mean_se

MIN_TOKENS = 32
CAPACITY_QUANTILE = 0.95  # a point's cache holds its window's union at 95% of positions


@dataclass(frozen=True)
class Grid:
    """The operating points to measure: every selector with every density and window."""

    selectors: tuple[tuple[str, int | None], ...]  # (kind, gate bits)
    densities: tuple[float, ...]
    windows: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.selectors) * len(self.densities) * len(self.windows)


DENSITIES = (0.15, 0.25, 0.35, 0.45, 0.6, 0.75)
WINDOWS = (1, 2, 4)


def default_grid(bundle: Bundle) -> Grid:
    """The bundle's selectors (predictors where trained; gated FFNs also the gate's and the activation
    selector's 2-bit sketches) at DENSITIES and WINDOWS. Left out because they lost on Qwen2.5-1.5B (README,
    Quality): the exact gate (its 2-bit sketch selects as well at half the DRAM) and 1-bit sketches."""
    spec, record = bundle.spec, bundle.spec.selector
    selectors: list[tuple[str, int | None]] = []
    if record is not None and record.predictor_threshold and record.score_quantiles:
        selectors.append(("predictor", None))
    if spec.smooth_gated:
        selectors += [("gate", 2), ("activation", 2)]
    if not selectors:
        raise UsageError(
            f"{bundle.path}: nothing to calibrate (no trained predictors, and the gate selector needs a gated FFN)"
        )
    return Grid(tuple(selectors), DENSITIES, WINDOWS)


def measure_quality(
    path: str | Path, tokens: list[int], context: int, grid: Grid, text: str = "", progress: bool = True
) -> QualityTable:
    """Evaluate every point of `grid` on `tokens` (held-out calibration text) against dense; the table."""
    if len(tokens) < MIN_TOKENS:
        raise UsageError(
            f"quality calibration: {len(tokens)} held-out tokens, need at least {MIN_TOKENS} (give more --tokens of text)"
        )
    t0 = time.perf_counter()
    model, _ = load_model(path, mode="resident", verify=False)
    try:
        dense = _token_nll(model, tokens, context)
    finally:
        model.flash.close()
    bundle = Bundle.open(path, verify=False)
    reader = FlashReader(bundle.ffn_path)
    weights = cast_floats(bundle.resident_weights(), compute_dtype(bundle.spec.dtype), keep_quant=True)
    points = []
    try:
        for kind, bits in grid.selectors:
            base = make_selector(bundle, reader, weights, kind, grid.densities[0], bits)  # reads the gate once
            for density in grid.densities:
                selector = base.at_density(bundle.spec.selector, density)
                for window in grid.windows:
                    point = measure_point(path, selector, kind, bits, density, window, tokens, context, dense)
                    points.append(point)
                    if progress:
                        print(f"mlxflash: quality: {format_point(point)}", file=sys.stderr, flush=True)
    finally:
        reader.close()
    measured_on = {"text": text, "tokens": len(dense), "context": context, "seconds": round(time.perf_counter() - t0)}
    return QualityTable(points, float(np.mean(dense)), measured_on)


def measure_point(
    path: str | Path,
    selector: Selector,
    kind: str,
    bits: int | None,
    density: float,
    window: int,
    tokens: list[int],
    context: int,
    dense: np.ndarray,
) -> OperatingPoint:
    """One operating point: masked flash evaluation (no budget, so the window's union is never cut)."""
    model, _ = load_model(path, mode="flash", selector=selector, window=window, masked_prompts=True, verify=False)
    try:
        model.flash.stats.record_masked = True
        nll = _token_nll(model, tokens, context)
        counts = model.flash.stats.masked
    finally:
        model.flash.close()
    diff = nll - dense
    capacity, loaded = cache_need(counts)
    return OperatingPoint(
        selector=kind,
        gate_bits=bits,
        density=density,
        window=window,
        capacity=capacity,
        selector_bytes=selector.resident_bytes,
        nll_increase=float(diff.mean()),
        nll_increase_se=mean_se(diff.tolist())[1],
        loaded=loaded,
    )


def cache_need(counts: list[MaskedCounts]) -> tuple[float, float]:
    """(rows a layer's cache needs as a share of its neurons: the CAPACITY_QUANTILE of held, the most
    demanding layer; neurons read per token as a share, averaged over layers)."""
    layers = sorted({c.layer for c in counts})
    need, loaded = [], []
    for layer in layers:
        mine = [c for c in counts if c.layer == layer]
        n = mine[0].neurons
        need.append(float(np.quantile(np.concatenate([c.held for c in mine]), CAPACITY_QUANTILE)) / n)
        loads = np.concatenate([c.loaded for c in mine])
        loaded.append(float(loads.mean()) / n if loads.size else 0.0)
    return min(1.0, max(need)), float(np.mean(loaded))


def _token_nll(model, tokens: list[int], context: int) -> np.ndarray:
    return np.asarray(perplexity(model, tokens, context)["token_nll"])


def format_point(p: OperatingPoint) -> str:
    return (
        f"{p.describe()}: NLL {p.nll_increase:+.4f} ± {p.nll_increase_se:.4f} "
        f"(perplexity {100 * math.expm1(p.nll_increase):+.1f}%), cache {100 * p.capacity:.0f}% of neurons, "
        f"{100 * p.loaded:.1f}% read per token"
    )


def heldout_tokens(path: str | Path, text: Path, train_tokens: int, tokens: int, heldout: float = 0.15) -> list[int]:
    """The first `tokens` of the tokens train_predictors held out of `text` (its last `heldout` share)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    ids = tokenize_text(load_tokenizer(Path(path)), Path(text), train_tokens)
    return ids[int(len(ids) * (1 - heldout)) :][:tokens]


def calibrate_quality(
    path: str | Path,
    text: Path,
    train_tokens: int = 8192,
    tokens: int = 512,
    context: int = 256,
    grid: Grid | None = None,
    merge: bool = False,
) -> QualityTable:
    """Measure the bundle's grid (default_grid) on the held-out calibration tokens and record the table;
    with `merge`, into the bundle's table (measured on the same tokens), re-measured points replaced."""
    bundle = Bundle.open(path, verify=False)
    grid = grid or default_grid(bundle)
    table = measure_quality(path, heldout_tokens(path, text, train_tokens, tokens), context, grid, Path(text).name)
    if merge and bundle.spec.quality is not None:
        table = merged(bundle.spec.quality, table)
    update_quality(Bundle.open(path, verify=False), table)
    return table


def merged(old: QualityTable, new: QualityTable) -> QualityTable:
    """`new`'s points added to `old`'s (the same held-out tokens, or the losses would not compare)."""
    same = ("text", "tokens", "context")
    if [old.measured_on.get(k) for k in same] != [new.measured_on.get(k) for k in same]:
        raise UsageError(
            f"quality table: measured on {old.measured_on}, the new points on {new.measured_on}; merge needs the same "
            "text, tokens and context (measure the whole grid again instead)"
        )
    key = lambda p: (p.selector, p.gate_bits, p.density, p.window)  # noqa: E731
    fresh = {key(p) for p in new.points}
    seconds = old.measured_on.get("seconds", 0) + new.measured_on.get("seconds", 0)
    points = [p for p in old.points if key(p) not in fresh] + new.points
    return QualityTable(points, new.dense_nll, {**new.measured_on, "seconds": seconds})
