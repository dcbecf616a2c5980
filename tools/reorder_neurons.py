#!/usr/bin/env python3
"""Reorder a bundle's neurons on disk by how often a recorded trace selects them (hottest first), and
report reads and bytes per token before and after on a second trace.

    python tools/reorder_neurons.py BUNDLE --trace CALIB.npz --out NEW_BUNDLE [--eval EVAL.npz]
                                    [--window 4] [--gap 0] [--order frequency|none] [--page-fit]

CALIB.npz and EVAL.npz come from tools/record_trace.py (calibrate on text that is never evaluated;
EVAL defaults to CALIB). The permutation moves every neuron-indexed tensor with its record
(mlxflash.runtime.reorder), so NEW_BUNDLE computes what BUNDLE computes. The report replays EVAL
through the cache's bookkeeping (window --window, every neuron fitting) with direct I/O's page
alignment: reads per token and bytes transferred over bytes used, for the records as they are and
page-fitted (padded on disk so that none straddles a page: mlxflash.format.bundle.page_stride), in the
converted order and the new one. --page-fit writes NEW_BUNDLE's records page-fitted; --order none keeps
the order (a bundle converted before page fitting gets its padding that way).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

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
    p.add_argument("--order", choices=("frequency", "none"), default="frequency", help="the order written")
    p.add_argument("--page-fit", action="store_true", help="write the records padded to fit pages")
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
    layout = bundle.spec.record
    fitted = reorder.page_fitted(layout)
    reordered = reorder.permute_trace(evaluation, perms)
    rows = {}
    for name, trace, stride in (
        ("as converted", evaluation, layout.nbytes),
        ("frequency", reordered, layout.nbytes),
        ("page-fitted", evaluation, fitted.nbytes),
        ("frequency, page-fitted", reordered, fitted.nbytes),
    ):
        kw = {"capacity": widths, "window": args.window, "gap": args.gap, "used_bytes": layout.field_bytes}
        rows[name] = reorder.read_stats(trace, stride, **kw)
    print(
        f"# {bundle.path.name}: records of {layout.field_bytes} bytes of fields ({layout.nbytes} on disk; "
        f"page-fitted {fitted.nbytes}), reordered in groups of {g} by {args.trace.name}; replay of "
        f"{evaluation.meta.get('text', args.eval or args.trace)} (window {args.window}, gap {args.gap})"
    )
    print("| records | reads/token | MB used/token | MB transferred/token | transferred/used |")
    print("|---|---|---|---|---|")
    for name, st in rows.items():
        print(
            f"| {name} | {st.reads_per_token:.0f} | {st.bytes_used_per_token / 1e6:.2f} "
            f"| {st.bytes_transferred_per_token / 1e6:.2f} | {st.transferred_over_used:.2f} |"
        )
    if args.out:
        keep = args.order == "none"
        how = {"method": args.order, "trace": args.trace.name, "group": g, "page_fit": args.page_fit}
        chosen = [np.arange(w) for w in widths] if keep else perms
        out = reorder.reorder_bundle(bundle, chosen, args.out, how, fitted if args.page_fit else None)
        print(f"wrote {out}")
    if args.json:
        args.json.write_text(json.dumps({k: v.__dict__ for k, v in rows.items()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
