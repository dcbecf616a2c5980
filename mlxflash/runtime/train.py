"""Train the low-rank predictors and calibrate the selectors of a bundle (PAPER.md, "predictors").

1. Run the dense model over text, layer by layer recording the FFN inputs x and the target set:
   ReLU FFNs, the neurons that are non-zero; gated FFNs, the neurons whose |silu(gate . x)| (the
   exact gate selector's set, the default) or |h| (`target="activation"`) passes a per-layer
   threshold calibrated for the target density.
2. Per layer, fit sigmoid(B(A x)) to the targets with a loss balanced between positives and negatives,
   then pick the threshold that reaches the target recall on the training tokens.
3. Report recall, precision and density on held-out tokens, measure the window unions the planner
   uses, and write the predictors into the bundle's resident file atomically.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from tqdm import tqdm

from ..errors import UsageError
from ..format.bundle import Bundle, update_resident
from ..format.selector_record import SelectionStats, SelectorRecord
from .ffn import NaiveFFN
from .model import load_model
from .planner import MAX_WINDOW
from .selectors import predictor_prefix

MIN_TOKENS = 256
# gated FFNs: what the predictor learns to pick, the largest |silu(gate . x)| (the exact gate
# selector's set, the default) or the largest |h| (the activations the output is made of)
TARGETS = ("gate", "activation")
DENSITY_GRID = np.round(np.arange(0.05, 1.0, 0.05), 2)  # densities the planner can re-threshold to


@dataclass
class LayerReport:
    layer: int
    recall: float
    precision: float
    density: float  # predicted share of neurons selected
    target_density: float


def default_rank(hidden_size: int) -> int:
    return int(min(128, max(16, hidden_size // 16)) // 8 * 8)


class _Recorder(nn.Module):
    """Wraps a layer's FFN: passes x through and records x and the layer's target signals: ReLU FFNs,
    which neurons are non-zero; gated FFNs, |silu(gate . x)| (the gate) and, with `activation`, |h|."""

    def __init__(self, ffn, gated: bool, activation: bool, keep_inputs: bool = True):
        super().__init__()
        self.ffn, self.gated, self.activation, self.keep_inputs = ffn, gated, activation, keep_inputs
        self.inputs: list[np.ndarray] = []
        self.signal: list[np.ndarray] = []
        self.gate: list[np.ndarray] = []

    def __call__(self, x: mx.array) -> mx.array:
        w = self.ffn._blocks_weights() if isinstance(self.ffn, NaiveFFN) else self.ffn._w
        h, gate_mag = self.ffn.activations(x, w)
        y = self.ffn.down(h, w)  # the same output as ffn.dense, without computing h twice
        mx.eval(y, h)
        d, n = x.shape[-1], h.shape[-1]
        if self.keep_inputs:
            self.inputs.append(np.asarray(x.reshape(-1, d).astype(mx.float16)))
        if not self.gated:
            self.signal.append(np.asarray((h != 0).reshape(-1, n)))
        elif self.activation:
            self.signal.append(np.asarray(mx.abs(h).reshape(-1, n).astype(mx.float16)))
        if self.gated:
            self.gate.append(np.asarray(gate_mag.reshape(-1, n).astype(mx.float16)))
        return y


def tokenize_text(tokenizer, path: Path, tokens: int) -> list[int]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"--text {path}: cannot read ({e.strerror})") from e
    ids = tokenizer.encode(text[: tokens * 12])[:tokens]
    if len(ids) < max(MIN_TOKENS, tokens // 2):
        raise UsageError(
            f"--text {path}: {len(ids)} tokens, too short to train on (need at least {max(MIN_TOKENS, tokens // 2)}; lower --tokens or give more text)"
        )
    return ids


def collect(
    model, ids: list[int], gated: bool, context: int, activation: bool = False, keep_inputs: bool = True
) -> tuple[list, list, list]:
    """Run the dense model over `ids` in windows of `context`; per layer (N, d) inputs (None without
    `keep_inputs`), (N, n) signal (ReLU: h != 0; gated, with `activation`: |h|; else None) and, gated FFNs
    only, (N, n) gate magnitudes. After the first window it prints how long the rest will take."""
    layers = model.model.layers
    recorders = [_Recorder(block.mlp, gated, activation, keep_inputs) for block in layers]
    for block, rec in zip(layers, recorders):
        block.mlp = rec
    starts = range(0, len(ids), context)
    try:
        for i, start in enumerate(tqdm(starts, desc="collect", unit="window")):
            t0 = time.perf_counter()
            # the backbone only: the LM head's logits (a fifth of a small model's work) are not needed
            mx.eval(model.model(mx.array(ids[start : start + context])[None]))
            if i == 0 and len(starts) > 1:
                left = (time.perf_counter() - t0) * (len(starts) - 1)
                tqdm.write(
                    f"mlxflash: calibration: first window {time.perf_counter() - t0:.1f} s, about {_duration(left)} left"
                )
    finally:
        for block, rec in zip(layers, recorders):
            block.mlp = rec.ffn
    join = lambda parts: np.concatenate(parts) if parts else None  # noqa: E731
    return [join(r.inputs) for r in recorders], [join(r.signal) for r in recorders], [join(r.gate) for r in recorders]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def balanced_loss(logits: mx.array, target: mx.array) -> mx.array:
    """BCE with positives and negatives weighted equally, whatever their counts."""
    pos = target.sum()
    neg = target.size - pos
    loss_pos = (nn.losses.binary_cross_entropy(logits, target, reduction="none") * target).sum() / mx.maximum(pos, 1)
    loss_neg = (nn.losses.binary_cross_entropy(logits, target, reduction="none") * (1 - target)).sum() / mx.maximum(
        neg, 1
    )
    return (loss_pos + loss_neg) / 2


class Predictor(nn.Module):
    def __init__(self, d: int, n: int, rank: int):
        super().__init__()
        self.a = nn.Linear(d, rank, bias=False)
        self.b = nn.Linear(rank, n)

    def __call__(self, x: mx.array) -> mx.array:
        return self.b(self.a(x))


def train_layer(
    x: np.ndarray, y: np.ndarray, rank: int, epochs: int, batch: int = 256, lr: float = 2e-3, seed: int = 0
) -> Predictor:
    mx.random.seed(seed)
    model = Predictor(x.shape[1], y.shape[1], rank)
    opt = optim.Adam(learning_rate=lr)
    X, Y = mx.array(x.astype(np.float32)), mx.array(y.astype(np.float32))
    loss_and_grad = nn.value_and_grad(model, lambda m, xb, yb: balanced_loss(m(xb), yb))

    @mx.compile
    def step(xb, yb):
        loss, grads = loss_and_grad(model, xb, yb)
        opt.update(model, grads)
        return loss

    state = [model.state, opt.state]
    step = mx.compile(step, inputs=state, outputs=state)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = mx.array(rng.permutation(len(x)))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            step(X[idx], Y[idx])
            mx.eval(state)
    return model


def threshold_for_recall(scores: np.ndarray, target: np.ndarray, recall: float) -> float:
    """The largest probability threshold whose recall over the positives reaches `recall`."""
    pos = np.sort(scores[target])
    if len(pos) == 0:
        return 0.5
    z = pos[int(math.floor((1 - recall) * len(pos)))]  # keep this share of positives at or above z
    return float(1 / (1 + math.exp(-float(z) + 1e-6)))


def window_union(masks: np.ndarray, max_window: int = MAX_WINDOW) -> list[float]:
    """Mean share of neurons in the union of the last k tokens' selections, k = 1..max_window."""
    out, union = [], np.zeros_like(masks)
    for k in range(1, max_window + 1):
        union = union | np.concatenate([np.zeros_like(masks[: k - 1]), masks[: len(masks) - k + 1]])
        out.append(float(union[max_window:].mean()))
    return out


