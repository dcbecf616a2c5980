"""Reads byte ranges of the FFN file into memory, bypassing the OS page cache.

Linux opens the file with O_DIRECT, macOS sets F_NOCACHE; where the file system refuses, the reader
falls back to buffered reads and says so (`direct_io`, `io_note`). Reads run on a pool of threads,
each looping over its own batch of ranges with `os.preadv` (which releases the GIL), so many reads
are in flight. Destinations are numpy views of MLX arrays: data lands in the array with no copy.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import BundleError

DIRECT_ALIGN = 4096  # O_DIRECT needs offset, length and buffer aligned to the logical block size
F_NOCACHE = 48  # macOS fcntl
SPLIT_BYTES = 1 << 20  # large runs are cut into pieces so several threads share them
IOV_MAX = 1024  # buffers one preadv may take (Linux and macOS)
SCRATCH_BYTES = 64 << 10  # per thread, at most: unaligned reads go through it in pieces (O_DIRECT's envelope)
MIN_SCRATCH_BYTES = 16 << 10


def scratch_size_for(record_bytes: int, gap: int = 0) -> int:
    """A thread's scratch: two records and their alignment on both sides, in whole pages, 16-64 KiB. Small
    records make small reads, and a small budget's bytes are better spent on cached neurons (on the
    default model 32 threads' 64 KiB were 2 MB, 70 neurons a layer). Reads through gaps (`gap` > 0) are
    long by design: they get the largest scratch, not to be cut into many small reads again."""
    if gap > 0:
        return SCRATCH_BYTES
    need = -(-(2 * record_bytes + 2 * DIRECT_ALIGN) // DIRECT_ALIGN) * DIRECT_ALIGN
    return max(MIN_SCRATCH_BYTES, min(SCRATCH_BYTES, need))


def aligned_buffer(nbytes: int, align: int = DIRECT_ALIGN) -> tuple[mx.array, np.ndarray]:
    """An evaluated MLX uint8 array of `nbytes` whose memory starts on `align`, and its numpy view."""
    base = mx.zeros((nbytes + align,), dtype=mx.uint8)
    mx.eval(base)
    skip = (-np.asarray(base).ctypes.data) % align
    arr = base[skip : skip + nbytes]
    mx.eval(arr)
    view = np.asarray(arr)
    assert view.ctypes.data % align == 0 and view.flags.writeable
    return arr, view


@dataclass
class IOCounters:
    bytes_read: int = 0  # bytes asked for by callers
    bytes_transferred: int = 0  # bytes moved from the device (alignment included)
    reads: int = 0
    seconds: float = 0.0


class FlashReader:
    """Parallel reader of one file. `read(runs)` fills destinations; counters accumulate."""

    def __init__(self, path: str | os.PathLike, threads: int = 8, direct: bool = True, scratch: int = SCRATCH_BYTES):
        self.path = os.fspath(path)
        self.threads = max(1, threads)
        self.scratch = scratch  # each thread's buffer for unaligned reads (scratch_size_for a record size)
        self.counters = IOCounters()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mlxflash-io")
        self.fd, self.direct_io, self.io_note = self._open(direct)
        # O_DIRECT on Linux needs aligned offsets, lengths and buffers; macOS's F_NOCACHE does not
        self._aligned_only = self.direct_io and sys.platform != "darwin"
        self.size = os.fstat(self.fd).st_size

    def _open(self, direct: bool) -> tuple[int, bool, str]:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise BundleError(f"{self.path}: cannot open ({e.strerror})") from e
        if not direct:
            return fd, False, "buffered reads (direct I/O not requested)"
        if sys.platform == "darwin":
            import fcntl

            try:
                fcntl.fcntl(fd, F_NOCACHE, 1)
                return fd, True, "F_NOCACHE"
            except OSError as e:
                return fd, False, f"buffered reads (F_NOCACHE refused: {e.strerror})"
        if not hasattr(os, "O_DIRECT"):
            return fd, False, f"buffered reads (no O_DIRECT on {sys.platform})"
        try:
            dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            _, probe = aligned_buffer(DIRECT_ALIGN)
            os.preadv(dfd, [probe], 0)
        except OSError as e:
            if "dfd" in locals():
                os.close(dfd)
            return fd, False, f"buffered reads (O_DIRECT refused: {e.strerror})"
        os.close(fd)
        return dfd, True, "O_DIRECT"

    def close(self) -> None:
        if self.fd >= 0:
            self._pool.shutdown(wait=True)
            os.close(self.fd)
            self.fd = -1

    def read(self, runs: list[tuple[int, np.ndarray]]) -> None:
        """Fill each destination (a uint8 numpy array) with the file's bytes from its offset."""
        pieces = [p for offset, dest in runs for p in _split(offset, dest, self._piece_bytes(offset, dest))]
        if not pieces:
            return
        t0 = time.perf_counter()
        batches = _balanced(pieces, min(self.threads, len(pieces)), lambda p: p[1].nbytes)
        moved = sum(self._pool.map(self._read_batch, batches))
        c = self.counters
        c.seconds += time.perf_counter() - t0
        c.bytes_read += sum(d.nbytes for _, d in runs)
        c.bytes_transferred += moved
        c.reads += len(pieces)

    def scatter(self, runs: list[tuple[int, list[np.ndarray]]]) -> None:
        """Fill each run's buffers, in order, with the file's bytes from its offset: one preadv per piece
        of a run (at most SPLIT_BYTES or IOV_MAX buffers), so records land field by field where they are
        used. With direct I/O every buffer must be aligned and a whole number of DIRECT_ALIGN bytes."""
        pieces = [p for offset, bufs in runs for p in _split_buffers(offset, bufs)]
        if not pieces:
            return
        t0 = time.perf_counter()
        batches = _balanced(pieces, min(self.threads, len(pieces)), lambda p: p[2])
        moved = sum(self._pool.map(self._scatter_batch, batches))
        c = self.counters
        c.seconds += time.perf_counter() - t0
        c.bytes_read += moved
        c.bytes_transferred += moved
        c.reads += len(pieces)

    def _scatter_batch(self, batch: list[tuple[int, list[np.ndarray], int]]) -> int:
        return sum(self._pread_full(bufs, offset) for offset, bufs, _ in batch)

    def _piece_bytes(self, offset: int, dest: np.ndarray) -> int:
        """Aligned reads land in place in large pieces; unaligned ones go through the thread's scratch."""
        aligned = offset % DIRECT_ALIGN == 0 and dest.ctypes.data % DIRECT_ALIGN == 0
        return self.scratch - 2 * DIRECT_ALIGN if self._aligned_only and not aligned else SPLIT_BYTES

    def scratch_bytes(self, largest_read: int) -> int:
        """The most memory the threads' scratch buffers take when no read exceeds `largest_read` bytes."""
        return self.threads * min(self.scratch, largest_read + 2 * DIRECT_ALIGN) if self._aligned_only else 0

    def _read_batch(self, batch: list[tuple[int, np.ndarray]]) -> int:
        return sum(self._read_one(offset, dest) for offset, dest in batch)

    def _read_one(self, offset: int, dest: np.ndarray) -> int:
        n = dest.nbytes
        if not self._aligned_only:
            self._pread_full(dest, offset)
            return n
        if offset % DIRECT_ALIGN == 0 and dest.ctypes.data % DIRECT_ALIGN == 0:
            body = n - n % DIRECT_ALIGN
            if body:
                self._pread_full(dest[:body], offset)
            if body == n:
                return n
            return body + self._read_envelope(offset + body, dest[body:])
        return self._read_envelope(offset, dest)

    def _read_envelope(self, offset: int, dest: np.ndarray) -> int:
        """Read the aligned span around [offset, offset+n) into scratch, copy the wanted bytes."""
        start = offset - offset % DIRECT_ALIGN
        end = min(
            -(-(offset + dest.nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN, -(-self.size // DIRECT_ALIGN) * DIRECT_ALIGN
        )
        scratch = self._scratch(end - start)
        got = self._pread_full(scratch[: end - start], start, allow_eof=True)
        lo = offset - start
        if got < lo + dest.nbytes:
            raise BundleError(f"{self.path}: file ends at {start + got}, expected data up to {offset + dest.nbytes}")
        dest[:] = scratch[lo : lo + dest.nbytes]
        return end - start

    def _scratch(self, nbytes: int) -> np.ndarray:
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.nbytes < nbytes:
            self._local.keep, buf = aligned_buffer(max(nbytes, self.scratch))
            self._local.scratch = buf
        return buf

    def _pread_full(self, dest: np.ndarray | list[np.ndarray], offset: int, allow_eof: bool = False) -> int:
        """Fill `dest` (a buffer, or buffers in file order) from `offset`, through short reads; at the
        file's end return what was read (`allow_eof`) or refuse the file as truncated."""
        views = [memoryview(b).cast("B") for b in (dest if isinstance(dest, list) else [dest])]
        done, n = 0, sum(v.nbytes for v in views)
        while views:
            try:
                got = os.preadv(self.fd, views, offset + done)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise BundleError(f"{self.path}: read of {n} bytes at {offset} failed ({e.strerror})") from e
            if got == 0:
                if allow_eof:
                    return done
                raise BundleError(f"{self.path}: truncated: file ends before byte {offset + n}")
            done += got
            while views and got >= views[0].nbytes:  # drop what is full, trim a partly filled buffer
                got -= views.pop(0).nbytes
            if got:
                views[0] = views[0][got:]
        return done


def _split(offset: int, dest: np.ndarray, piece: int = SPLIT_BYTES) -> list[tuple[int, np.ndarray]]:
    n = dest.nbytes
    if n <= piece:
        return [(offset, dest)]
    return [(offset + s, dest[s : s + piece]) for s in range(0, n, piece)]


def _balanced(pieces: list, n: int, size) -> list[list]:
    """One batch per thread, balanced by bytes (largest first): each worker loops, no task per read."""
    batches: list[list] = [[] for _ in range(n)]
    loads = [0] * n
    for piece in sorted(pieces, key=lambda p: -size(p)):
        i = loads.index(min(loads))
        batches[i].append(piece)
        loads[i] += size(piece)
    return batches


def _split_buffers(offset: int, bufs: list[np.ndarray]) -> list[tuple[int, list[np.ndarray], int]]:
    """A run of buffers -> (offset, buffers, bytes) pieces of at most SPLIT_BYTES (a buffer at least)
    and IOV_MAX buffers, cut between buffers."""
    out, piece, start, size = [], [], offset, 0
    for b in bufs:
        if piece and (size + b.nbytes > SPLIT_BYTES or len(piece) == IOV_MAX):
            out.append((start, piece, size))
            piece, start, size = [], start + size, 0
        piece.append(b)
        size += b.nbytes
    if piece:
        out.append((start, piece, size))
    return out
