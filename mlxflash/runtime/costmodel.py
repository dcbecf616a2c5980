"""Disk cost model: measured direct-read throughput over read size and reads in flight.

`tools/disk_probe.py` measures a `DiskCurve` (GB/s of O_DIRECT random reads for each chunk size and
thread count, plus the sequential figure) and stores it as JSON. The runtime-facing API is small:

    curve = DiskCurve.load()                              # ~/.cache/mlxflash/disk_probe.json
    curve.throughput(chunk_bytes, threads)                # bytes/s, interpolated
    predict_io_seconds(nbytes, chunk_bytes, threads, curve)
    plan = plan_io(curve, record_bytes)                   # threads and the coalescing gap

The window k is the memory planner's (mlxflash.runtime.planner), from the selector's recorded unions.

Interpolation is bilinear in (log2 chunk, log2 threads) and clamps outside the probed grid, so a
prediction never extrapolates past what was measured. Along the chunk axis it uses the running
maximum of the measurements (at equal concurrency a larger read is never slower than a smaller
one, since it could be split): that irons out the probe's noise without inventing throughput.

The coalescing gap: with T reads in flight, the time one read of c bytes costs the whole stream is
t(c) = alpha + c / beta (alpha: per-request overhead, beta: streaming bandwidth), fitted per thread
count over the probed chunk sizes. Reading through a gap of g bytes instead of issuing one more
request pays when g / beta < alpha, so the gap limit is g* = alpha * beta.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .reader import FlashReader, aligned_buffer

DEFAULT_PATH = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlxflash" / "disk_probe.json"
GB = 1e9


@dataclass
class DiskCurve:
    """Measured throughput: `gbps[i][j]` for `chunks[i]` bytes per read and `threads[j]` in flight."""

    chunks: list[int]
    threads: list[int]
    gbps: list[list[float]]
    sequential_gbps: float = 0.0  # large contiguous direct reads (1 MiB requests, all threads)
    meta: dict = field(default_factory=dict)  # file size, direct I/O, repeats, date, host

    def __post_init__(self) -> None:
        g = np.asarray(self.gbps, dtype=float)
        if g.shape != (len(self.chunks), len(self.threads)):
            raise ValueError(f"gbps has shape {g.shape}, expected ({len(self.chunks)}, {len(self.threads)})")
        if sorted(self.chunks) != list(self.chunks) or sorted(self.threads) != list(self.threads):
            raise ValueError("chunks and threads must be increasing")

    def throughput(self, chunk_bytes: float, threads: float) -> float:
        """Bytes per second for reads of `chunk_bytes` with `threads` in flight (interpolated)."""
        lc, lt = np.log2(self.chunks), np.log2(self.threads)
        x = float(np.clip(math.log2(max(chunk_bytes, 1)), lc[0], lc[-1]))
        y = float(np.clip(math.log2(max(threads, 1)), lt[0], lt[-1]))
        g = np.maximum.accumulate(np.asarray(self.gbps, dtype=float), axis=0)  # see module docstring
        per_thread = np.array([np.interp(x, lc, g[:, j]) for j in range(len(self.threads))])
        return float(np.interp(y, lt, per_thread)) * GB

    def overhead(self, threads: int) -> tuple[float, float]:
        """(alpha seconds, beta bytes/s): t(c) = alpha + c/beta, the amortized cost of one read of c bytes.

        beta is the best throughput at this concurrency; alpha the median excess time of reads of
        64 KiB and less (a relative fit: the large, noisy sizes do not swamp the small ones)."""
        beta = max(self.throughput(c, threads) for c in self.chunks)
        small = [c for c in self.chunks if c <= 65536] or self.chunks[:1]
        alpha = float(np.median([c / self.throughput(c, threads) - c / beta for c in small]))
        return max(alpha, 0.0), beta

    def save(self, path: str | os.PathLike = DEFAULT_PATH) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike = DEFAULT_PATH) -> DiskCurve:
        d = json.loads(Path(path).read_text())
        return cls(d["chunks"], d["threads"], d["gbps"], d.get("sequential_gbps", 0.0), d.get("meta", {}))

    @classmethod
    def load_or_default(cls, path: str | os.PathLike | None = None) -> DiskCurve:
        """The stored probe if there is one, else `REFERENCE_CURVE` (meta["source"] says which)."""
        p = Path(path) if path else DEFAULT_PATH
        return cls.load(p) if p.is_file() else REFERENCE_CURVE

    def table(self) -> str:
        """A markdown table of the curve (GB/s)."""
        head = "| chunk | " + " | ".join(f"{t} thr" for t in self.threads) + " |"
        rule = "|---" * (len(self.threads) + 1) + "|"
        rows = [
            f"| {_size(c)} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for c, row in zip(self.chunks, self.gbps)
        ]
        return "\n".join([head, rule, *rows])


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


# The curve measured on the development machines (DESIGN.md): used when no probe has been stored.
REFERENCE_CURVE = DiskCurve(
    chunks=[4096, 16384, 32768, 65536, 131072, 262144],
    threads=[1, 4, 8, 16, 32],
    gbps=[
        [0.05, 0.14, 0.23, 0.29, 0.36],
        [0.19, 0.46, 0.72, 0.95, 1.05],
        [0.32, 0.81, 1.02, 1.56, 1.55],
        [0.55, 1.20, 1.55, 1.64, 1.81],
        [0.95, 1.65, 1.72, 1.91, 1.83],
        [1.41, 1.98, 1.83, 1.81, 1.66],
    ],
    sequential_gbps=1.6,
    meta={"source": "DESIGN.md reference (virtio dev VM); run tools/disk_probe.py for this machine"},
)


def spot_check(path: str | os.PathLike, chunk_bytes: int, threads: int, reads: int = 256, seed: int = 0) -> float:
    """GB/s of `reads` random direct reads of `chunk_bytes` (rounded up to a page) with `threads` in
    flight on the file at `path`, measured now: the curve's level under the machine's present load
    (a shared machine's disk and CPUs are not what they were when the probe ran). Evicts the file after."""
    chunk = -(-max(int(chunk_bytes), 1) // 4096) * 4096
    reader = FlashReader(path, threads=threads)
    try:
        chunk = min(chunk, reader.size // 4096 * 4096)  # a small file: reads of all of it
        if chunk == 0:
            raise ValueError(f"{path}: {reader.size} bytes, smaller than one page")
        _, dest = aligned_buffer(chunk * max(2 * threads, 4))
        seconds = _timed_reads(
            reader, reader.size - reader.size % chunk, chunk, reads, dest, np.random.default_rng(seed)
        )
    finally:
        reader.close()
        evict(path)
    return reads * chunk / seconds / GB


def rescaled(curve: DiskCurve, chunk_bytes: float, threads: int, gbps: float) -> DiskCurve:
    """The curve's shape with its level set so that (chunk_bytes, threads) reads at `gbps` (a spot check)."""
    factor = gbps * GB / curve.throughput(chunk_bytes, threads)
    meta = {**curve.meta, "rescaled": {"chunk": int(chunk_bytes), "threads": threads, "gbps": gbps, "factor": factor}}
    table = [[v * factor for v in row] for row in curve.gbps]
    return DiskCurve(curve.chunks, curve.threads, table, curve.sequential_gbps * factor, meta)


def predict_io_seconds(nbytes: float, chunk_bytes: float, threads: int, curve: DiskCurve) -> float:
    """Seconds to read `nbytes` in reads of `chunk_bytes` with `threads` in flight."""
    if nbytes <= 0:
        return 0.0
    return float(nbytes) / curve.throughput(min(chunk_bytes, nbytes), threads)


def coalesce_gap(curve: DiskCurve, threads: int) -> int:
    """Largest gap (bytes) worth reading through rather than issuing another request: alpha * beta."""
    alpha, beta = curve.overhead(threads)
    return int(alpha * beta)


@dataclass
class IOPlan:
    threads: int  # reads in flight
    gap_bytes: int  # read through gaps up to this size (0: never)
    chunk_bytes: int  # the read size the plan assumed
    gbps: float  # predicted throughput at that size and concurrency


def plan_io(curve: DiskCurve, chunk_bytes: int, max_threads: int = 64, within: float = 0.95) -> IOPlan:
    """The fewest threads that reach `within` of the best probed throughput for reads of `chunk_bytes`,
    and the coalescing gap at that concurrency. `chunk_bytes` is the typical read (one record, or the
    mean coalesced run)."""
    options = [t for t in curve.threads if t <= max_threads] or [curve.threads[0]]
    best = max(curve.throughput(chunk_bytes, t) for t in options)
    threads = next(t for t in options if curve.throughput(chunk_bytes, t) >= within * best)
    gap = coalesce_gap(curve, threads)
    return IOPlan(threads, gap, int(chunk_bytes), curve.throughput(chunk_bytes, threads) / GB)


# ---- measuring (tools/disk_probe.py is the front end) ----

PROBE_CHUNKS = [4096 << i for i in range(9)]  # 4 KiB .. 1 MiB
PROBE_THREADS = [1, 2, 4, 8, 16, 32]


def make_scratch(path: str | os.PathLike, nbytes: int) -> Path:
    """A file of `nbytes` of real (non-sparse, incompressible) data, evicted from the page cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    block = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
    if not (path.is_file() and path.stat().st_size == nbytes):
        with open(path, "wb") as f:
            for i in range(0, nbytes, block.nbytes):
                block[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)  # no two blocks alike
                f.write(block[: min(block.nbytes, nbytes - i)].tobytes())
            f.flush()
            os.fsync(f.fileno())
    evict(path)
    return path


def evict(path: str | os.PathLike) -> None:
    """Drop one file's pages from the page cache (posix_fadvise DONTNEED; a no-op where missing)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed_reads(reader, size: int, chunk: int, n: int, dest: np.ndarray, rng: np.random.Generator) -> float:
    """Seconds for n random chunk-aligned reads of `chunk` bytes (slots of `dest` reused)."""
    slots = dest.nbytes // chunk
    offsets = rng.integers(0, size // chunk, n) * chunk
    runs = [(int(o), dest[(i % slots) * chunk : (i % slots + 1) * chunk]) for i, o in enumerate(offsets)]
    t0 = time.perf_counter()
    reader.read(runs)
    return time.perf_counter() - t0


def calibrate_reads(reader, size: int, chunk: int, min_seconds: float, dest, rng) -> tuple[int, float]:
    """(reads per timing so that one takes at least `min_seconds`, the GB/s of that timing)."""
    n = 4 * reader.threads
    while (dt := _timed_reads(reader, size, chunk, n, dest, rng)) < min_seconds and n < 1 << 20:
        n = int(n * max(2.0, min(8.0, min_seconds / max(dt, 1e-4))))
    return n, n * chunk / dt / GB


def measure_sequential(path: Path, nbytes: int, threads: int) -> float:
    """GB/s of one contiguous direct read of `nbytes` (1 MiB requests shared by `threads`)."""
    reader = FlashReader(path, threads=threads)
    try:
        size = reader.size - reader.size % (1 << 20)
        nbytes = min(nbytes, size)
        _, view = aligned_buffer(nbytes)
        start = int(np.random.default_rng(1).integers(0, (size - nbytes) // (1 << 20) + 1)) << 20
        t0 = time.perf_counter()
        reader.read([(start, view)])
        return nbytes / (time.perf_counter() - t0) / GB
    finally:
        reader.close()


def probe(
    path: str | os.PathLike,
    chunks: Sequence[int] = PROBE_CHUNKS,
    threads: Sequence[int] = PROBE_THREADS,
    min_seconds: float = 0.25,
    repeats: int = 3,
    progress=None,
) -> DiskCurve:
    """Measure the curve on an existing (evicted) file. `progress(chunk, threads, gbps)` is called per cell."""
    path = Path(path)
    rng = np.random.default_rng(0)
    readers = [FlashReader(path, threads=t) for t in threads]
    cells = [(i, j) for j in range(len(threads)) for i in range(len(chunks))]
    rates: dict[tuple[int, int], list[float]] = {}
    sizes: dict[tuple[int, int], int] = {}
    try:
        # repeats are rounds over all cells, so a burst of background load hits one sample per cell
        for round_ in range(repeats):
            for i, j in cells:
                reader, c = readers[j], chunks[i]
                _, dest = aligned_buffer(c * max(2 * threads[j], 4))
                if round_ == 0:
                    sizes[i, j], rate = calibrate_reads(reader, reader.size, c, min_seconds, dest, rng)
                else:
                    rate = sizes[i, j] * c / _timed_reads(reader, reader.size, c, sizes[i, j], dest, rng) / GB
                rates.setdefault((i, j), []).append(rate)
                if progress and round_ == repeats - 1:
                    progress(c, threads[j], float(np.median(rates[i, j])))
        direct, note = readers[0].direct_io, readers[0].io_note
    finally:
        for r in readers:
            r.close()
    table = [[float(np.median(rates[i, j])) for j in range(len(threads))] for i in range(len(chunks))]
    evict(path)
    seq = measure_sequential(path, 1 << 30, max(t for t in threads if t <= 8))
    meta = {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "direct_io": direct,
        "io_mode": note,
        "repeats": repeats,
        "min_seconds": min_seconds,
        "host": platform.node(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": "tools/disk_probe.py",
    }
    return DiskCurve(list(chunks), list(threads), table, seq, meta)
