#!/usr/bin/env python3
"""Per-token latency of a mixture-of-experts bundle's routed experts under a memory budget, mode by mode.

    python tools/bench_moe.py BUNDLE --memory 25% [--modes naive,mmap,flash] [--tokens 12] [--warmup 24]
                              [--trace synthetic|FILE] [--policy lru] [--json PATH]
    (tools/bench.py BUNDLE ... dispatches here for MoE bundles)

What is measured. Each mode runs in its own process. Per token and MoE layer the experts' input is a
fixed random vector (float32) and the routed experts come from the routing trace (--trace: the
synthetic generator of mlxflash.runtime.routing with the bundle family's profile, fitted to published
routing statistics of that family, or a trace recorded with tools/record_routing.py); the mode gets the experts'
weights (I/O) and computes them (mlx-lm's gather_mm / gather_qmm). Attention, router and LM head cost
the same in every mode: each process times layer 0's attention projections and router (times the
layers) plus the head, and the median of those over the modes is added to every mode.

Modes:
  naive  the routed experts read afresh every token, no cache (the runtime's naive mode: what a
         streaming engine without a cache does); direct reads, all in flight.
  mmap   ffn.bin through a plain memory map under a cgroup memory cap of the budget (+ --mmap-overhead);
         the routed experts are copied out of the map (page faults + copy = its I/O; the kernel's read
         bytes are /proc/self/io). This process loads no resident weights, so the whole cap is page cache
         (in its favour). Needs root and a cgroup memory controller; else skipped.
  flash  the runtime's flash mode (`mlxflash.load(..., mode="flash", memory=...)`): an expert cache
         per layer with the planner's slots and --policy; the cached experts compute while the
         missing ones are read.
  floor  (not in the default list) flash within the budget, but every token routed to experts it
         already holds (the first k): the same compute, no I/O. What no cache policy or disk can beat
         on this machine: attention, head and the experts' compute.
  resident  (not in the default list) every expert in DRAM, outside the budget: no I/O (the floor
         for a bundle that fits in RAM, and a check of `floor`).

Budget. --memory is a share of the model or a size. A synthetic bundle written with --layers N records
the real depth; the budget is resolved for the full model and scaled per layer (embeddings and head
counted once), so slots per layer match the full model's. The second table extrapolates to the real
depth (per-layer costs scaled, head once): labelled as extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from benchlib.isolation import GB, cgroup_cap, disk_read_bytes, parse_child, parse_modes, remove_cgroup

import mlxflash
from mlxflash.format.moe import MoEBundle
from mlxflash.runtime.costmodel import evict
from mlxflash.runtime.cpu import blas_in_use
from mlxflash.runtime.experts import ExpertSlots, switch_glu
from mlxflash.runtime.moe_plan import PROMPT_SHARE
from mlxflash.runtime.planner import parse_memory
from mlxflash.runtime.reader import SCRATCH_BYTES
from mlxflash.runtime.routing import PROFILES, generate_routing, profile_for, reuse_stats
from mlxflash.runtime.stats import current_rss_bytes, peak_rss_bytes
from mlxflash.runtime.traces import Trace, trace_layer

MODES = ("naive", "mmap", "flash", "floor", "resident")
DEFAULT_MODES = ("naive", "mmap", "flash")
RESULT_TAG = "BENCH-MOE-RESULT "
STATS_TOKENS = 256  # routing tokens the reuse statistics and policy hit rates are computed over


@dataclass
class MoEBudget:
    layers: int  # MoE layers in this bundle
    full_layers: int
    fixed_bytes: int  # outside the layers: embeddings, head, final norm
    layer_resident_bytes: float  # attention, norms, router per layer
    record_bytes: int
    experts: int
    model_bytes_full: float
    budget_full: float
    slots: int  # expert slots per layer the full budget allows
    budget: float  # this bundle's budget (the full one scaled per layer)


def resolve_budget(bundle: MoEBundle, memory: str, threads: int = 16) -> MoEBudget:
    spec = bundle.spec
    weights = bundle.resident_weights()  # lazy: shapes only
    in_layers = sum(v.nbytes for k, v in weights.items() if k.startswith("model.layers."))
    fixed = bundle.resident_bytes - in_layers  # the file's bytes, as the planner counts them
    layers, R, E = len(spec.layers), spec.record.nbytes, spec.num_experts
    full = max(layers, int(bundle.config.get("synthetic", {}).get("full_layers", layers)))
    per_res = in_layers / layers
    prompt = -(-E // PROMPT_SHARE) * R + threads * SCRATCH_BYTES  # the prompt slices, the readers' scratch
    model_full = fixed + full * (per_res + E * R)
    budget_full = parse_memory(memory, model_full)
    slots = int(min(E, max(0, (budget_full - fixed - prompt - full * per_res) // (full * R))))
    budget = fixed + prompt + layers * (per_res + slots * R)
    return MoEBudget(layers, full, fixed, per_res, R, E, model_full, budget_full, slots, budget)


@dataclass
class ModeResult:
    mode: str
    skipped: str = ""
    ms_per_token: float = 0.0  # experts' I/O + compute, plus the common attention figure
    io_ms: float = 0.0
    compute_ms: float = 0.0
    attention_ms: float = 0.0  # this process's own attention + router figure, all measured layers
    head_ms: float = 0.0  # this process's LM head figure
    experts_ms: float = 0.0  # the routed experts alone: I/O + their compute
    overhead_bytes: int = 0  # the runtime itself (Python, MLX, tokenizer) before the model: outside the budget
    experts_read_per_token: float = 0.0
    bytes_per_token: float = 0.0
    disk_bytes_per_token: float = 0.0
    hit_rate: float = 0.0
    slots: int = 0
    expected_hit_rate: float = 0.0
    planned_bytes: float = 0.0
    predicted_io_ms: float = 0.0  # the planner's cost-model figure for the expected bytes per token
    budget_bytes: float = 0.0
    peak_rss_bytes: int = 0
    io_mode: str = ""
    note: str = ""
    speedups: dict = field(default_factory=dict)
    full_depth_ms: float = 0.0


def load_trace(spec: str, bundle: MoEBundle, tokens: int, seed: int) -> Trace:
    s = bundle.spec
    if spec.startswith("synthetic"):  # "synthetic" (the bundle family's profile) or "synthetic:PROFILE"
        name = spec.partition(":")[2] or bundle.config.get("model_type")
        if name and ":" in spec and name not in PROFILES:
            raise SystemExit(f"--trace {spec}: unknown routing profile {name!r}; known: {', '.join(PROFILES)}")
        return generate_routing(s.num_experts, s.top_k, len(s.layers), tokens, profile_for(name), seed=seed)
    trace = Trace.load(spec)
    if trace.widths[0] != s.num_experts:
        raise SystemExit(f"{spec}: a trace of {trace.widths[0]} experts; this bundle has {s.num_experts}")
    return trace


def attention_seconds(model, bundle: MoEBundle, repeats: int = 3) -> tuple[float, float]:
    """Layer 0's attention (one token over a short cache) and router, times the layers, plus the head."""
    from mlx_lm.models.cache import make_prompt_cache

    layer, d = model.layers[bundle.spec.layers[0].layer], bundle.spec.hidden_size
    x = mx.random.normal((1, 1, d)) * 0.1
    cache = make_prompt_cache(model)[:1]
    mx.eval(layer.self_attn(x, None, cache[0]))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(layer.self_attn(x, None, cache[0]), layer.mlp.gate(x))
        times.append(time.perf_counter() - t0)
    head = model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear
    mx.eval(head(x))
    head_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(head(x))
        head_times.append(time.perf_counter() - t0)
    head_s = statistics.median(head_times)
    return statistics.median(times) * len(bundle.spec.layers), head_s


