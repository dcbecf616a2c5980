#!/usr/bin/env python3
"""Train a bundle's neuron predictors and calibrate its selectors (front end of mlxflash.runtime.train).

python tools/train_predictors.py BUNDLE --text FILE [--rank R] [--tokens N] [--density D]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlxflash.errors import MlxflashError
from mlxflash.runtime.cpu import reexec_with_openblas
from mlxflash.runtime.train import format_report, train_predictors


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
    args = p.parse_args(argv)
    reexec_with_openblas()  # Linux CPU: the dense passes over the text are BLAS-bound
    try:
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
    except MlxflashError as e:
        print(f"train_predictors: error: {e}", file=sys.stderr)
        return 1
    print(format_report(reports))
    print(f"wrote predictors into {args.bundle}/resident.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
