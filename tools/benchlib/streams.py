"""How the baselines get FFN records: large direct reads into one reused buffer, or (float bundles whose
record fields are whole pages) preadv iovecs that scatter each record's fields into contiguous matrices,
so the dense layout arrives with no copy. Per-token time is split into I/O, memory management and
compute on a `Clock`."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx

from mlxflash.format.bundle import Bundle, RecordLayout, mx_dtype
from mlxflash.runtime.reader import FlashReader, aligned_buffer


@dataclass
class Clock:
    """One token's time by part (seconds) and its flash->DRAM traffic."""

    io: float = 0.0
    mem: float = 0.0
    compute: float = 0.0
    bytes: int = 0  # asked for
    reads: int = 0
    transferred: int = 0  # moved from the device (alignment and read-through included)


def timed(clock: Clock, part: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    setattr(clock, part, getattr(clock, part) + time.perf_counter() - t0)
    return out


def evaluated(tree):
    mx.eval(tree)
    return tree


class Streamer:
    """Reads neuron ranges of layer blocks into one reused aligned buffer (large direct requests)."""

    def __init__(self, bundle: Bundle, threads: int, largest: int):
        self.bundle, self.reader = bundle, FlashReader(bundle.ffn_path, threads=threads)
        self.buf, self.view = aligned_buffer(max(largest, 1))

    def read(self, layer: int, lo: int, hi: int, clock: Clock) -> mx.array:
        """Records lo..hi of a layer: (hi - lo, R) uint8, valid until the next read."""
        R = self.bundle.spec.record.nbytes
        n = (hi - lo) * R
        before = self.reader.counters.reads
        timed(clock, "io", self.reader.read, [(self.bundle.spec.layers[layer].offset + lo * R, self.view[:n])])
        clock.bytes += n
        clock.transferred += n
        clock.reads += self.reader.counters.reads - before
        return self.buf[:n].reshape(hi - lo, R)

    @property
    def io_note(self) -> str:
        return self.reader.io_note


def scatter_ok(layout: RecordLayout) -> bool:
    """Records are their fields back to back, each a whole number of 4 KiB pages (float bundles)."""
    offsets = [f.offset for f in layout.fields]
    ends = [f.offset + f.nbytes for f in layout.fields]
    pages = all(f.offset % 4096 == 0 and f.nbytes % 4096 == 0 for f in layout.fields)
    return pages and offsets[0] == 0 and offsets[1:] == ends[:-1] and ends[-1] == layout.nbytes


class FieldBuffers:
    """Per record field, one contiguous aligned matrix (rows, count): MLX array + numpy bytes, shared."""

    def __init__(self, layout: RecordLayout, rows: int):
        self.mx, self.np = {}, {}
        for f in layout.fields:
            buf, view = aligned_buffer(max(rows * f.nbytes, 1))
            self.mx[f.name] = evaluated(buf.view(mx_dtype(f.dtype)).reshape(rows, f.count))
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
        clock.transferred += (hi - lo) * R
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
