"""Rounds aggregated into one figure per mode (the median of the rounds' medians, with their spread),
the figures every mode shares (attention + head), speed-ups, the full-depth extrapolation, the
machine, tables, JSON and the plot."""

from __future__ import annotations

import calendar
import os
import platform
import statistics
import time
from dataclasses import fields
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxflash.format.bundle import Bundle, dtype_name
from mlxflash.runtime import costmodel
from mlxflash.runtime.cpu import blas_in_use

from .budget import Budget
from .measure import ModeResult, activation_dtype

GB = 1e9
SPREAD_KEYS = ("total_ms", "io_ms", "mem_ms", "compute_ms", "predicted_io_ms")


def common_attention(results: list[ModeResult], layers: int) -> None:
    """Attention and the LM head are the same work in every mode, timed apart in each process:
    replace each result's own figure by the median over all of them (the measured one stays in extra)."""
    ran = [r for r in results if not r.skipped and "head_ms" in r.extra]
    if not ran:
        return
    layer = statistics.median(r.extra["attention_layer_ms"] for r in ran)
    head = statistics.median(r.extra["head_ms"] for r in ran)
    common = layer * layers + head
    for r in ran:
        r.extra["attention_measured_ms"] = r.attention_ms
        delta = common - r.attention_ms
        r.compute_ms += delta
        r.total_ms += delta
        r.token_ms = [t + delta for t in r.token_ms]
        r.attention_ms, r.extra["attention_layer_ms"], r.extra["head_ms"] = common, layer, head


def aggregate(rounds: list[ModeResult]) -> ModeResult:
    """One mode's results over the rounds -> the median of each figure, [min, max] spreads, all tokens."""
    ran = [r for r in rounds if not r.skipped]
    if not ran:
        return rounds[0]
    middle = sorted(ran, key=lambda r: r.total_ms)[(len(ran) - 1) // 2]  # its notes and extra
    out = ModeResult(**{f.name: getattr(middle, f.name) for f in fields(ModeResult)})
    for f in fields(ModeResult):
        values = [getattr(r, f.name) for r in ran]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            setattr(out, f.name, statistics.median(values))
    out.peak_rss_bytes = max(r.peak_rss_bytes for r in ran)
    out.rounds = len(ran)
    out.token_ms = [t for r in ran for t in r.token_ms]
    out.spread = {k: [min(getattr(r, k) for r in ran), max(getattr(r, k) for r in ran)] for k in SPREAD_KEYS}
    out.extra["round_total_ms"] = [r.total_ms for r in ran]
    return out


def add_speedups(results: list[ModeResult]) -> None:
    base = {r.mode: r.total_ms for r in results if not r.skipped}
    for r in results:
        if r.skipped or not r.total_ms:
            continue
        r.speedup_vs_naive = base["naive"] / r.total_ms if "naive" in base else None
        r.speedup_vs_hybrid = base["hybrid"] / r.total_ms if "hybrid" in base else None
        if "mmap" in base:
            r.extra["speedup_vs_mmap"] = base["mmap"] / r.total_ms


def full_depth(r: ModeResult, budget: Budget) -> dict:
    """The mode's per-token figures extrapolated to the real depth: the head once, per-layer costs
    (FFN I/O, memory, compute and attention) times full_layers / layers."""
    scale = budget.full_layers / budget.layers
    head = r.extra.get("head_ms", 0.0)
    return {
        "layers": budget.full_layers,
        "dram_bytes": budget.budget_full if r.mode != "resident" else budget.model_bytes_full,
        "bytes_per_token": r.bytes_per_token * scale,
        "io_ms": r.io_ms * scale,
        "mem_ms": r.mem_ms * scale,
        "compute_ms": head + (r.compute_ms - head) * scale,
        "total_ms": head + (r.total_ms - head) * scale,
    }


def add_full_depth(results: list[ModeResult], budget: Budget) -> None:
    done = [r for r in results if not r.skipped]
    for r in done:
        r.extra["full_depth"] = full_depth(r, budget)
    base = {r.mode: r.extra["full_depth"]["total_ms"] for r in done}
    for r in done:
        f = r.extra["full_depth"]
        f["speedup_vs_naive"] = base["naive"] / f["total_ms"] if "naive" in base else None
        f["speedup_vs_hybrid"] = base["hybrid"] / f["total_ms"] if "hybrid" in base else None


def floor_ms(r: ModeResult, seq_gbps: float) -> float:
    """What the mode cannot go below: attention + head, plus the larger of its I/O at the disk curve
    (the cost model's prediction; mmap: its bytes at the sequential figure) and its FFN compute (I/O and
    compute may overlap). A bound takes the faster disk: the stored curve or the spot check, whichever
    predicts less (one spot check of large reads on a shared VM can come in at half the probe's figure)."""
    ffn_compute = r.compute_ms - r.attention_ms
    predictions = [p for p in (r.predicted_io_ms, r.extra.get("predicted_io_stored_ms")) if p]
    io = min(predictions) if predictions else r.transferred_per_token / (seq_gbps * GB) * 1e3 if seq_gbps > 0 else 0.0
    return r.attention_ms + max(io, ffn_compute)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def curve_source(curve: costmodel.DiskCurve) -> str:
    """Where the disk curve comes from and how old it is (a curve from another machine says so)."""
    meta = curve.meta
    if "date" not in meta:
        return meta.get("source", "unknown source")
    age_h = (time.time() - calendar.timegm(time.strptime(meta["date"], "%Y-%m-%dT%H:%M:%SZ"))) / 3600
    host = meta.get("host", "?")
    where = "this machine" if host == platform.node() else f"another machine ({host})"
    return f"{meta.get('source', '?')} on {where}, {meta['date']} ({age_h:.1f} h ago, {meta.get('io_mode', '')})"


def machine(bundle: Bundle, curve: costmodel.DiskCurve, io_mode: str) -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "ram_bytes": mem,
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": blas_in_use(),
        "dtype": bundle.spec.dtype,
        "quantization": bundle.spec.quantization,
        "activations": dtype_name(activation_dtype(bundle)),
        "io_mode": io_mode,
        "disk_curve": curve_source(curve),
        "disk_sequential_gbps": curve.sequential_gbps,
    }


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v else "-"