class RuntimeDriver:
    """naive and flash: the runtime's own StreamingExperts modules, fed the trace's routing."""

    def __init__(self, mode: str, bundle: MoEBundle, budget: MoEBudget, trace: Trace, args):
        memory = None if mode == "resident" else int(budget.budget)  # resident: the floor, outside the budget
        self.floor = mode == "floor"  # flash's cache, every routed expert one it already holds
        self.model, _ = mlxflash.load(
            bundle.path,
            mode="flash" if self.floor else mode,
            memory=memory,
            policy=args.policy,
            threads=args.threads,
            verify=False,
        )
        self.rt = self.model.flash
        self.modules = self.rt.experts
        self.counters = self.rt.reader.counters
        self.io_mode = self.rt.reader.io_note

    def layer(self, i: int, x: mx.array, ids: np.ndarray) -> mx.array:
        if self.floor:  # the same number of experts, always the first k: cached after the first token
            ids = np.arange(len(ids))
        y = self.modules[i](x, mx.array(ids.reshape(1, 1, -1)))
        mx.eval(y)
        return y

    def extra(self) -> dict:
        p = self.rt.plan
        return {
            "slots": p.slots,
            "expected_hit_rate": p.expected_hit_rate,
            "planned_bytes": p.planned_bytes,
            "predicted_io_ms": 1e3 * p.io_seconds_per_token,
        }