def train_predictors(
    bundle_path: Path,
    text: Path,
    rank: int | None = None,
    tokens: int = 8192,
    density: float = 0.4,
    recall: float = 0.9,
    epochs: int = 8,
    context: int = 256,
    mode: str = "resident",
    heldout: float = 0.15,
    selector: str = "predictor",
    gate_bits: int | None = None,
    target: str = "gate",
) -> list[LayerReport]:
    """Collect, train, calibrate, report and write the selector into the bundle; returns the report."""
    if not 0 < density <= 1:
        raise UsageError(f"--density {density}: must be within (0, 1]")
    if target not in TARGETS:
        raise UsageError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    bundle = Bundle.open(bundle_path)
    spec = bundle.spec
    if selector == "gate" and not spec.smooth_gated:
        raise UsageError(f"{bundle_path}: --selector gate needs a gated (SwiGLU) FFN")
    rank = rank or default_rank(spec.hidden_size)
    model, tokenizer = load_model(bundle_path, mode=mode, verify=False)
    ids = tokenize_text(tokenizer, Path(text), tokens)
    gated = spec.smooth_gated
    t0 = time.perf_counter()
    context = min(context, bundle.config.get("max_position_embeddings") or context)
    inputs, signals, gate_signals = collect(model, ids, gated, context, activation=target == "activation")
    model.flash.close()
    split = int(len(ids) * (1 - heldout))
    weights, reports, gate_thresholds, pred_thresholds, pred_masks, gate_masks = {}, [], [], [], [], []
    score_quantiles = []  # per layer: the pre-sigmoid score at which each DENSITY_GRID share is selected
    for layer in tqdm(range(bundle.num_layers), desc="train", unit="layer"):
        x, truth = inputs[layer], signals[layer]
        if gated:  # the exact gate set at the target density, one threshold per layer
            gate, gate_thr = _top_share(gate_signals[layer], split, density)
            gate_thresholds.append(gate_thr)
            gate_masks.append(gate[split:])
            truth = gate if target == "gate" else _top_share(truth, split, density)[0]
        predictor = train_layer(x[:split], truth[:split], rank, epochs, seed=layer)
        scores = np.asarray(predictor(mx.array(x.astype(np.float32))))
        p = threshold_for_recall(scores[:split], truth[:split], recall)
        pred_thresholds.append(p)
        score_quantiles.append(np.quantile(scores[split:], DENSITY_GRID[::-1]).tolist())
        chosen = scores[split:] > math.log(p / (1 - p))
        pred_masks.append(chosen)
        reports.append(_report(layer, chosen, truth[split:]))
        prefix = predictor_prefix(layer)
        weights[prefix + "a.weight"] = predictor.a.weight.astype(mx.float16)
        weights[prefix + "b.weight"] = predictor.b.weight.astype(mx.float16)
        weights[prefix + "b.bias"] = predictor.b.bias.astype(mx.float16)
    recorded = SelectorRecord(
        kind=selector,
        target=target if gated else "nonzero",
        rank=[rank] * bundle.num_layers,
        predictor_threshold=pred_thresholds,
        density_grid=DENSITY_GRID.tolist(),
        score_quantiles=score_quantiles,
        target_recall=recall,
        trained_on=_provenance(text, ids, split, t0),
        stats={"predictor": selection_stats(pred_masks)},
    )
    if gated:
        recorded.gate_threshold, recorded.gate_density, recorded.gate_bits = gate_thresholds, density, gate_bits
        recorded.stats["gate"] = selection_stats(gate_masks)
    write_selector(bundle, weights, recorded)
    return reports


