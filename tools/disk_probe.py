#!/usr/bin/env python3
"""Measure O_DIRECT random-read throughput over chunk sizes x reads in flight; store the curve.

    python tools/disk_probe.py [--size 4GiB] [--file PATH] [--keep] [--out ~/.cache/mlxflash/disk_probe.json]

Writes a scratch file of real data (evicted from the page cache with posix_fadvise DONTNEED), then
for each thread count and chunk size lets each thread loop over its own batch of random aligned
reads (mlxflash.runtime.reader.FlashReader), median of --repeats timings of at least --min-seconds each.
Prints the table (GB/s) and the planner's choices derived from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlxflash.runtime import costmodel


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="4GiB", help="scratch file size (default 4GiB)")
    p.add_argument("--file", type=Path, default=costmodel.DEFAULT_PATH.parent / "probe.scratch")
    p.add_argument("--keep", action="store_true", help="keep the scratch file (reused by the next probe)")
    p.add_argument("--out", type=Path, default=costmodel.DEFAULT_PATH)
    p.add_argument("--chunks", default=",".join(str(c >> 10) for c in costmodel.PROBE_CHUNKS), help="KiB list")
    p.add_argument("--threads", default=",".join(map(str, costmodel.PROBE_THREADS)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=0.25)
    args = p.parse_args(argv)
    chunks = [int(c) << 10 for c in args.chunks.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    size = parse_size(args.size)
    print(f"scratch file {args.file} ({size / 2**30:.1f} GiB) ...", file=sys.stderr)
    costmodel.make_scratch(args.file, size)
    try:
        curve = costmodel.probe(
            args.file,
            chunks,
            threads,
            args.min_seconds,
            args.repeats,
            progress=lambda c, t, g: print(f"  {c >> 10:5d} KiB x {t:2d}: {g:.3f} GB/s", file=sys.stderr),
        )
    finally:
        if not args.keep:
            args.file.unlink(missing_ok=True)
    curve.save(args.out)
    print(f"# disk probe ({curve.meta['io_mode']}, {size / 2**30:.1f} GiB file, GB/s, median of {args.repeats})")
    print(curve.table())
    print(f"\nsequential (1 MiB requests, contiguous 1 GiB): {curve.sequential_gbps:.2f} GB/s")
    for rec in (16384, 32768, 65536):
        plan = costmodel.plan_io(curve, rec)
        print(
            f"plan for {rec >> 10} KiB reads: {plan.threads} threads, {plan.gbps:.2f} GB/s, gap {plan.gap_bytes >> 10} KiB"
        )
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