def _ms(v: float, spread: list | None = None) -> str:
    if not v:
        return "-"
    return f"{v:.1f} ({spread[0]:.0f}-{spread[1]:.0f})" if spread else f"{v:.1f}"


def table(results: list[ModeResult], seq_gbps: float = 0.0) -> str:
    head = (
        "| mode | DRAM GB | flash->DRAM GB/token | transferred/used | reads/token | read GB/s "
        f"(probe seq {seq_gbps:.2f}) | I/O ms (predicted: spot-checked curve; stored) | mem ms | compute ms | total ms (rounds min-max) "
        "| vs naive | vs hybrid | vs mmap |"
    )
    rows = [head, "|" + "---|" * 13]
    for r in results:
        if r.skipped:
            rows.append(f"| {r.mode} | skipped: {r.skipped} |" + " |" * 11)
            continue
        ratio = r.transferred_per_token / r.bytes_per_token if r.bytes_per_token else 0.0
        rows.append(
            f"| {r.mode} | {r.dram_bytes / GB:.2f} | {r.bytes_per_token / GB:.3f} | {ratio:.2f} "
            f"| {r.reads_per_token:.0f} | {r.read_gbps:.2f} | {r.io_ms:.1f} ({_ms(r.predicted_io_ms)}; "
            f"stored {_ms(r.extra.get('predicted_io_stored_ms', 0.0))}) "
            f"| {r.mem_ms:.1f} | {r.compute_ms:.1f} | {_ms(r.total_ms, r.spread.get('total_ms'))} "
            f"| {_x(r.speedup_vs_naive)} | {_x(r.speedup_vs_hybrid)} | {_x(r.extra.get('speedup_vs_mmap'))} |"
        )
    return "\n".join(rows)