class MmapDriver:
    """ffn.bin through np.memmap; each token's routed experts copied out of the map into k slots."""

    def __init__(self, bundle: MoEBundle, budget: MoEBudget):
        self.spec = bundle.spec
        # The resident weights the other modes hold (embeddings, attention, router): the same DRAM here,
        # so the cap leaves mmap the page cache a real run would have.
        self.resident = np.ones(int(budget.fixed_bytes + budget.layers * budget.layer_resident_bytes), dtype=np.uint8)
        self.map = np.memmap(bundle.ffn_path, dtype=np.uint8, mode="r")
        self.slots = ExpertSlots(self.spec, self.spec.top_k)
        self.io_s = 0.0
        self.io_mode = "mmap (page cache, default read-ahead)"
        self.overhead = current_rss_bytes() - self.resident.nbytes - self.slots.nbytes

    def layer(self, i: int, x: mx.array, ids: np.ndarray) -> mx.array:
        spec, R = self.spec, self.spec.record.nbytes
        t0 = time.perf_counter()
        base = spec.layers[i].offset
        for slot, e in enumerate(ids.tolist()):
            for f in spec.record.fields:
                start = base + e * R + f.offset
                self.slots.fields_np[f.name][slot] = self.map[start : start + f.nbytes]
        self.io_s += time.perf_counter() - t0
        idx = mx.array(np.arange(len(ids), dtype=np.uint32).reshape(1, 1, -1))
        y = switch_glu(mx.expand_dims(x, (-2, -3)), self.slots.fields, idx, spec.quantization)
        mx.eval(y)
        return y

    def extra(self) -> dict:
        return {"slots": 0}


def run_mode(mode: str, args) -> ModeResult:
    bundle = MoEBundle.open(args.bundle, verify=False)
    budget = resolve_budget(bundle, args.memory, args.threads)
    trace = load_trace(args.trace, bundle, args.warmup + args.tokens, args.seed)
    driver = MmapDriver(bundle, budget) if mode == "mmap" else RuntimeDriver(mode, bundle, budget, trace, args)
    attn, head = attention_seconds(driver.model, bundle) if mode != "mmap" else (0.0, 0.0)
    x = (mx.random.normal((1, 1, bundle.spec.hidden_size), key=mx.random.key(args.seed)) * 0.1).astype(mx.float32)
    layers = len(bundle.spec.layers)
    totals, ios, reads, disk = [], [], [], []
    hits = misses = 0
    for t in range(args.warmup + args.tokens):
        if t == args.warmup and mode != "mmap":  # the hit rate of the timed tokens only
            hits, misses = _hits(driver.rt)
        io0 = driver.counters.seconds if mode != "mmap" else driver.io_s
        b0 = driver.counters.bytes_read if mode != "mmap" else 0
        d0 = disk_read_bytes() or 0
        t0 = time.perf_counter()
        for i in range(layers):
            ids = trace.token(trace_layer(i, layers, trace.num_layers), t % trace.num_tokens)
            driver.layer(i, x, ids)
        total = time.perf_counter() - t0
        if t < args.warmup:
            continue
        io = (driver.counters.seconds if mode != "mmap" else driver.io_s) - io0
        totals.append(total)
        ios.append(io)
        disk.append((disk_read_bytes() or 0) - d0)
        reads.append(
            driver.counters.bytes_read - b0 if mode != "mmap" else layers * bundle.spec.top_k * budget.record_bytes
        )
    med = statistics.median
    r = ModeResult(mode, io_mode=driver.io_mode, attention_ms=1e3 * attn, head_ms=1e3 * head, **driver.extra())
    r.io_ms, r.compute_ms = 1e3 * med(ios), 1e3 * (med(totals) - med(ios))
    r.ms_per_token = r.experts_ms = 1e3 * med(totals)
    r.bytes_per_token, r.disk_bytes_per_token = med(reads), med(disk)
    r.experts_read_per_token = r.bytes_per_token / budget.record_bytes
    if mode != "mmap":
        h, m = _hits(driver.rt)
        r.hit_rate = (h - hits) / max(1, h - hits + m - misses)
    r.peak_rss_bytes, r.budget_bytes = peak_rss_bytes(), budget.budget
    r.overhead_bytes = driver.rt.fixed_overhead_bytes if mode != "mmap" else driver.overhead
    return r


