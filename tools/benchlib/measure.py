"""One mode's measurement inside its own process: the same fixed FFN inputs every mode gets, warm-up
tokens, then measured tokens; per token the time by part (I/O, memory management, compute) and the
bytes moved. Attention and the LM head are the same work in every mode: their projections are timed
here (layer 0's times the number of layers, plus the head; medians of 5) and the parent replaces each
mode's figure by the median over all modes and rounds (report.common_attention)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import mlx.core as mx

from mlxflash.format.bundle import Bundle, mx_dtype
from mlxflash.runtime import costmodel
from mlxflash.runtime.stats import peak_rss_bytes

from .streams import Clock, evaluated

GB = 1e9


@dataclass
class ModeResult:
    mode: str
    dram_bytes: float = 0.0
    bytes_per_token: float = 0.0
    transferred_per_token: float = 0.0  # moved from the device: alignment and read-through included
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
    rounds: int = 1
    token_ms: list = field(default_factory=list)  # every measured token's total (all rounds)
    spread: dict = field(default_factory=dict)  # figure -> [min, max] over the rounds' medians
    extra: dict = field(default_factory=dict)


def activation_dtype(bundle: Bundle) -> mx.Dtype:
    """Float bundles: their dtype (as mlx-lm runs a model in its weights' dtype); quantized: float32
    (MLX's fast CPU path for quantized_matmul)."""
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
        evaluated([_matvec(x, resident, k) for k in mats])
        return time.perf_counter() - t0

    once(names + [head])
    layer = statistics.median(once(names) for _ in range(repeats))
    return layer, statistics.median(once([head]) for _ in range(repeats))


def time_tokens(driver, bundle: Bundle, warmup: int, tokens: int, disk_bytes) -> tuple[list[Clock], list[float], float]:
    """(per measured token: its Clock and wall seconds, the device bytes read per measured token)."""
    d = bundle.spec.hidden_size
    dtype = activation_dtype(bundle)
    xs = [mx.random.normal((1, d), key=mx.random.key(100 + i)).astype(dtype) for i in range(bundle.num_layers)]
    mx.eval(xs)
    clocks, walls, disk0 = [], [], None
    for t in range(warmup + tokens):
        if t == warmup:
            disk0 = disk_bytes()
        clock = Clock()
        t0 = time.perf_counter()
        for i in range(bundle.num_layers):
            driver.layer(i, xs[i], clock)
        if t >= warmup:
            clocks.append(clock)
            walls.append(time.perf_counter() - t0)
    disk1 = disk_bytes()
    disk = (disk1 - disk0) / tokens if disk0 is not None and disk1 is not None and tokens else None
    return clocks, walls, disk


def summarize(mode: str, driver, clocks: list[Clock], walls: list[float], attn: float, curve, ffn_path) -> ModeResult:
    """Medians over the measured tokens (attention + head added to compute and total); the predicted
    I/O from the curve as stored and as spot-checked right after the tokens (`curve_now`)."""

    def med(key):
        return statistics.median(getattr(c, key) for c in clocks)

    io, nbytes, reads = med("io"), med("bytes"), med("reads")
    r = ModeResult(mode)
    r.io_ms, r.mem_ms, r.compute_ms = 1e3 * io, 1e3 * med("mem"), 1e3 * (med("compute") + attn)
    r.token_ms = [1e3 * (w + attn) for w in walls]
    r.total_ms = statistics.median(r.token_ms)
    r.bytes_per_token, r.reads_per_token, r.transferred_per_token = nbytes, reads, med("transferred")
    r.read_gbps = nbytes / io / GB if io > 0 else 0.0
    r.threads = driver.threads()
    r.extra = driver.extra() if hasattr(driver, "extra") else {}
    if mode != "mmap" and reads:
        moved = r.transferred_per_token or nbytes
        r.extra["predicted_io_stored_ms"] = 1e3 * predicted_io(mode, moved, reads, r.threads, curve)
        now = curve_now(mode, moved / reads, r.threads, reads, ffn_path, curve)
        r.extra["spot_check"] = now.meta["rescaled"]
        r.predicted_io_ms = 1e3 * predicted_io(mode, moved, reads, r.threads, now)
    r.peak_rss_bytes, r.attention_ms = peak_rss_bytes(), 1e3 * attn
    r.io_mode = driver.io_note()
    r.note = getattr(driver, "note", "")
    return r


def predicted_io(mode: str, nbytes: float, reads: float, threads: int, curve: costmodel.DiskCurve) -> float:
    """Seconds the cost model expects: contiguous streaming (naive, hybrid) at the probe's sequential
    figure, scattered reads at the random-read curve for their mean size and concurrency."""
    if mode in ("naive", "hybrid") and curve.sequential_gbps > 0:
        return nbytes / (curve.sequential_gbps * GB)
    chunk = nbytes / reads if reads else nbytes
    return costmodel.predict_io_seconds(nbytes, chunk, max(threads, 1), curve)


def curve_now(mode: str, chunk: float, threads: int, reads: float, ffn_path, curve) -> costmodel.DiskCurve:
    """The stored curve rescaled to a spot check of the disk made now, in this process: as many reads
    as a token makes (64..1024) at its mean size and concurrency (streaming modes: 1 MiB reads)."""
    size = 1 << 20 if mode in ("naive", "hybrid") else chunk
    n = int(min(1024, max(64, reads)))
    gbps = costmodel.spot_check(ffn_path, size, max(threads, 1), reads=n)
    return costmodel.rescaled(curve, size, max(threads, 1), gbps)