def floor_table(results: list[ModeResult], seq_gbps: float) -> str:
    rows = [
        "floors: attention+head + max(I/O at the disk curve, FFN compute); peak RSS against the plan:",
        "",
        "| mode | floor ms | total / floor | peak RSS GB | DRAM planned GB |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if not r.skipped:
            f = floor_ms(r, seq_gbps)
            rows.append(
                f"| {r.mode} | {f:.1f} | {r.total_ms / f:.2f} | {r.peak_rss_bytes / GB:.2f} | {r.dram_bytes / GB:.2f} |"
            )
    return "\n".join(rows)


def full_table(results: list[ModeResult], budget: Budget) -> str:
    rows = [
        f"extrapolated to {budget.full_layers} layers (head once, per-layer costs x {budget.full_layers}/{budget.layers}):",
        "",
        "| mode | DRAM GB | flash->DRAM GB/token | I/O ms | mem ms | compute ms | total ms | vs naive | vs hybrid |",
        "|" + "---|" * 9,
    ]
    for r in results:
        f = r.extra.get("full_depth") if not r.skipped else None
        if f:
            rows.append(
                f"| {r.mode} | {f['dram_bytes'] / GB:.2f} | {f['bytes_per_token'] / GB:.3f} | {f['io_ms']:.0f} "
                f"| {f['mem_ms']:.0f} | {f['compute_ms']:.0f} | {f['total_ms']:.0f} "
                f"| {_x(f['speedup_vs_naive'])} | {_x(f['speedup_vs_hybrid'])} |"
            )
    return "\n".join(rows)


def header(bundle: Bundle, budget: Budget, m: dict, args) -> str:
    q = bundle.spec.quantization
    storage = f"{q['up']['bits']}-bit" if q else bundle.spec.dtype
    depth = (
        f" (budget resolved at full depth {budget.full_layers} layers: {budget.budget_full / GB:.2f} GB of "
        f"{budget.model_bytes_full / GB:.2f} GB, scaled per layer)"
        if budget.scaled
        else ""
    )
    load = ", ".join(f"{v:.2f}" for v in m["load_average"])
    return "\n".join(
        [
            f"# {bundle.path.name}: {budget.layers} layers, d={bundle.spec.hidden_size}, "
            f"FFN {bundle.spec.intermediate_size}, {storage}; model {budget.model_bytes / GB:.2f} GB",
            f"budget {args.memory} -> {budget.budget / GB:.2f} GB{depth}",
            f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.0f} GiB, load average {load} "
            f"(at the end); MLX {m['mlx']} {m['device']}; BLAS {m['blas']}; activations {m['activations']}; "
            f"I/O {m['io_mode']}",
            f"disk curve: {m['disk_curve']}; sequential {m['disk_sequential_gbps']:.2f} GB/s",
            f"{args.rounds} rounds, modes interleaved, each a fresh process: {args.warmup} warm-up + {args.tokens} "
            "measured tokens; figures are the median of the rounds' medians (spread: the rounds' min-max); "
            "attention+head: the median over all processes of their own timing, added to compute",
        ]
    )


def plot(results: list[ModeResult], curve: costmodel.DiskCurve, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from e
    done = [r for r in results if not r.skipped]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [r.mode for r in done]
    bottom = np.zeros(len(done))
    for key, color in (("io_ms", "tab:red"), ("mem_ms", "tab:orange"), ("compute_ms", "tab:blue")):
        vals = np.array([getattr(r, key) for r in done])
        a.bar(names, vals, bottom=bottom, label=key.removesuffix("_ms"), color=color)
        bottom += vals
    a.set_ylabel("ms per token")
    a.set_title("latency per token")
    a.legend()
    a.tick_params(axis="x", rotation=30)
    for j, t in enumerate(curve.threads):
        b.plot([c / 1024 for c in curve.chunks], [row[j] for row in curve.gbps], marker="o", label=f"{t} threads")
    b.set_xscale("log", base=2)
    b.set_xlabel("chunk KiB")
    b.set_ylabel("GB/s")
    b.set_title("direct random reads (disk probe)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