def _hits(rt) -> tuple[int, int]:
    return sum(m._index.hits for m in rt.experts), sum(m._index.misses for m in rt.experts)


# ---- the parent ----


def child(mode: str, args, budget: MoEBudget) -> ModeResult:
    evict(Path(args.bundle) / "ffn.bin")
    procs, how = None, ""
    if mode == "mmap":
        procs, how = cgroup_cap(int(budget.budget + args.mmap_overhead))
        if procs is None:
            return ModeResult(mode, skipped=how)
    cmd = [sys.executable, __file__, str(args.bundle), "--memory", args.memory, "--child", mode]
    cmd += ["--tokens", str(args.tokens), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    cmd += ["--trace", args.trace, "--seed", str(args.seed), "--policy", args.policy]
    try:
        preexec = (lambda: procs.write_text(str(os.getpid()))) if procs else None
        p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=preexec)
    finally:
        remove_cgroup(procs)
    return parse_child(mode, p, how, result=ModeResult, tag=RESULT_TAG)


def finish(results: list[ModeResult], budget: MoEBudget) -> tuple[float, float]:
    """Common attention and head figures added to every mode; speedups; the full-depth extrapolation
    (per-layer costs x full_layers / layers, the head once)."""
    done = [r for r in results if not r.skipped]
    attn = statistics.median([r.attention_ms for r in done if r.attention_ms] or [0.0])
    head = statistics.median([r.head_ms for r in done if r.head_ms] or [0.0])
    scale = budget.full_layers / budget.layers
    for r in done:
        r.ms_per_token = r.experts_ms + attn + head
        r.compute_ms += attn + head
        r.full_depth_ms = (r.experts_ms + attn) * scale + head
    by_mode = {r.mode: r for r in done}
    for r in done:
        r.speedups = {f"vs {m}": o.ms_per_token / r.ms_per_token for m, o in by_mode.items() if m != r.mode}
        r.speedups.update(
            {f"experts only vs {m}": o.experts_ms / r.experts_ms for m, o in by_mode.items() if m != r.mode}
        )
        r.speedups.update(
            {
                f"{budget.full_layers} layers vs {m}": o.full_depth_ms / r.full_depth_ms
                for m, o in by_mode.items()
                if m != r.mode
            }
        )
    return attn, head


