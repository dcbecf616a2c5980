#!/usr/bin/env python3
"""Record the router's choices of an MoE bundle on a text: a routing trace for the bench and the planner.

    python tools/record_routing.py BUNDLE --text FILE --out routing.npz [--tokens 512] [--memory 50%]

Runs the bundle's own model (mlx-lm's MoE class with streaming experts; --memory as for `mlxflash
generate`) over the first --tokens tokens of the text and stores, per MoE layer and token, the ids of
the routed experts (mlxflash.runtime.traces format, width = the number of experts). Prints the reuse
statistics that decide an expert cache: the share of a token's experts routed at the previous token,
the union over windows, and LRU/LFU hit rates at a few cache sizes. Use the trace with
`tools/bench.py BUNDLE --trace routing.npz`. Record on text you do not evaluate on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlxflash
from mlxflash.runtime.moe import record_routes
from mlxflash.runtime.routing import reuse_stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--memory", help="DRAM budget (default: the whole model)")
    args = p.parse_args(argv)
    if not args.text.is_file():
        raise SystemExit(f"--text {args.text}: no such file")
    model, tokenizer = mlxflash.load(args.bundle, memory=args.memory)
    tokens = tokenizer.encode(args.text.read_text())[: args.tokens]
    if len(tokens) < 2:
        raise SystemExit(f"--text {args.text}: fewer than 2 tokens")
    trace = record_routes(model, tokens)
    trace.meta["text"] = str(args.text)
    trace.save(args.out)
    E, k = trace.widths[0], model.flash.bundle.spec.top_k
    stats = reuse_stats(trace, sorted({k, 2 * k, E // 4, E // 2}))
    print(json.dumps({"trace": str(args.out), **stats}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
