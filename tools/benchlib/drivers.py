"""The modes: each driver runs one layer's FFN for one token input and splits its time on a Clock.

All of them compute with the runtime's FFN math (`mlxflash.runtime.ffn.FFN`): the baselines hand it
dense weights (the whole layer, or a resident prefix and a streamed rest, summed with `FFN.partial`),
flash modes are the runtime's own flash model (`load_model(mode="flash")`) with a TraceSelector.

`DRIVERS` maps a mode to the factory that builds its driver; a new kind of model (mixture of
experts) registers its own modes there (`register`).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxflash.format.bundle import Bundle, down_rows
from mlxflash.format.quant import transpose_packed
from mlxflash.runtime import costmodel
from mlxflash.runtime.ffn import FFN
from mlxflash.runtime.model import load_model
from mlxflash.runtime.reader import FlashReader, aligned_buffer
from mlxflash.runtime.stats import RuntimeStats
from mlxflash.runtime.traces import Trace, TraceSelector, generate_trace

from .budget import Budget, hybrid_keep
from .streams import Clock, FieldBuffers, ScatterStreamer, Streamer, evaluated, scatter_ok, timed

# mode -> load_model options. window None: the runtime picks it from the budget; gap -1: no coalescing,
# "auto": the cost model's read-through gap (mlxflash.runtime.costmodel.plan_io) in records.
FLASH_MODES = {
    "flash-predictor": {"window": 0, "bundled": False, "gap": -1, "overlap": False},
    "flash-window": {"window": None, "bundled": False, "gap": -1, "overlap": False},
    "flash-bundle": {"window": None, "bundled": True, "gap": -1, "overlap": False},
    "flash": {"window": None, "bundled": True, "gap": "auto", "overlap": False},
    "flash-overlap": {"window": None, "bundled": True, "gap": "auto", "overlap": True},  # cached rows during the reads
}
BASELINES = ("naive", "hybrid", "mmap", "resident")


def layer_ffns(bundle: Bundle, resident: dict[str, mx.array]) -> list[FFN]:
    """The runtime's FFN module of every layer, with its resident pieces (down scales, biases)."""
    out = []
    for i in range(bundle.num_layers):
        prefix = f"model.layers.{i}.mlp."
        params = [(k[len(prefix) :], v) for k, v in resident.items() if k.startswith(prefix) and ".predictor." not in k]
        ffn = FFN(i, bundle.spec, RuntimeStats(), biases=any(name == "up_bias" for name, _ in params))
        ffn.load_weights(params, strict=True)
        out.append(ffn)
    return out


def field_weights(bundle: Bundle, fields: dict[str, mx.array]) -> dict[str, mx.array]:
    """Contiguous field matrices {name: (m, count)} -> FFN weights (a quantized down is transposed back)."""
    q = bundle.spec.quantization
    if not q or down_rows(q):
        return fields
    return {**fields, "down.weight": transpose_packed(fields["down.weight"], q["down"]["bits"])}


class BaselineDriver:
    """naive, hybrid and resident: `keep[l]` neurons of layer l resident, the rest streamed at every token."""

    def __init__(self, bundle: Bundle, resident: dict, keep: list[int], threads: int):
        self.bundle, spec = bundle, bundle.spec
        self.ffns = layer_ffns(bundle, resident)
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
        return evaluated(self.ffns[layer].dense_weights(buf.reshape(k, R)))  # prepared once: no per-token cost

    def layer(self, i: int, x: mx.array, clock: Clock) -> mx.array:
        n, k, ffn = self.bundle.spec.layers[i].neurons, self.keep[i], self.ffns[i]
        y = timed(clock, "compute", lambda: evaluated(ffn.partial(x, self.held[i], 0))) if k else None
        if k < n:
            if isinstance(self.streamer, ScatterStreamer):
                w = self.streamer.read(i, k, n, clock)  # already in the dense layout: no memory management
            else:
                records = self.streamer.read(i, k, n, clock)
                w = timed(clock, "mem", lambda: evaluated(ffn.dense_weights(records)))
            part = timed(clock, "compute", lambda: evaluated(ffn.partial(x, w, k)))
            y = part if y is None else y + part
        return timed(clock, "compute", lambda: evaluated(ffn.finish(y)))

    def io_note(self) -> str:
        return self.streamer.io_note if self.streamer else "none (all resident)"

    def threads(self) -> int:
        return self.streamer.reader.threads if self.streamer else 0