def table(results: list[ModeResult], budget: MoEBudget) -> str:
    head = (
        "| mode | ms/token | I/O ms | predicted I/O ms | compute ms | experts read/token | MB read/token | "
        "disk MB/token | hit rate | expected hit rate | slots/layer | peak RSS GB (budget; runtime overhead) |"
    )
    rows = [head, "|" + "---|" * 12]
    for r in results:
        if r.skipped:
            rows.append(f"| {r.mode} | skipped: {r.skipped} |" + " |" * 10)
            continue
        rows.append(
            f"| {r.mode} | {r.ms_per_token:.0f} | {r.io_ms:.0f} | {r.predicted_io_ms:.0f} | {r.compute_ms:.0f} | "
            f"{r.experts_read_per_token:.1f} | {r.bytes_per_token / 1e6:.0f} | {r.disk_bytes_per_token / 1e6:.0f} | "
            f"{r.hit_rate:.2f} | {r.expected_hit_rate:.2f} | {r.slots} | "
            f"{r.peak_rss_bytes / GB:.2f} ({r.budget_bytes / GB:.2f}; {r.overhead_bytes / GB:.2f}) |"
        )
    return "\n".join(rows)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--memory", default="25%")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma list of " + ", ".join(MODES))
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--warmup", type=int, default=24, help="tokens before timing: the expert caches fill")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--policy", default="lru", choices=["lru", "lfu"])
    p.add_argument(
        "--trace",
        default="synthetic",
        help="'synthetic' (the routing generator, the bundle family's profile), 'synthetic:PROFILE' "
        f"({', '.join(PROFILES)}) or a routing trace .npz",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mmap-overhead", type=float, default=256 * 2**20, help="bytes added to the mmap cap")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(asdict(run_mode(args.child, args))), flush=True)
        return 0
    modes = parse_modes(args.modes, MODES)
    bundle = MoEBundle.open(args.bundle, verify=False)
    budget = resolve_budget(bundle, args.memory, args.threads)
    trace = load_trace(args.trace, bundle, max(STATS_TOKENS, args.warmup + args.tokens), args.seed)
    slot_grid = sorted({1, bundle.spec.top_k, max(1, budget.slots), 2 * max(1, budget.slots), budget.experts // 2})
    reuse = reuse_stats(trace, [s for s in slot_grid if s <= budget.experts])
    results = []
    for mode in modes:
        print(f"{mode}: running", file=sys.stderr, flush=True)
        results.append(child(mode, args, budget))
    attn, head = finish(results, budget)
    spec = bundle.spec
    print(
        f"MoE bench: {args.bundle} ({spec.num_experts} experts, {spec.top_k} routed, d={spec.hidden_size}, expert FFN "
        f"{spec.expert_size}, {spec.dtype}{', ' + str(spec.quantization['gate']['bits']) + '-bit' if spec.quantization else ''}), "
        f"{budget.layers} of {budget.full_layers} layers measured\n"
        f"budget {args.memory} of the full {budget.model_bytes_full / GB:.1f} GB model = {budget.budget_full / GB:.2f} GB -> "
        f"{budget.slots} of {spec.num_experts} expert slots per layer; this bundle's share {budget.budget / GB:.2f} GB\n"
        f"tokens {args.tokens} (+{args.warmup} warm-up), medians; BLAS {blas_in_use()}; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; common attention+router {attn:.0f} ms and LM head {head:.0f} ms added to every mode\n"
        f"trace {trace.meta.get('source', args.trace)} ({reuse['tokens']} tokens x {reuse['layers']} layers): reuse from the previous token {reuse['reuse_prev']:.2f} of its "
        f"experts, from the previous 8 {reuse['reuse_within8']:.2f}, shares >= 1 expert {reuse['share_any']:.2f}; hit rates by slots: "
        + "; ".join(f"{p} " + ", ".join(f"{s}: {h:.2f}" for s, h in hr.items()) for p, hr in reuse["hit_rate"].items())
    )
    print("\n" + table(results, budget))
    print("\nspeedups (ms per token of the other mode / this one's):")
    for r in results:
        if not r.skipped:
            print(f"- {r.mode}: " + ", ".join(f"{v:.2f}x {k}" for k, v in r.speedups.items()))
    if budget.full_layers != budget.layers:
        print(
            f"\nextrapolated to {budget.full_layers} layers (per-layer costs x {budget.full_layers / budget.layers:.1f}):"
        )
        print(", ".join(f"{r.mode} {r.full_depth_ms / 1e3:.2f} s/token" for r in results if not r.skipped))
    for r in results:
        if r.note:
            print(f"- {r.mode}: {r.note}")
    if args.json:
        out = {
            "budget": asdict(budget),
            "trace": reuse,
            "load_average": os.getloadavg(),
            "modes": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
