#!/usr/bin/env python3
"""Per-token FFN latency of a bundle under a memory budget, mode by mode (the paper's Tables 2 and 3).

    python tools/bench.py BUNDLE --memory 50% [--modes naive,hybrid,mmap,flash,...] [--rounds 3]
                          [--tokens 5] [--warmup 2] [--trace paper|FILE] [--curve PROBE.json]
                          [--json PATH] [--plot PATH]
    python tools/bench.py BUNDLE --decode --memory 65%   (a real model end to end: tools/bench_decode.py)

What is measured. Each mode runs in its own process (so DRAM and peak RSS are its own), once per
round, the modes interleaved round after round (a burst of load on the shared machine hits one sample
of each, not one mode), and drives the FFN layer by layer: per token and layer the FFN input is a
fixed random vector (the same in every mode; the bundle's dtype for float bundles, float32 for
quantized ones), the mode fetches what it needs (I/O), prepares it (memory management) and computes
the FFN (compute) with the runtime's FFN math. Attention, norms and the LM head cost the same in every
mode: their projections are timed in each process and the median over all of them is added to every
mode's compute. Each figure is the median over the rounds of the round's median token, with the
rounds' min-max beside it.

Modes (tools/benchlib/drivers.py; `drivers.register` adds more, e.g. mixture-of-experts drivers):
  naive     every layer's whole FFN block read at every token, large sequential direct reads (float
            bundles with page-sized record fields: preadv iovecs scatter the fields into contiguous
            matrices, no copy). Dense compute.
  hybrid    the FFN DRAM the budget allows holds each layer's first neurons; the rest streamed like naive.
  mmap      ffn.bin through a plain memory map under a cgroup memory cap of the budget (+ --mmap-overhead);
            its flash->DRAM bytes are what the kernel read (/proc/self/io). Needs root and a cgroup memory
            controller; else skipped with the reason.
  resident  the whole FFN in DRAM (only when the model fits the budget).
  flash-predictor, flash-window, flash-bundle, flash, flash-overlap
            the runtime's flash mode with a TraceSelector replaying --trace: predictor only (no reuse,
            no bundling, no coalescing); + windowing; + bundling; flash = all of them + coalescing (the
            runtime's default); flash-overlap = flash with the cached neurons computed while the missing
            ones are read (load_model(overlap=True)).

Budget (tools/benchlib/budget.py): --memory as the runtime planner parses it; a synthetic bundle with
fewer layers than its real model resolves the budget at the real depth and scales it per layer, and a
second table extrapolates every mode to the real depth.

Predicted I/O: the cost model (mlxflash.runtime.costmodel) with the disk curve of --curve (default: the
stored probe, else the DESIGN.md reference; the header says which, where and how old).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode  # noqa: E402  (--decode: a real model end to end, time to first token and ms/token)
import bench_moe  # noqa: E402  (mixture-of-experts bundles: naive, mmap and flash with the expert cache)
from benchlib import isolation, report  # noqa: E402
from benchlib.budget import Budget, resolve_budget  # noqa: E402
from benchlib.drivers import DRIVERS, FlashDriver, make_driver, resident_weights_of  # noqa: E402
from benchlib.measure import ModeResult, attention_seconds, summarize, time_tokens  # noqa: E402

from mlxflash.errors import UsageError  # noqa: E402
from mlxflash.format.bundle import Bundle  # noqa: E402
from mlxflash.format.moe import is_moe_bundle  # noqa: E402
from mlxflash.runtime import costmodel  # noqa: E402
from mlxflash.runtime.cpu import reexec_with_openblas  # noqa: E402

DEFAULT_MODES = (
    "naive",
    "hybrid",
    "mmap",
    "flash-predictor",
    "flash-window",
    "flash-bundle",
    "flash",
    "flash-overlap",
    "resident",
)


def run_mode(mode: str, args) -> ModeResult:
    """Measure one mode in this process (the child)."""
    bundle = Bundle.open(args.bundle, verify=False)
    budget = resolve_budget(bundle, args.memory)
    curve = costmodel.DiskCurve.load_or_default(args.curve)
    driver = make_driver(mode, bundle, budget, args)
    attn_layer, head = attention_seconds(bundle, resident_weights_of(driver, bundle))
    attn = attn_layer * bundle.num_layers + head
    clocks, walls, disk = time_tokens(driver, bundle, args.warmup, args.tokens, isolation.disk_read_bytes)
    r = summarize(mode, driver, clocks, walls, attn, curve, bundle.ffn_path)
    r.disk_bytes_per_token = disk
    r.dram_bytes = dram_bytes(mode, driver, bundle, budget)
    if mode == "mmap" and disk is not None:  # what the page cache really read
        r.bytes_per_token = r.transferred_per_token = disk
        r.read_gbps = disk / (r.io_ms / 1e3) / 1e9 if r.io_ms > 0 else 0.0
    r.extra.update(attention_layer_ms=1e3 * attn_layer, head_ms=1e3 * head, peak_rss_bytes=r.peak_rss_bytes)
    return r


def dram_bytes(mode: str, driver, bundle: Bundle, budget: Budget) -> float:
    """Model bytes the mode holds in DRAM (resident part + FFN memory)."""
    if isinstance(driver, FlashDriver):
        return driver.dram_bytes()
    if mode == "mmap":
        return budget.budget  # the cap: page cache fills it
    return bundle.resident_bytes + driver.dram_ffn


def child_command(mode: str, args) -> list[str]:
    cmd = [isolation.python(), __file__, str(args.bundle), "--memory", args.memory, "--child", mode]
    cmd += ["--tokens", str(args.tokens), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    cmd += ["--trace", args.trace, "--seed", str(args.seed)]
    return cmd + (["--curve", str(args.curve)] if args.curve else [])


def skip_reason(mode: str, budget: Budget) -> str | None:
    if mode == "resident" and budget.model_bytes > budget.budget:
        return f"does not fit the budget ({budget.model_bytes / 1e9:.2f} GB > {budget.budget / 1e9:.2f} GB)"
    return None


def run_rounds(modes: list[str], args, bundle: Bundle, budget: Budget) -> list[ModeResult]:
    """Every mode once per round, interleaved; per mode the rounds' aggregate."""
    per_mode: dict[str, list[ModeResult]] = {m: [] for m in modes}
    for round_ in range(args.rounds):
        for mode in modes:
            why = skip_reason(mode, budget)
            if why:
                per_mode[mode].append(ModeResult(mode, skipped=why))
                continue
            print(f"round {round_ + 1}/{args.rounds}: {mode}", file=sys.stderr, flush=True)
            cap = int(budget.budget + args.mmap_overhead) if mode == "mmap" else None
            r = isolation.run_child(child_command(mode, args), mode, bundle.ffn_path, cap)
            per_mode[mode].append(r)
            if r.skipped:
                print(f"  {mode}: {r.skipped}", file=sys.stderr, flush=True)
    report.common_attention([r for rs in per_mode.values() for r in rs], bundle.num_layers)
    return [report.aggregate(rs) for rs in per_mode.values()]


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--memory", default="50%", help="DRAM budget: a size (4GB) or a percentage of the model")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma list of " + ", ".join(DRIVERS))
    p.add_argument("--rounds", type=int, default=3, help="rounds over the modes, interleaved (>= 3 to trust)")
    p.add_argument("--tokens", type=int, default=5, help="measured tokens per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=8, help="reads in flight for naive/hybrid/flash")
    p.add_argument("--trace", default="paper", help="'paper' (calibrated generator) or a trace .npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve", type=Path, help=f"disk probe JSON (default {costmodel.DEFAULT_PATH})")
    p.add_argument("--mmap-overhead", type=float, default=256 * 2**20, help="bytes added to the mmap cap")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.tokens < 1 or args.warmup < 0:
        p.error("--rounds and --tokens must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    if "--decode" in (sys.argv[1:] if argv is None else argv):
        return bench_decode.main(argv)
    if any(is_moe_bundle(a) for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")):
        return bench_moe.main(argv)
    args = parse_args(argv)
    if args.child:
        isolation.report_to_parent(run_mode(args.child, args))
        return 0
    modes = isolation.parse_modes(args.modes, DRIVERS)
    bundle = Bundle.open(args.bundle, verify=False)
    try:
        budget = resolve_budget(bundle, args.memory)
    except UsageError as e:  # a bad --memory: one line, not a traceback
        raise SystemExit(f"bench: {e}") from e
    curve = costmodel.DiskCurve.load_or_default(args.curve)
    results = run_rounds(modes, args, bundle, budget)
    report.add_speedups(results)
    if budget.scaled:
        report.add_full_depth(results, budget)
    io_mode = next((r.io_mode for r in results if r.io_mode and "mmap" not in r.io_mode), "n/a")
    m = report.machine(bundle, curve, io_mode)
    seq = curve.sequential_gbps
    print(report.header(bundle, budget, m, args) + "\n\n" + report.table(results, seq))
    print("\n" + report.floor_table(results, seq))
    if budget.scaled:
        print("\n" + report.full_table(results, budget))
    for r in results:
        if r.note:
            print(f"- {r.mode}: {r.note}")
    if args.json:
        out = {"machine": m, "budget": asdict(budget), "args": vars(args), "modes": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
    if args.plot:
        report.plot(results, curve, args.plot)
    return 0


if __name__ == "__main__":
    reexec_with_openblas()  # as the CLI does; the children inherit the preload (MLXFLASH_BLAS=reference opts out)
    sys.exit(main())
