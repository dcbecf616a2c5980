#!/usr/bin/env python3
"""Record a real activation trace: which FFN neurons a bundle's selector picks, token by token, on a text.

    python tools/record_trace.py BUNDLE --text FILE --out TRACE.npz [--selector gate|predictor]
                                 [--density D] [--tokens 200]

The bundle is loaded in flash mode with its selector wrapped in `mlxflash.runtime.traces.RecordingSelector`,
and the first --tokens tokens of the text go through the model as one prompt with per-token
selections (masked_prompts), so every token's selection at every layer is recorded. The trace
(`mlxflash.runtime.traces.Trace`) replays on any bundle: `tools/bench.py BUNDLE --trace TRACE.npz`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlxflash.format.bundle import Bundle
from mlxflash.runtime import traces
from mlxflash.runtime.model import load_model
from mlxflash.runtime.planner import make_selector
from mlxflash.runtime.reader import FlashReader


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--selector", help="gate, predictor, ... (default: the bundle's own)")
    p.add_argument("--density", type=float, help="re-threshold the selector to this fraction of neurons")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--memory", default="2GB", help="budget to load with (large enough that nothing is dropped)")
    args = p.parse_args(argv)

    bundle = Bundle.open(args.bundle, verify=False)
    reader = FlashReader(bundle.ffn_path, threads=4)
    inner = make_selector(bundle, reader, bundle.resident_weights(), args.selector, density=args.density)
    widths = [b.neurons for b in bundle.spec.layers]
    meta = {"source": str(args.bundle), "selector": inner.kind, "density": args.density, "text": args.text.name}
    recorder = traces.RecordingSelector(inner, bundle.num_layers, widths, **meta)
    model, tokenizer = load_model(
        args.bundle, mode="flash", memory=args.memory, selector=recorder, masked_prompts=True, verify=False
    )
    ids = tokenizer.encode(args.text.read_text(errors="replace")[: 40 * args.tokens])[: args.tokens]
    t0 = time.perf_counter()
    mx.eval(model(mx.array([ids])))
    trace = recorder.trace()
    trace.meta["tokens"] = trace.num_tokens
    trace.save(args.out)
    s = traces.window_stats(trace, max_window=5)
    print(
        f"{args.out}: {trace.num_tokens} tokens x {trace.num_layers} layers ({time.perf_counter() - t0:.1f} s); "
        f"density {s['density']:.3f}; union of k=1..5 tokens "
        f"{', '.join(f'{u:.3f}' for u in s['union_mean'])}; new per token (window k) "
        f"{', '.join(f'{n:.3f}' for n in s['new_mean'])}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