class MmapDriver:
    """ffn.bin through np.memmap: each layer's block copied out of the map into the dense layout
    (the page faults and the copy are its I/O; float bundles need no further preparation)."""

    def __init__(self, bundle: Bundle, resident: dict):
        self.bundle, spec = bundle, bundle.spec
        self.map = np.memmap(bundle.ffn_path, dtype=np.uint8, mode="r")
        self.ffns = layer_ffns(bundle, resident)
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
        w = timed(clock, "mem", lambda: evaluated(field_weights(self.bundle, self.fields.weights(n))))
        return timed(clock, "compute", lambda: evaluated(self.ffns[i].dense(x, w)))

    def io_note(self) -> str:
        return "mmap (page cache, default read-ahead)"

    def threads(self) -> int:
        return 1


def flash_options(options: dict, bundle: Bundle, curve: costmodel.DiskCurve, threads: int) -> dict:
    """The mode's options as the runtime's load_model takes them (refusing what it does not know)."""
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

    def __init__(self, bundle: Bundle, budget: float, options: dict, trace: Trace, threads: int, curve):
        widths = [b.neurons for b in bundle.spec.layers]
        self.selector = TraceSelector(trace, num_layers=bundle.num_layers, width=widths)
        kwargs = flash_options(options, bundle, curve, threads)
        self.note = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        self.model, _ = load_model(
            bundle.path,
            mode="flash",
            memory=int(budget),
            selector=self.selector,
            threads=threads,
            verify=False,
            **kwargs,
        )
        self.flash = self.model.flash
        self.layers = self.model.model.layers

    def layer(self, i: int, x: mx.array, clock: Clock) -> mx.array:
        before = self.flash.stats.snapshot()
        t0 = time.perf_counter()
        y = evaluated(self.layers[i].mlp(x[None]))  # (1, 1, d): a batch of one token
        wall = time.perf_counter() - t0
        after = self.flash.stats.snapshot()
        io, mem = after["io_s"] - before["io_s"], after["mem_s"] - before["mem_s"]
        clock.io += io
        clock.mem += mem
        clock.compute += wall - io - mem
        clock.bytes += after["bytes_read"] - before["bytes_read"]
        clock.reads += after["reads"] - before["reads"]
        clock.transferred += after["bytes_transferred"] - before["bytes_transferred"]
        return y

    def dram_bytes(self) -> int:
        return int(self.flash.plan.planned_bytes or self.flash.resident_bytes)

    def extra(self) -> dict:
        return {k: v for k, v in self.flash.live().items() if isinstance(v, (int, float, str))}

    def io_note(self) -> str:
        return self.flash.reader.io_note

    def threads(self) -> int:
        return self.flash.reader.threads


def load_trace(spec: str, bundle: Bundle, tokens: int, seed: int) -> Trace:
    """'paper' (the calibrated generator, `tokens` long) or a recorded trace .npz."""
    if spec == "paper":
        return generate_trace([b.neurons for b in bundle.spec.layers], tokens, seed=seed)
    return Trace.load(spec)


def _flash(mode: str):
    def build(bundle: Bundle, budget: Budget, args):
        curve = costmodel.DiskCurve.load_or_default(args.curve)
        trace = load_trace(args.trace, bundle, args.warmup + args.tokens + 8, args.seed)
        return FlashDriver(bundle, budget.budget, FLASH_MODES[mode], trace, args.threads, curve)

    return build


def _baseline(mode: str):
    def build(bundle: Bundle, budget: Budget, args):
        resident = bundle.resident_weights()
        mx.eval(resident)  # the resident part really is in DRAM, as in the runtime
        full = [b.neurons for b in bundle.spec.layers]
        if mode == "mmap":
            driver = MmapDriver(bundle, resident)
        else:
            keep = {"naive": [0] * len(full), "hybrid": hybrid_keep(bundle, budget), "resident": full}[mode]
            driver = BaselineDriver(bundle, resident, keep, args.threads)
        driver.resident = resident
        return driver

    return build


DriverFactory = Callable[[Bundle, Budget, object], object]
DRIVERS: dict[str, DriverFactory] = {m: _baseline(m) for m in BASELINES} | {m: _flash(m) for m in FLASH_MODES}


def register(mode: str, factory: DriverFactory) -> None:
    """Add a mode (e.g. the MoE drivers): `factory(bundle, budget, args)` returns an object with
    layer(i, x, clock), io_note(), threads() and either dram_ffn or dram_bytes()."""
    DRIVERS[mode] = factory


def make_driver(mode: str, bundle: Bundle, budget: Budget, args):
    return DRIVERS[mode](bundle, budget, args)


def resident_weights_of(driver, bundle: Bundle) -> dict[str, mx.array]:
    """The resident weights the driver's process holds (to time attention with)."""
    if isinstance(driver, FlashDriver):
        return dict(tree_flatten(driver.model.parameters()))
    return driver.resident