def write_selector(bundle: Bundle, weights: dict[str, mx.array], recorded: SelectorRecord) -> None:
    """update_resident with SIGINT/SIGTERM held off: an interrupt cannot land between its two renames
    (new resident file, old config), which would leave a bundle whose checksum no longer matches."""
    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held) if hasattr(signal, "pthread_sigmask") else None
    try:
        update_resident(bundle, weights, recorded)
    finally:
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


def calibrate_gate(
    bundle_path: Path,
    text: Path,
    tokens: int = 4096,
    density: float = 0.5,
    context: int = 256,
    gate_bits: int | None = None,
    heldout: float = 0.15,
) -> list[float]:
    """Calibrate the gate selector alone (gated FFNs): per-layer |silu(gate . x)| thresholds for `density`
    and the window unions the planner uses. It trains no predictor (the gate selector never reads one),
    so it costs one dense pass over the text and no more; the selector is written as in train_predictors.
    Returns each layer's share of neurons its threshold selects on the held-out tokens."""
    if not 0 < density <= 1:
        raise UsageError(f"--density {density}: must be within (0, 1]")
    bundle = Bundle.open(bundle_path)
    spec = bundle.spec
    if not spec.smooth_gated:
        raise UsageError(f"{bundle_path}: the gate selector needs a gated (SwiGLU) FFN")
    model, tokenizer = load_model(bundle_path, mode="resident", verify=False)
    ids = tokenize_text(tokenizer, Path(text), tokens)
    t0 = time.perf_counter()
    context = min(context, bundle.config.get("max_position_embeddings") or context)
    _, _, gate_signals = collect(model, ids, True, context, keep_inputs=False)
    model.flash.close()
    split = int(len(ids) * (1 - heldout))
    thresholds, masks = [], []
    for magnitude in gate_signals:
        chosen, thr = _top_share(magnitude, split, density)
        thresholds.append(thr)
        masks.append(chosen[split:])
    recorded = SelectorRecord(
        kind="gate",
        target="gate",
        gate_threshold=thresholds,
        gate_density=density,
        gate_bits=gate_bits,
        trained_on=_provenance(text, ids, split, t0),
        stats={"gate": selection_stats(masks)},
    )
    write_selector(bundle, {}, recorded)
    return [float(m.mean()) for m in masks]


