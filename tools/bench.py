#!/usr/bin/env python3
"""Per-token FFN latency of a bundle under a memory budget, mode by mode (the paper's Tables 2 and 3).

    python tools/bench.py BUNDLE --memory 50% [--modes naive,hybrid,mmap,flash,...] [--tokens 10]
                          [--warmup 2] [--trace paper|FILE] [--json PATH] [--plot PATH]

What is measured. Each mode runs in its own process (so DRAM and peak RSS are its own) and drives
the FFN layer by layer: per token and layer, the FFN input is a fixed random vector (the same in
every mode; in the bundle's dtype for float bundles, as mlx-lm runs a model in its weights' dtype,
float32 for quantized ones, MLX's fast CPU path for quantized_matmul; see `activation_dtype`), the mode fetches what it needs (I/O), prepares it (memory management) and
computes the FFN (compute). Attention, norms and the LM head cost the same in every mode: their
projections are timed in each mode's process (layer 0's, times the number of layers, plus the head;
medians of 5), and the median of those figures over the modes is added to every mode's compute, so
ratios do not depend on when each process timed them; the score/softmax over a short KV cache is left out. Tokens: --warmup, then --tokens
measured; each column is the median over the measured tokens (total: the median of the totals).

Modes:
  naive     every layer's whole FFN block read at every token, large sequential direct reads
            (about 1 MiB per request, shared by --threads). Float bundles whose record fields are
            whole pages are read with preadv iovecs that scatter each record's gate/up/down into
            contiguous matrices, so the dense layout costs no copy (memory management 0, as the
            paper's naive); otherwise the block lands in one buffer and is viewed (a copy, counted
            as memory management, as mlxflash's own naive mode does). Dense compute.
  hybrid    the FFN DRAM the budget allows is filled with each layer's first neurons (resident);
            the rest of each layer is read at every token like naive.
  mmap      ffn.bin through a plain memory map (OS page cache, default read-ahead) under a cgroup
            memory cap of the budget (+ --mmap-overhead for the interpreter); each layer's records
            are copied out of the map into the dense layout (page faults + copy = its I/O; the
            bytes the kernel really read, /proc/self/io, are its flash->DRAM bytes); dense compute.
            Needs a writable cgroup v1 memory controller or cgroup v2 memory.max (root); else skipped.
  resident  the whole FFN in DRAM (only when the model fits the budget).
  flash, flash-predictor, flash-window, flash-bundle
            the runtime's flash mode (`mlxflash.load(..., mode="flash")`) with a TraceSelector
            replaying --trace: predictor only (window 1, no bundling, no coalescing; the runtime has
            no window 0, so the previous token's neurons are still reused); + windowing (the
            runtime's window for the budget); + bundling; flash = all of them + coalescing (gap from
            the cost model).

Budget. --memory is a size (4GB, 6GiB) or a percentage of the model. A synthetic bundle written with
--layers N < the real depth records the real depth (config "synthetic.full_layers"); the budget is
then resolved for the full-depth model and scaled per layer (embeddings, head and one layer's block,
the prompt/streaming buffer, counted once), so per-layer numbers match the full model's, and a
second table extrapolates every mode to the real depth (head once, per-layer costs scaled).

Predicted I/O: the cost model (mlxflash.runtime.costmodel, the stored disk probe or the reference curve):
naive and hybrid stream contiguous ranges, predicted at the probe's sequential figure; flash at the
random-read curve for its mean read size and thread count. Read GB/s is bytes per token / I/O time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxflash.arch.activations import ACTIVATIONS
from mlxflash.errors import UsageError
from mlxflash.format.bundle import Bundle, dtype_name, mx_dtype
from mlxflash.format.quant import transpose_packed
from mlxflash.runtime import costmodel
from mlxflash.runtime.planner import parse_memory
from mlxflash.runtime.reader import FlashReader, aligned_buffer

BASELINES = ("naive", "hybrid", "mmap", "resident")
# mode -> mlxflash.load options. window None: the runtime picks it from the budget; gap -1: no
# coalescing, "auto": the cost model's read-through gap (mlxflash.runtime.costmodel.plan_io) in records.
FLASH_MODES = {
    "flash-predictor": {"window": 0, "bundled": False, "gap": -1},
    "flash-window": {"window": None, "bundled": False, "gap": -1},
    "flash-bundle": {"window": None, "bundled": True, "gap": -1},
    "flash": {"window": None, "bundled": True, "gap": "auto"},
}
ALL_MODES = ("naive", "hybrid", "mmap", "flash-predictor", "flash-window", "flash-bundle", "flash", "resident")
RESULT_TAG = "BENCH-RESULT "
GB = 1e9


# ---- budget ----


@dataclass
class Budget:
    layers: int  # in this bundle
    full_layers: int  # of the real model (the budget is resolved at this depth)
    fixed_bytes: int  # resident bytes outside the layers (embeddings, head, final norm)
    once_bytes: int  # one layer's FFN block: the prompt/streaming buffer every mode holds once
    layer_resident_bytes: float  # attention, norms, predictors, biases: per layer
    layer_ffn_bytes: float
    model_bytes_full: float
    budget_full: float
    ffn_allowance: float  # FFN DRAM per layer the budget leaves
    budget: float  # this bundle's budget (the full one scaled per layer)

    @property
    def model_bytes(self) -> float:
        return self.fixed_bytes + self.layers * (self.layer_resident_bytes + self.layer_ffn_bytes)


def resolve_budget(bundle: Bundle, memory: str) -> Budget:
    weights = bundle.resident_weights()  # lazy: only shapes are read
    layers = bundle.num_layers
    in_layers = sum(v.nbytes for k, v in weights.items() if k.startswith("model.layers."))
    fixed = sum(v.nbytes for k, v in weights.items()) - in_layers
    full = max(layers, int(bundle.config.get("synthetic", {}).get("full_layers", layers)))
    per_res, per_ffn = in_layers / layers, bundle.spec.ffn_bytes / layers
    once = max(bundle.spec.block_bytes(i) for i in range(layers))
    model_full = fixed + full * (per_res + per_ffn)
    budget_full = parse_memory(memory, model_full)
    allowance = max(0.0, (budget_full - fixed - once - full * per_res) / full)
    budget = min(budget_full, fixed + once + layers * (per_res + allowance))
    return Budget(layers, full, fixed, once, per_res, per_ffn, model_full, budget_full, allowance, budget)


# ---- the machine ----


def blas_in_use() -> str:
    """The BLAS MLX's matrix products resolve to: an LD_PRELOADed library wins over MLX's own."""
    mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split() if re.search(r"blas", p, re.I)]
    if preload:
        return f"{preload[0]} (LD_PRELOAD)"
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    mlx_libs = {Path(line.split()[-1]).name for line in maps.splitlines() if "/mlx" in line and "blas" in line.lower()}
    return ", ".join(sorted(mlx_libs)) + " (bundled with MLX; reference BLAS)" if mlx_libs else "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(bundle: Bundle, curve: costmodel.DiskCurve, io_mode: str) -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "ram_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": blas_in_use(),
        "dtype": bundle.spec.dtype,
        "quantization": bundle.spec.quantization,
        "activations": dtype_name(activation_dtype(bundle)),
        "io_mode": io_mode,
        "disk_curve": curve.meta.get("source", ""),
        "disk_sequential_gbps": curve.sequential_gbps,
    }


# ---- FFN math on records (the operations of mlxflash.runtime.ffn.FFN.dense, on a neuron range) ----


class LayerMath:
    """Dense FFN of neurons [lo, hi) of one layer, from records (hi - lo, R) uint8."""

    def __init__(self, bundle: Bundle, layer: int, resident: dict[str, mx.array]):
        self.spec, self.q = bundle.spec, bundle.spec.quantization
        p = f"model.layers.{layer}.mlp."
        self.up_bias, self.down_bias = resident.get(p + "up_bias"), resident.get(p + "down_bias")
        self.down_scales, self.down_biases = resident.get(p + "down_scales"), resident.get(p + "down_biases")
        self.act = ACTIVATIONS[self.spec.activation]

    def weights(self, records: mx.array) -> dict[str, mx.array]:
        """Views of the record fields; a quantized down projection is transposed back (d, m*bits/32)."""
        layout = self.spec.record
        w = {name: layout.view(records, name) for name in layout.names()}
        if self.q:
            w["down.weight"] = transpose_packed(w["down.weight"], self.q["down"]["bits"])
        return w

    def _proj(self, x: mx.array, w: dict, name: str) -> mx.array:
        if not self.q:
            return x @ w[f"{name}.weight"].T
        q = self.q[name]
        return mx.quantized_matmul(
            x, w[f"{name}.weight"], w[f"{name}.scales"], w[f"{name}.biases"], transpose=True, **q
        )

    def __call__(self, x: mx.array, w: dict, lo: int, hi: int) -> mx.array:
        up = self._proj(x, w, "up")
        if self.up_bias is not None:
            up = up + self.up_bias[lo:hi]
        elif "up.bias" in w:
            up = up + w["up.bias"][:, 0]
        h = self.act(self._proj(x, w, "gate")) * up if self.spec.gated else self.act(up)
        if self.q:
            g = self.q["down"]["group_size"]
            s, b = self.down_scales[:, lo // g : hi // g], self.down_biases[:, lo // g : hi // g]
            y = mx.quantized_matmul(h, w["down.weight"], s, b, transpose=True, **self.q["down"])
        else:
            y = h @ w["down.weight"]
        if self.down_bias is not None and lo == 0:
            y = y + self.down_bias
        return y


# ---- per-token timing ----


@dataclass
class Clock:
    io: float = 0.0
    mem: float = 0.0
    compute: float = 0.0
    bytes: int = 0
    reads: int = 0


def timed(clock: Clock, part: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    setattr(clock, part, getattr(clock, part) + time.perf_counter() - t0)
    return out


def _eval(tree):
    mx.eval(tree)
    return tree


class Streamer:
    """Reads neuron ranges of layer blocks into one reused aligned buffer (large direct requests)."""

    def __init__(self, bundle: Bundle, threads: int, largest: int):
        self.bundle, self.reader = bundle, FlashReader(bundle.ffn_path, threads=threads)
        self.buf, self.view = aligned_buffer(max(largest, 1))

    def read(self, layer: int, lo: int, hi: int, clock: Clock) -> mx.array:
        spec = self.bundle.spec
        R = spec.record.nbytes
        n = (hi - lo) * R
        before = self.reader.counters.reads
        timed(clock, "io", self.reader.read, [(spec.layers[layer].offset + lo * R, self.view[:n])])
        clock.bytes += n
        clock.reads += self.reader.counters.reads - before
        return self.buf[:n].reshape(hi - lo, R)


def scatter_ok(layout) -> bool:
    """Records are their fields back to back, each a whole number of 4 KiB pages (float bundles)."""
    offsets = [f.offset for f in layout.fields]
    ends = [f.offset + f.nbytes for f in layout.fields]
    pages = all(f.offset % 4096 == 0 and f.nbytes % 4096 == 0 for f in layout.fields)
    return pages and offsets[0] == 0 and offsets[1:] == ends[:-1] and ends[-1] == layout.nbytes


class FieldBuffers:
    """Per record field, one contiguous aligned matrix (rows, count): MLX array + numpy bytes, shared."""

    def __init__(self, layout, rows: int):
        self.mx, self.np = {}, {}
        for f in layout.fields:
            buf, view = aligned_buffer(max(rows * f.nbytes, 1))
            self.mx[f.name] = _eval(buf.view(mx_dtype(f.dtype)).reshape(rows, f.count))
            self.np[f.name] = view.reshape(rows, f.nbytes)
        self.nbytes = rows * layout.nbytes

    def weights(self, m: int) -> dict[str, mx.array]:
        return {name: a[:m] for name, a in self.mx.items()}


class ScatterStreamer:
    """Reads record ranges with one preadv per ~1 MiB whose iovecs scatter each record's fields into
    FieldBuffers: the dense layout arrives with no copy (the naive baseline at the disk's best)."""

    def __init__(self, bundle: Bundle, threads: int, rows: int):
        self.bundle, self.layout = bundle, bundle.spec.record
        self.reader = FlashReader(bundle.ffn_path, threads=threads)  # opens O_DIRECT (or says why not)
        self.fields = FieldBuffers(self.layout, rows)
        self.pool = ThreadPoolExecutor(threads)
        self.per_request = max(1, min((1 << 20) // self.layout.nbytes, 1000 // len(self.layout.fields)))

    def read(self, layer: int, lo: int, hi: int, clock: Clock) -> dict[str, mx.array]:
        R, base = self.layout.nbytes, self.bundle.spec.layers[layer].offset
        requests = [(a, min(a + self.per_request, hi - lo)) for a in range(0, hi - lo, self.per_request)]
        threads = self.reader.threads
        batches = [requests[i::threads] for i in range(min(threads, len(requests)))]
        start = base + lo * R
        timed(clock, "io", lambda: list(self.pool.map(lambda b: self._batch(start, b), batches)))
        clock.bytes += (hi - lo) * R
        clock.reads += len(requests)
        return self.fields.weights(hi - lo)

    def _batch(self, start: int, batch: list[tuple[int, int]]) -> None:
        names = [f.name for f in self.layout.fields]
        R = self.layout.nbytes
        for a, b in batch:
            iov = [self.fields.np[name][i] for i in range(a, b) for name in names]
            got = os.preadv(self.reader.fd, iov, start + a * R)
            if got != (b - a) * R:
                raise OSError(f"short read: {got} of {(b - a) * R} bytes")

    @property
    def io_note(self) -> str:
        return self.reader.io_note + ", fields scattered by preadv"


class BaselineDriver:
    """naive, hybrid and resident: `keep[l]` neurons of layer l resident, the rest streamed."""

    def __init__(self, bundle: Bundle, resident: dict, keep: list[int], threads: int):
        self.bundle, spec = bundle, bundle.spec
        self.math = [LayerMath(bundle, i, resident) for i in range(bundle.num_layers)]
        self.keep = keep
        R = spec.record.nbytes
        rest = [spec.layers[i].neurons - k for i, k in enumerate(keep)]
        self.streamer = None
        if max(rest) > 0:
            scatter = scatter_ok(spec.record)
            self.streamer = (
                ScatterStreamer(bundle, threads, max(rest)) if scatter else Streamer(bundle, threads, max(rest) * R)
            )
        self.held = [self._load_resident(i, k) for i, k in enumerate(keep)]
        self.dram_ffn = sum(k * R for k in keep) + (max(rest) * R if max(rest) > 0 else 0)

    def _load_resident(self, layer: int, k: int):
        if k == 0:
            return None
        R = self.bundle.spec.record.nbytes
        buf, view = aligned_buffer(k * R)
        reader = FlashReader(self.bundle.ffn_path, threads=8)
        reader.read([(self.bundle.spec.layers[layer].offset, view)])
        reader.close()
        return _eval(self.math[layer].weights(buf.reshape(k, R)))  # prepared once: no per-token cost

    def layer(self, i: int, x: mx.array, clock: Clock) -> mx.array:
        n, k, m = self.bundle.spec.layers[i].neurons, self.keep[i], self.math[i]
        y = timed(clock, "compute", lambda: _eval(m(x, self.held[i], 0, k))) if k else None
        if k < n and isinstance(self.streamer, ScatterStreamer):
            w = self.streamer.read(i, k, n, clock)  # already in the dense layout: no memory management
        elif k < n:
            records = self.streamer.read(i, k, n, clock)
            w = timed(clock, "mem", lambda: _eval(m.weights(records)))
        if k < n:
            part = timed(clock, "compute", lambda: _eval(m(x, w, k, n)))
            y = part if y is None else timed(clock, "compute", lambda: _eval(y + part))
        return y

    def io_note(self) -> str:
        if isinstance(self.streamer, ScatterStreamer):
            return self.streamer.io_note
        return self.streamer.reader.io_note if self.streamer else "none (all resident)"

    def threads(self) -> int:
        return self.streamer.reader.threads if self.streamer else 0


class MmapDriver:
    """ffn.bin through np.memmap: each layer's block copied out of the map into the dense layout
    (the page faults and the copy are its I/O; float bundles need no further preparation)."""

    def __init__(self, bundle: Bundle, resident: dict):
        self.bundle, spec = bundle, bundle.spec
        self.map = np.memmap(bundle.ffn_path, dtype=np.uint8, mode="r")
        self.math = [LayerMath(bundle, i, resident) for i in range(bundle.num_layers)]
        self.fields = FieldBuffers(spec.record, max(b.neurons for b in spec.layers))
        self.dram_ffn = self.fields.nbytes

    def _copy(self, layer: int) -> None:
        spec = self.bundle.spec
        n, R = spec.layers[layer].neurons, spec.record.nbytes
        records = self.map[spec.layers[layer].offset : spec.layers[layer].offset + n * R].reshape(n, R)
        for f in spec.record.fields:
            np.copyto(self.fields.np[f.name][:n], records[:, f.offset : f.offset + f.nbytes])

    def layer(self, i: int, x: mx.array, clock: Clock) -> mx.array:
        n = self.bundle.spec.layers[i].neurons
        timed(clock, "io", self._copy, i)
        clock.bytes += n * self.bundle.spec.record.nbytes
        w = self.fields.weights(n)
        if self.bundle.spec.quantization:  # the packed down projection is transposed back
            w = timed(clock, "mem", lambda: _eval({**w, "down.weight": _down_t(w, self.bundle.spec.quantization)}))
        return timed(clock, "compute", lambda: _eval(self.math[i](x, w, 0, n)))

    def io_note(self) -> str:
        return "mmap (page cache, default read-ahead)"

    def threads(self) -> int:
        return 1


def _down_t(w: dict, q: dict) -> mx.array:
    return transpose_packed(w["down.weight"], q["down"]["bits"])


def flash_options(options: dict, bundle: Bundle, curve, threads: int) -> dict:
    """The mode's options as the runtime's load_model takes them (refusing what it does not know)."""
    import inspect

    from mlxflash.runtime.model import load_model

    known = inspect.signature(load_model).parameters
    out = {}
    for key, value in options.items():
        if key not in known:
            raise RuntimeError(f"the runtime's load_model has no option {key!r} (needed by this ablation)")
        if value == "auto":  # the cost model's gap, in records
            R = bundle.spec.record.nbytes
            value = costmodel.plan_io(curve, R, max_threads=threads).gap_bytes // R
        if value is not None:
            out[key] = value
    return out


class FlashDriver:
    """The runtime's flash mode; its FFN modules are called layer by layer with the same inputs."""

    def __init__(self, bundle: Bundle, budget: float, options: dict, trace, threads: int, curve):
        import mlxflash
        from mlxflash.runtime.traces import TraceSelector

        widths = [b.neurons for b in bundle.spec.layers]
        self.selector = TraceSelector(trace, num_layers=bundle.num_layers, width=widths)
        kwargs = flash_options(options, bundle, curve, threads)
        self.note = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        self.model, _ = mlxflash.load(
            bundle.path, mode="flash", memory=int(budget), selector=self.selector, threads=threads, **kwargs
        )
        self.flash = self.model.flash
        self.layers = self.model.model.layers

    def _snap(self) -> dict:
        s = self.flash.stats.snapshot()
        if isinstance(s, dict):
            return s
        return dict(zip(("io_s", "mem_s", "bytes_read", "bytes_transferred"), s))

    def layer(self, i: int, x: mx.array, clock: Clock) -> mx.array:
        before = self._snap()
        t0 = time.perf_counter()
        y = _eval(self.layers[i].mlp(x[None]))  # (1, 1, d): a batch of one token
        wall = time.perf_counter() - t0
        after = self._snap()
        io, mem = after["io_s"] - before["io_s"], after["mem_s"] - before["mem_s"]
        clock.io += io
        clock.mem += mem
        clock.compute += wall - io - mem
        clock.bytes += after["bytes_read"] - before["bytes_read"]
        clock.reads += after.get("reads", 0) - before.get("reads", 0)
        return y

    def dram_bytes(self) -> int:
        plan = getattr(self.flash, "plan", None)
        return int(getattr(plan, "planned_bytes", 0) or self.flash.resident_bytes)

    def extra(self) -> dict:
        live = self.flash.live() if hasattr(self.flash, "live") else {}
        return {k: v for k, v in live.items() if isinstance(v, (int, float, str))}

    def io_note(self) -> str:
        return self.flash.reader.io_note

    def threads(self) -> int:
        return self.flash.reader.threads


# ---- attention (measured once) ----


def activation_dtype(bundle: Bundle) -> mx.Dtype:
    """Float bundles: their dtype (no converted copy of every weight per product); quantized: float32."""
    return mx.float32 if bundle.spec.quantization else mx_dtype(bundle.spec.dtype)


def _matvec(x: mx.array, resident: dict, weight: str) -> mx.array:
    base = weight.removesuffix(".weight")
    w = resident[weight]
    if base + ".scales" not in resident:
        return x @ w.T
    scales, biases = resident[base + ".scales"], resident[base + ".biases"]
    group = x.shape[-1] // scales.shape[-1]
    bits = w.shape[-1] * 32 // x.shape[-1]
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group, bits=bits)


def attention_seconds(bundle: Bundle, resident: dict, repeats: int = 5) -> tuple[float, float]:
    """(one layer's attention projections, the LM head): layer 0's, one token."""
    d = bundle.spec.hidden_size
    x = mx.random.normal((1, d), key=mx.random.key(1)).astype(activation_dtype(bundle))
    names = [k for k in resident if k.startswith("model.layers.0.self_attn.") and k.endswith(".weight")]
    head = "lm_head.weight" if "lm_head.weight" in resident else "model.embed_tokens.weight"

    def once(mats: list[str]) -> float:
        t0 = time.perf_counter()
        _eval([_matvec(x, resident, k) for k in mats])
        return time.perf_counter() - t0

    once(names + [head])
    layer = statistics.median(once(names) for _ in range(repeats))
    return layer, statistics.median(once([head]) for _ in range(repeats))


# ---- one mode, in its own process ----


@dataclass
class ModeResult:
    mode: str
    dram_bytes: float = 0.0
    bytes_per_token: float = 0.0
    read_gbps: float = 0.0
    io_ms: float = 0.0
    mem_ms: float = 0.0
    compute_ms: float = 0.0
    total_ms: float = 0.0
    speedup_vs_naive: float | None = None
    speedup_vs_hybrid: float | None = None
    predicted_io_ms: float = 0.0
    reads_per_token: float = 0.0
    disk_bytes_per_token: float | None = None  # /proc/self/io read_bytes: what the kernel read
    peak_rss_bytes: int = 0
    attention_ms: float = 0.0
    io_mode: str = ""
    threads: int = 0
    note: str = ""
    skipped: str | None = None
    extra: dict = field(default_factory=dict)


def disk_read_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def hybrid_keep(bundle: Bundle, budget: Budget) -> list[int]:
    """Per layer, the neurons the FFN allowance holds (whole quantization groups)."""
    R = bundle.spec.record.nbytes
    q = bundle.spec.quantization
    g = q["down"]["group_size"] if q else 1
    k = int(budget.ffn_allowance // R) // g * g
    return [min(k, b.neurons) for b in bundle.spec.layers]


def make_driver(mode: str, bundle: Bundle, budget: Budget, args) -> tuple[object, dict]:
    """(driver, the resident weights it holds): flash modes hold the runtime's, the others load them."""
    if mode.startswith("flash"):
        curve = costmodel.DiskCurve.load_or_default(args.curve)
        trace = load_trace(args.trace, bundle, args)
        driver = FlashDriver(bundle, budget.budget, FLASH_MODES[mode], trace, args.threads, curve)
        return driver, dict(tree_flatten(driver.model.parameters()))
    resident = bundle.resident_weights()
    mx.eval(resident)  # the resident part really is in DRAM, as in the runtime
    return baseline_driver(mode, bundle, resident, budget, args), resident


def baseline_driver(mode: str, bundle: Bundle, resident: dict, budget: Budget, args) -> object:
    full = [b.neurons for b in bundle.spec.layers]
    if mode == "naive":
        return BaselineDriver(bundle, resident, [0] * len(full), args.threads)
    if mode == "hybrid":
        return BaselineDriver(bundle, resident, hybrid_keep(bundle, budget), args.threads)
    if mode == "resident":
        return BaselineDriver(bundle, resident, full, args.threads)
    return MmapDriver(bundle, resident)


def load_trace(spec: str, bundle: Bundle, args):
    from mlxflash.runtime import traces

    if spec == "paper":
        widths = [b.neurons for b in bundle.spec.layers]
        return traces.generate_trace(widths, args.warmup + args.tokens + 8, seed=args.seed)
    return traces.Trace.load(spec)


def run_mode(mode: str, args) -> ModeResult:
    """Measure one mode in this process."""
    bundle = Bundle.open(args.bundle, verify=False)
    budget = resolve_budget(bundle, args.memory)
    driver, resident = make_driver(mode, bundle, budget, args)
    d = bundle.spec.hidden_size
    dtype = activation_dtype(bundle)
    xs = [mx.random.normal((1, d), key=mx.random.key(100 + i)).astype(dtype) for i in range(bundle.num_layers)]
    mx.eval(xs)
    attn_layer, head = attention_seconds(bundle, resident)
    attn = attn_layer * bundle.num_layers + head
    clocks, totals = [], []
    disk0 = None
    for t in range(args.warmup + args.tokens):
        if t == args.warmup:
            disk0 = disk_read_bytes()
        clock = Clock()
        t0 = time.perf_counter()
        for i in range(bundle.num_layers):
            driver.layer(i, xs[i], clock)
        if t >= args.warmup:
            clocks.append(clock)
            totals.append(time.perf_counter() - t0 + attn)
    disk1 = disk_read_bytes()
    r = summarize(mode, driver, clocks, totals, attn, bundle, budget, args, disk0, disk1)
    r.extra["attention_layer_ms"], r.extra["head_ms"] = 1e3 * attn_layer, 1e3 * head
    return r


def summarize(mode, driver, clocks, totals, attn, bundle, budget, args, disk0, disk1) -> ModeResult:
    from mlxflash.runtime.stats import peak_rss_bytes

    def med(key):
        return statistics.median(getattr(c, key) for c in clocks)

    io, nbytes, reads = med("io"), med("bytes"), med("reads")
    curve = costmodel.DiskCurve.load_or_default(args.curve)
    chunk = nbytes / reads if reads else nbytes
    threads = driver.threads()
    r = ModeResult(mode)
    r.io_ms, r.mem_ms, r.compute_ms = 1e3 * io, 1e3 * med("mem"), 1e3 * (med("compute") + attn)
    r.total_ms = 1e3 * statistics.median(totals)
    r.bytes_per_token, r.reads_per_token = nbytes, reads
    r.read_gbps = nbytes / io / GB if io > 0 else 0.0
    r.predicted_io_ms = 1e3 * predicted_io(driver, nbytes, chunk, threads, curve) if mode != "mmap" else 0.0
    if disk0 is not None and disk1 is not None:
        r.disk_bytes_per_token = (disk1 - disk0) / len(clocks)
    r.peak_rss_bytes, r.attention_ms = peak_rss_bytes(), 1e3 * attn
    r.io_mode, r.threads = driver.io_note(), threads
    r.dram_bytes = dram_bytes(mode, driver, bundle, budget, args)
    if mode == "mmap" and r.disk_bytes_per_token is not None:  # what the page cache really read
        r.bytes_per_token = r.disk_bytes_per_token
        r.read_gbps = r.bytes_per_token / io / GB if io > 0 else 0.0
    r.note = getattr(driver, "note", "")
    r.extra = driver.extra() if hasattr(driver, "extra") else {}
    r.extra["peak_rss_bytes"] = r.peak_rss_bytes
    return r


def predicted_io(driver, nbytes: float, chunk: float, threads: int, curve: costmodel.DiskCurve) -> float:
    """Seconds the cost model expects: contiguous streaming (naive, hybrid) at the probe's sequential
    figure, scattered reads at the random-read curve for their mean size and concurrency."""
    if isinstance(driver, BaselineDriver) and curve.sequential_gbps > 0:
        return nbytes / (curve.sequential_gbps * GB)
    return costmodel.predict_io_seconds(nbytes, chunk, max(threads, 1), curve)


def dram_bytes(mode, driver, bundle: Bundle, budget: Budget, args) -> float:
    """Model bytes the mode holds in DRAM (resident part + FFN memory)."""
    if isinstance(driver, FlashDriver):
        return driver.dram_bytes()
    if mode == "mmap":
        return budget.budget  # the cap: page cache fills it
    return bundle.resident_bytes + driver.dram_ffn


# ---- the cgroup memory cap (mmap) ----


def cgroup_cap(limit: int) -> tuple[Path | None, str]:
    """A fresh memory cgroup limited to `limit` bytes: (its cgroup.procs, how) or (None, why not)."""
    name = f"mlxflash-bench-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists() and os.access(v1, os.W_OK):
        try:
            group = v1 / name
            group.mkdir(exist_ok=True)
            (group / "memory.limit_in_bytes").write_text(str(limit))
            return group / "cgroup.procs", f"cgroup v1 memory.limit_in_bytes = {limit / GB:.2f} GB"
        except OSError as e:
            return None, f"cgroup v1 memory controller refused ({e.strerror})"
    v2 = Path("/sys/fs/cgroup")
    if "memory" in _read(v2 / "cgroup.controllers").split() and os.access(v2, os.W_OK):
        try:
            group = v2 / name
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(str(limit))
            return group / "cgroup.procs", f"cgroup v2 memory.max = {limit / GB:.2f} GB"
        except OSError as e:
            return None, f"cgroup v2 memory.max refused ({e.strerror})"
    return None, "no writable cgroup memory controller (needs root and cgroup v1 memory or v2 memory.max)"


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


def remove_cgroup(procs: Path | None) -> None:
    if procs is not None:
        try:
            procs.parent.rmdir()
        except OSError:
            pass


# ---- the parent: run the modes, print and save ----


def child_command(mode: str, args) -> list[str]:
    cmd = [sys.executable, __file__, str(args.bundle), "--memory", args.memory, "--child", mode]
    cmd += ["--tokens", str(args.tokens), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    cmd += ["--trace", args.trace, "--seed", str(args.seed)]
    return cmd + (["--curve", str(args.curve)] if args.curve else [])


def run_child(mode: str, args, budget: Budget) -> ModeResult:
    from mlxflash.runtime.costmodel import evict

    evict(Path(args.bundle) / "ffn.bin")
    procs, how = None, ""
    if mode == "mmap":
        procs, how = cgroup_cap(int(budget.budget + args.mmap_overhead))
        if procs is None:
            return ModeResult(mode, skipped=how)
    try:
        preexec = (lambda: procs.write_text(str(os.getpid()))) if procs else None
        p = subprocess.run(child_command(mode, args), capture_output=True, text=True, preexec_fn=preexec)
    finally:
        remove_cgroup(procs)
    return parse_child(mode, p, how)


def parse_child(mode: str, p: subprocess.CompletedProcess, how: str) -> ModeResult:
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            d = json.loads(line[len(RESULT_TAG) :])
            r = ModeResult(**d)
            r.note = "; ".join(x for x in (r.note, how) if x)
            return r
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    why = (
        "killed (exit 137: over the memory cap)"
        if p.returncode in (137, -9)
        else f"failed (exit {p.returncode}): {tail}"
    )
    return ModeResult(mode, skipped=why)


def skip_reason(mode: str, bundle: Bundle, budget: Budget) -> str | None:
    if mode == "resident" and budget.model_bytes > budget.budget:
        return f"does not fit the budget ({budget.model_bytes / GB:.2f} GB > {budget.budget / GB:.2f} GB)"
    return None


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


def common_attention(results: list[ModeResult], layers: int) -> None:
    """Attention and the LM head are the same work in every mode, timed apart in each mode's process:
    replace each mode's own figure by the median over the modes, so the ratios compare FFN methods
    and not the moment each process happened to time the attention (the figure measured stays in extra)."""
    ran = [r for r in results if not r.skipped and "head_ms" in r.extra]
    if not ran:
        return
    layer = statistics.median(r.extra["attention_layer_ms"] for r in ran)
    head = statistics.median(r.extra["head_ms"] for r in ran)
    for r in ran:
        common = layer * layers + head
        r.extra["attention_measured_ms"] = r.attention_ms
        r.compute_ms += common - r.attention_ms
        r.total_ms += common - r.attention_ms
        r.attention_ms, r.extra["attention_layer_ms"], r.extra["head_ms"] = common, layer, head


def add_speedups(results: list[ModeResult]) -> None:
    base = {r.mode: r.total_ms for r in results if not r.skipped}
    for r in results:
        if r.skipped or not r.total_ms:
            continue
        if "naive" in base:
            r.speedup_vs_naive = base["naive"] / r.total_ms
        if "hybrid" in base:
            r.speedup_vs_hybrid = base["hybrid"] / r.total_ms


def add_full_depth(results: list[ModeResult], budget: Budget) -> None:
    done = [r for r in results if not r.skipped]
    for r in done:
        r.extra["full_depth"] = full_depth(r, budget)
    base = {r.mode: r.extra["full_depth"]["total_ms"] for r in done}
    for r in done:
        f = r.extra["full_depth"]
        f["speedup_vs_naive"] = base["naive"] / f["total_ms"] if "naive" in base else None
        f["speedup_vs_hybrid"] = base["hybrid"] / f["total_ms"] if "hybrid" in base else None


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


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v else "-"


def _ms(v: float) -> str:
    return f"{v:.1f}" if v else "-"


def table(results: list[ModeResult], seq_gbps: float = 0.0) -> str:
    head = (
        f"| mode | DRAM GB | flash->DRAM GB/token | read GB/s (probe seq {seq_gbps:.2f}) | I/O ms (predicted) "
        "| mem ms | compute ms | total ms | vs naive | vs hybrid |"
    )
    rows = [head, "|" + "---|" * 10]
    for r in results:
        if r.skipped:
            rows.append(f"| {r.mode} | skipped: {r.skipped} |" + " |" * 8)
            continue
        rows.append(
            f"| {r.mode} | {r.dram_bytes / GB:.2f} | {r.bytes_per_token / GB:.3f} | {r.read_gbps:.2f} "
            f"| {r.io_ms:.1f} ({_ms(r.predicted_io_ms)}) | {r.mem_ms:.1f} | {r.compute_ms:.1f} | {r.total_ms:.1f} "
            f"| {_x(r.speedup_vs_naive)} | {_x(r.speedup_vs_hybrid)} |"
        )
    return "\n".join(rows)


def header(bundle: Bundle, budget: Budget, m: dict, args) -> str:
    q = bundle.spec.quantization
    storage = f"{q['up']['bits']}-bit" if q else bundle.spec.dtype
    depth = (
        f" (budget resolved at full depth {budget.full_layers} layers: {budget.budget_full / GB:.2f} GB of "
        f"{budget.model_bytes_full / GB:.2f} GB, scaled per layer)"
        if budget.full_layers != budget.layers
        else ""
    )
    return "\n".join(
        [
            f"# {bundle.path.name}: {budget.layers} layers, d={bundle.spec.hidden_size}, "
            f"FFN {bundle.spec.intermediate_size}, {storage}; model {budget.model_bytes / GB:.2f} GB",
            f"budget {args.memory} -> {budget.budget / GB:.2f} GB{depth}",
            f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.0f} GiB; MLX {m['mlx']} {m['device']}; "
            f"BLAS {m['blas']}; activations {m['activations']}; I/O {m['io_mode']}",
            f"disk: sequential {m['disk_sequential_gbps']:.2f} GB/s ({m['disk_curve']}); "
            f"median of {args.tokens} tokens after {args.warmup} warm-up; attention+head: each mode times it (median of 5), every mode gets the median over the modes, added to compute",
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


def _openblas() -> None:
    try:
        from mlxflash.runtime.cpu import reexec_with_openblas
    except ImportError:
        return
    reexec_with_openblas()


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--memory", default="50%", help="DRAM budget: a size (4GB) or a percentage of the model")
    p.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma list of {', '.join(ALL_MODES)}")
    p.add_argument("--tokens", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=8, help="reads in flight for naive/hybrid/flash")
    p.add_argument("--trace", default="paper", help="'paper' (calibrated generator) or a trace .npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve", type=Path, help=f"disk probe JSON (default {costmodel.DEFAULT_PATH})")
    p.add_argument("--mmap-overhead", type=float, default=256 * 2**20, help="bytes added to the mmap cap")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from mlxflash.format.moe import is_moe_bundle

    if any(is_moe_bundle(a) for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")):
        import bench_moe  # mixture-of-experts bundles: naive, mmap and flash with the expert cache

        return bench_moe.main(argv)
    args = parse_args(argv)
    if args.child:
        r = run_mode(args.child, args)
        print(RESULT_TAG + json.dumps(asdict(r)), flush=True)
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(ALL_MODES)})")
    bundle = Bundle.open(args.bundle, verify=False)
    try:
        budget = resolve_budget(bundle, args.memory)
    except UsageError as e:
        raise SystemExit(f"bench: {e}") from e
    curve = costmodel.DiskCurve.load_or_default(args.curve)
    results = []
    for mode in modes:
        why = skip_reason(mode, bundle, budget)
        print(f"{mode}: {'skipped: ' + why if why else 'running'}", file=sys.stderr, flush=True)
        results.append(ModeResult(mode, skipped=why) if why else run_child(mode, args, budget))
    common_attention(results, bundle.num_layers)
    add_speedups(results)
    if budget.full_layers != budget.layers:
        add_full_depth(results, budget)
    io_mode = next((r.io_mode for r in results if r.io_mode and "mmap" not in r.io_mode), "n/a")
    m = machine(bundle, curve, io_mode)
    print(header(bundle, budget, m, args) + "\n\n" + table(results, curve.sequential_gbps))
    if budget.full_layers != budget.layers:
        print("\n" + full_table(results, budget))
    for r in results:
        if r.note:
            print(f"- {r.mode}: {r.note}")
    if args.json:
        modes_json = [asdict(r) for r in results]
        args.json.write_text(json.dumps({"machine": m, "budget": asdict(budget), "modes": modes_json}, indent=1) + "\n")
    if args.plot:
        plot(results, curve, args.plot)
    return 0


if __name__ == "__main__":
    _openblas()  # as the CLI does; the children inherit the preload (MLXFLASH_BLAS=reference opts out)
    sys.exit(main())
