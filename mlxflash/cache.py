"""The DRAM neuron cache of one layer (PAPER.md, "DRAM memory management").

One matrix of `capacity` neuron records is allocated once (aligned, touched) and never reallocated.
`index[row]` is the neuron in a row, `used` the number of rows in use: rows [0, used) hold exactly the
union of the last `window` tokens' selections. Deleting moves the last used rows into the freed ones;
inserting appends. Reads of missing records land straight in their rows.
"""

from __future__ import annotations

import time
from collections import deque

import mlx.core as mx
import numpy as np

from .reader import FlashReader, aligned_buffer
from .stats import RuntimeStats


class NeuronCache:
    def __init__(self, neurons: int, capacity: int, record_bytes: int, window: int):
        if capacity < 1 or window < 1:
            raise ValueError(f"cache capacity {capacity} and window {window} must be >= 1")
        self.neurons, self.capacity, self.record_bytes = neurons, min(capacity, neurons), record_bytes
        self.window = window
        flat, flat_np = aligned_buffer(self.capacity * record_bytes)
        self.matrix = flat.reshape(self.capacity, record_bytes)  # (capacity, R) uint8, MLX
        self.rows_np = flat_np.reshape(self.capacity, record_bytes)  # the same memory, numpy
        self.index = np.full(self.capacity, -1, dtype=np.int32)  # row -> neuron
        self.row_of = np.full(neurons, -1, dtype=np.int32)  # neuron -> row
        self.count = np.zeros(neurons, dtype=np.int32)  # how many window entries hold the neuron
        self.used = 0
        self.history: deque[np.ndarray] = deque()
        self.dropped = 0  # selected neurons left out because the cache was full

    def update(self, selected: np.ndarray) -> tuple[np.ndarray, int]:
        """Slide the window to include `selected` (sorted ids). Returns the missing ids (sorted) and the
        first of the consecutive rows now reserved for them; the caller fills those rows."""
        selected = self._fit(selected)
        self.history.append(selected)
        self.count[selected] += 1
        while len(self.history) > self.window or self._overflow(selected):
            self._forget(self.history.popleft())
        self._compact()
        missing = selected[self.row_of[selected] < 0]
        start = self.used
        rows = np.arange(start, start + len(missing), dtype=np.int32)
        self.index[rows] = missing
        self.row_of[missing] = rows
        self.used += len(missing)
        return missing, start

    def _fit(self, selected: np.ndarray) -> np.ndarray:
        if len(selected) <= self.capacity:
            return selected
        self.dropped += len(selected) - self.capacity
        return selected[: self.capacity]

    def _overflow(self, selected: np.ndarray) -> bool:
        """The window's union would not fit: older entries must go (never the newest)."""
        if len(self.history) <= 1:
            return False
        missing = int(np.count_nonzero(self.row_of[selected] < 0))
        stale = int(np.count_nonzero(self.count[self.index[: self.used]] == 0))
        return self.used - stale + missing > self.capacity

    def _forget(self, old: np.ndarray) -> None:
        self.count[old] -= 1

    def _compact(self) -> None:
        """Free the rows of neurons no longer in the window: move the last used rows into them."""
        live = self.count[self.index[: self.used]] > 0
        if live.all():
            return
        new_used = int(live.sum())
        freed = np.flatnonzero(~live)
        holes = freed[freed < new_used]
        movers = np.flatnonzero(live[new_used:]) + new_used
        self.row_of[self.index[freed]] = -1
        if len(holes):
            self.rows_np[holes] = self.rows_np[movers]
            self.index[holes] = self.index[movers]
            self.row_of[self.index[holes]] = holes
        self.index[new_used : self.used] = -1
        self.used = new_used

    def fill_from_disk(
        self,
        reader: FlashReader,
        block_offset: int,
        missing: np.ndarray,
        start: int,
        gap: int = 0,
        parts: list | None = None,
    ) -> None:
        """Read the missing records into rows start.. (coalescing runs, reading through gaps <= `gap` records).

        `parts` [(offset, bytes), ...] turns bundling off: each part of each record is then its own read."""
        R = self.record_bytes
        direct, spans = [], []
        for lo, hi in runs(missing, gap):  # index range [lo, hi) of `missing`
            first, last = int(missing[lo]), int(missing[hi - 1])
            dest = self.rows_np[start + lo : start + hi].reshape(-1)
            if last - first + 1 == hi - lo:  # no gap: straight into the rows
                if parts is None:
                    direct.append((block_offset + first * R, dest))
                else:
                    direct.extend(_unbundled(block_offset, R, first, dest, parts))
            else:
                spans.append((lo, hi, first, last))
        scratch = []
        for lo, hi, first, last in spans:
            buf = np.empty((last - first + 1) * R, dtype=np.uint8)
            scratch.append((lo, hi, first, buf))
            direct.append((block_offset + first * R, buf))
        reader.read(direct)
        for lo, hi, first, buf in scratch:  # keep only the wanted records of a read-through span
            rel = missing[lo:hi] - first
            self.rows_np[start + lo : start + hi] = buf.reshape(-1, R)[rel]

    def fill_from_block(self, block: np.ndarray, missing: np.ndarray, start: int) -> None:
        """Copy records from a layer block already in memory (prompt processing seeds the window)."""
        self.rows_np[start : start + len(missing)] = block[missing]

    def views(self) -> tuple[mx.array, mx.array]:
        """(rows in use (used, R) uint8, their neuron ids (used,) int32) as MLX arrays."""
        return self.matrix[: self.used], mx.array(self.index[: self.used])


def runs(ids: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """Split sorted ids into runs [lo, hi) whose neighbours are at most `gap` ids apart (gap 0: adjacent)."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) > gap + 1) + 1
    edges = np.concatenate([[0], breaks, [len(ids)]])
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def _unbundled(block_offset: int, R: int, first: int, dest: np.ndarray, parts: list[tuple[int, int]]):
    """The ablation without row-column bundling: each part of each record is its own read."""
    out = []
    for k in range(dest.nbytes // R):
        for off, size in parts:
            out.append((block_offset + (first + k) * R + off, dest[k * R + off : k * R + off + size]))
    return out


def timed_update(cache: NeuronCache, selected: np.ndarray, stats: RuntimeStats) -> tuple[np.ndarray, int]:
    t0 = time.perf_counter()
    missing, start = cache.update(selected)
    stats.mem_seconds += time.perf_counter() - t0
    return missing, start