def _provenance(text: Path, ids: list[int], split: int, t0: float) -> dict:
    """The record's `trained_on`: which text, how many tokens (held out too), how long it took."""
    seconds = round(time.perf_counter() - t0, 1)
    return {"text": Path(text).name, "tokens": len(ids), "heldout_tokens": len(ids) - split, "seconds": seconds}


def _top_share(magnitude: np.ndarray, split: int, density: float) -> tuple[np.ndarray, float]:
    """The neurons whose magnitude passes the layer's threshold for `density` (set on the training tokens)."""
    thr = float(np.quantile(magnitude[:split].astype(np.float32), 1 - density))
    return magnitude > thr, thr


def selection_stats(masks: list[np.ndarray]) -> SelectionStats:
    """Per layer (tokens, n) selections -> the mean density and the worst layer's window unions."""
    unions = np.array([window_union(m) for m in masks])  # (layers, windows)
    return SelectionStats(float(np.mean([m.mean() for m in masks])), tuple(unions.max(axis=0).tolist()))


def _report(layer: int, chosen: np.ndarray, target: np.ndarray) -> LayerReport:
    tp = np.count_nonzero(chosen & target)
    return LayerReport(
        layer, tp / max(1, target.sum()), tp / max(1, chosen.sum()), float(chosen.mean()), float(target.mean())
    )


def format_report(reports: list[LayerReport]) -> str:
    lines = ["layer  recall  precision  density  target-density"]
    lines += [
        f"{r.layer:5d}  {r.recall:6.3f}  {r.precision:9.3f}  {r.density:7.3f}  {r.target_density:14.3f}"
        for r in reports
    ]
    mean = lambda f: sum(f(r) for r in reports) / len(reports)  # noqa: E731
    lines.append(
        f" mean  {mean(lambda r: r.recall):6.3f}  {mean(lambda r: r.precision):9.3f}  {mean(lambda r: r.density):7.3f}  {mean(lambda r: r.target_density):14.3f}"
    )
    return "\n".join(lines)
