#!/usr/bin/env python3
"""Reorder a bundle's neurons on disk by how often a recorded trace selects them (hottest first), and
report reads and bytes per token before and after on a second trace.

    python tools/reorder_neurons.py BUNDLE --trace CALIB.npz --out NEW_BUNDLE [--eval EVAL.npz]
                                    [--window 4] [--gap 0]

CALIB.npz and EVAL.npz come from tools/record_trace.py (calibrate on text that is never evaluated;
EVAL defaults to CALIB). The permutation moves every neuron-indexed tensor with its record
(mlxflash.runtime.reorder), so NEW_BUNDLE computes what BUNDLE computes. The report replays EVAL
through the cache's bookkeeping (window --window, every neuron fitting) with direct I/O's page
alignment: reads per token and bytes transferred over bytes used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlxflash.format.bundle import Bundle
from mlxflash.runtime import reorder
from mlxflash.runtime.traces import Trace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--trace", type=Path, required=True, help="calibration trace (the order comes from it)")
    p.add_argument("--eval", type=Path, help="trace the report replays (default: --trace)")
    p.add_argument("--out", type=Path, help="write the reordered bundle here (omit: report only)")
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--gap", type=int, default=0, help="records read through between needed ones")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    bundle = Bundle.open(args.bundle, verify=False)
    calib = Trace.load(args.trace)
    evaluation = Trace.load(args.eval) if args.eval else calib
    widths = [b.neurons for b in bundle.spec.layers]
    if calib.widths != widths or evaluation.widths != widths:
        raise SystemExit(f"{args.trace}: trace widths do not match the bundle's layers ({widths[0]} x {len(widths)})")
    g = reorder.group_size(bundle)
    perms = [reorder.frequency_order(calib, layer, w, g) for layer, w in enumerate(widths)]
    R = bundle.spec.record.nbytes
    kw = {"record_bytes": R, "capacity": widths, "window": args.window, "gap": args.gap}
    before = reorder.read_stats(evaluation, **kw)
    after = reorder.read_stats(reorder.permute_trace(evaluation, perms), **kw)
    print(
        f"# {bundle.path.name}: records of {R} bytes, reordered in groups of {g} by {args.trace.name}; replay of {evaluation.meta.get('text', args.eval or args.trace)} (window {args.window}, gap {args.gap})"
    )
    print("| order | reads/token | MB used/token | MB transferred/token | transferred/used |")
    print("|---|---|---|---|---|")
    for name, s in (("as converted", before), ("frequency", after)):
        print(
            f"| {name} | {s.reads_per_token:.0f} | {s.bytes_used_per_token / 1e6:.2f} "
            f"| {s.bytes_transferred_per_token / 1e6:.2f} | {s.transferred_over_used:.2f} |"
        )
    if args.out:
        how = {"method": "frequency", "trace": args.trace.name, "group": g}
        print(f"wrote {reorder.reorder_bundle(bundle, perms, args.out, how)}")
    if args.json:
        rows = {"before": before.__dict__, "after": after.__dict__}
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
