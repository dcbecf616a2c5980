#!/usr/bin/env python3
"""Train a bundle's neuron predictors and calibrate its selectors (front end of mlxflash.runtime.train).

python tools/train_predictors.py BUNDLE --text FILE [--rank R] [--tokens N] [--density D] [--quality-tokens N]

After training, the quality table (mlxflash.eval.quality) is measured on the held-out tokens: each operating
point of a grid (selectors, densities, windows) run as flash mode runs it, against dense. The planner then
picks from it. `--quality-tokens 0` skips it; `--quality-only` measures it without training again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlxflash.errors import MlxflashError, UsageError
from mlxflash.eval.quality import Grid, calibrate_quality, default_grid
from mlxflash.format.bundle import Bundle
from mlxflash.runtime.cpu import reexec_with_openblas
from mlxflash.runtime.train import format_report, train_predictors


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _selectors(text: str) -> tuple[tuple[str, int | None], ...]:
    """'gate:2,activation:1,predictor' -> (("gate", 2), ("activation", 1), ("predictor", None))."""
    out = []
    for item in text.split(","):
        kind, _, bits = item.partition(":")
        if kind not in ("gate", "activation", "predictor"):
            raise argparse.ArgumentTypeError(f"{item!r}: expected gate[:BITS], activation[:BITS] or predictor")
        out.append((kind, int(bits) if bits else None))
    return tuple(out)


def grid_from(args, bundle: Path) -> Grid:
    base = default_grid(Bundle.open(bundle, verify=False))
    return Grid(
        args.quality_selectors or base.selectors,
        args.quality_densities or base.densities,
        args.quality_windows or base.windows,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--text", type=Path, required=True, help="plain text to run the dense model over")
    p.add_argument("--rank", type=int, help="predictor rank (default: hidden_size/16, 16..128)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of text to use (15%% held out)")
    p.add_argument("--density", type=float, default=0.4, help="gated FFNs: share of neurons the gate selector keeps")
    p.add_argument("--recall", type=float, default=0.9, help="predictor threshold: recall to reach on training tokens")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument(
        "--mode",
        choices=("resident", "naive"),
        default="resident",
        help="naive streams the FFN (models larger than RAM)",
    )
    p.add_argument(
        "--selector", choices=("predictor", "gate"), default="predictor", help="the selector flash mode uses by default"
    )
    p.add_argument(
        "--gate-bits", type=int, choices=(1, 2, 3), help="with --selector gate: select from a low-bit gate copy"
    )
    p.add_argument(
        "--target",
        choices=("gate", "activation"),
        default="gate",
        help="gated FFNs: train the predictor on the gate selector's set (default) or on the largest |h|",
    )
    p.add_argument(
        "--quality-tokens", type=int, default=512, help="held-out tokens the quality table is measured on (0: none)"
    )
    p.add_argument("--quality-context", type=int, default=256, help="window of the quality measurement")
    p.add_argument("--quality-only", action="store_true", help="measure the quality table only (no training)")
    p.add_argument("--quality-selectors", type=_selectors, help="e.g. gate:2,activation:1,predictor (default: all)")
    p.add_argument("--quality-densities", type=_floats, help="e.g. 0.2,0.3,0.4 (default: 0.1 to 0.65)")
    p.add_argument("--quality-windows", type=_ints, help="e.g. 1,2,4 (default)")
    p.add_argument(
        "--quality-merge",
        action="store_true",
        help="add the points to the bundle's table (same tokens) instead of replacing it",
    )
    args = p.parse_args(argv)
    reexec_with_openblas()  # Linux CPU: the dense passes over the text are BLAS-bound
    try:
        if args.quality_only and not args.quality_tokens:
            raise UsageError("--quality-only with --quality-tokens 0: nothing to do")
        if not args.quality_only:
            reports = train_predictors(
                args.bundle,
                args.text,
                rank=args.rank,
                tokens=args.tokens,
                density=args.density,
                recall=args.recall,
                epochs=args.epochs,
                mode=args.mode,
                selector=args.selector,
                gate_bits=args.gate_bits,
                target=args.target,
            )
            print(format_report(reports))
            print(f"wrote predictors into {args.bundle}/resident.safetensors")
        if args.quality_tokens:
            grid = grid_from(args, args.bundle)
            table = calibrate_quality(
                args.bundle, args.text, args.tokens, args.quality_tokens, args.quality_context, grid, args.quality_merge
            )
            print(f"wrote the quality table ({len(table.points)} points) into {args.bundle}/config.json")
    except MlxflashError as e:
        print(f"train_predictors: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
