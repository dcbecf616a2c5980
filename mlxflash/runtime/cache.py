"""The DRAM neuron cache of one layer (PAPER.md, "DRAM memory management").

The cache's matrices (one per record field) are allocated once (aligned, touched) and never
reallocated. `index[row]` is the neuron in a row, `used` the number of rows in use: rows [0, used)
hold exactly the union of the last `window` tokens' selections, or with `retain` that union plus the
most recently used neurons past the window while there is room (they cost no read and only add exact
terms). New neurons take the rows of the neurons that left; freed rows they do not fill get the last
used rows moved in, and what is left over is appended (`contiguous`: always appended, every freed row
filled by a move; the paper's preallocation, which the overlap needs). Missing records are
read whole (one read per run of adjacent neurons). Where every field is whole pages (float records of
wide models), the read's buffers are the fields' rows themselves: nothing is copied. Otherwise the
records land in an aligned staging buffer of fixed size and are split into the field matrices: a copy
of the new rows only. Either way the FFN multiplies with contiguous matrices and never copies the
cached rows.
"""

from __future__ import annotations

import time
from collections import deque

import mlx.core as mx
import numpy as np

from ..format.bundle import RecordLayout, mx_dtype
from .reader import DIRECT_ALIGN, FlashReader, aligned_buffer
from .stats import RuntimeStats

# Where reads land before the split into field matrices; counted in the plan. Each round through it is a
# barrier (the reader's threads woken, every read waited for): at OPT-6.7B's shape a token's ~13 MB of
# misses a layer took 4 rounds of 4 MiB, and one round of 32 MiB made the FFN part 21% faster.
STAGING_BYTES = 32 << 20
SPLIT_TEMP_BYTES = 1 << 20  # records read through gaps are skipped by a gather: its copy, a piece at a time


def staging_bytes(neurons: int, record_bytes: int) -> int:
    """The staging buffer's size: STAGING_BYTES, or an eighth of a layer's records if that is less
    (small models: a budget's few MB are better spent on cached neurons)."""
    return min(STAGING_BYTES, max(record_bytes, neurons * record_bytes // 8))


class CacheIndex:
    """The cache's bookkeeping without the data: which neuron is in which row. `index[row]` is the
    neuron in a row, `row_of` its inverse, `used` the rows in use. Also replays a cache for masked
    evaluation (`cached_masks`)."""

    def __init__(self, neurons: int, capacity: int, window: int, retain: bool = False, contiguous: bool = False):
        if capacity < 1 or window < 1:
            raise ValueError(f"cache capacity {capacity} and window {window} must be >= 1")
        self.neurons, self.capacity = neurons, min(capacity, neurons)
        self.window, self.retain = window, retain
        self.contiguous = contiguous  # new neurons always get consecutive rows at the end (see update)
        self.index = np.full(self.capacity, -1, dtype=np.int32)  # row -> neuron
        self.row_of = np.full(neurons, -1, dtype=np.int32)  # neuron -> row
        self.count = np.zeros(neurons, dtype=np.int32)  # how many window entries hold the neuron
        self.last_used = np.zeros(neurons, dtype=np.int64)  # the update that last selected the neuron
        self.tick = 0
        self.used = 0
        self.history: deque[np.ndarray] = deque()
        self.dropped = 0  # selected neurons left out because the cache was full

    def clear(self) -> None:
        """Forget every cached neuron (the memory stays allocated)."""
        self.index[:] = -1
        self.row_of[:] = -1
        self.count[:] = 0
        self.last_used[:] = 0
        self.used = 0
        self.history.clear()

    def bookkeeping(self) -> CacheIndex:
        """A copy of the bookkeeping alone (no data), to replay from the cache's current state."""
        out = CacheIndex(self.neurons, self.capacity, self.window, self.retain, self.contiguous)
        for name in ("index", "row_of", "count", "last_used"):
            getattr(out, name)[:] = getattr(self, name)
        out.tick, out.used, out.dropped = self.tick, self.used, self.dropped
        out.history = deque(self.history)
        return out

    def update(self, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slide the window to include `selected` (sorted ids). Returns the missing ids (sorted) and the
        rows now reserved for them, in the same order; the caller fills those rows. New neurons take the
        rows of neurons that left the window first (no copies), then rows at the end; with `contiguous`
        they take consecutive rows at the end, the last rows moved into the holes."""
        selected = self._fit(selected)
        self.tick += 1
        self.history.append(selected)
        self.count[selected] += 1
        self.last_used[selected] = self.tick
        while len(self.history) > self.window or self._overflow(selected):
            self._forget(self.history.popleft())
        missing = selected[self.row_of[selected] < 0]
        rows = self._free_rows(len(missing))
        self.index[rows] = missing
        self.row_of[missing] = rows
        return missing, rows

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

    def _free_rows(self, incoming: int) -> np.ndarray:
        """Free the rows of neurons no longer in the window (with `retain`: only as many as `incoming`
        new rows need, least recently used first) and return `incoming` rows for the new neurons. Rows
        [0, used) stay exactly the cached ones: holes the new neurons do not fill are filled by moving
        the last rows into them."""
        stale = np.flatnonzero(self.count[self.index[: self.used]] == 0)
        if self.retain:
            order = np.argsort(self.last_used[self.index[stale]], kind="stable")
            stale = np.sort(stale[order[: max(0, self.used + incoming - self.capacity)]])
        self.row_of[self.index[stale]] = -1
        self.index[stale] = -1
        reuse = 0 if self.contiguous else min(incoming, len(stale))
        keep_used = self.used - len(stale) + reuse  # rows [0, keep_used) must end up held
        new_used = keep_used + incoming - reuse
        rows = np.concatenate([stale[:reuse], np.arange(keep_used, new_used)]).astype(np.int32)  # holes, then the end
        gaps = stale[reuse:]
        gaps = gaps[gaps < keep_used]
        movers = np.flatnonzero(self.index[keep_used : self.used] >= 0) + keep_used
        if len(gaps):
            self._move_rows(gaps, movers)
            self.index[gaps] = self.index[movers]
            self.row_of[self.index[gaps]] = gaps
        self.index[keep_used : self.used] = -1
        self.used = new_used
        return rows

    def _move_rows(self, holes: np.ndarray, movers: np.ndarray) -> None:
        """Data caches copy rows `movers` into rows `holes`; the bookkeeping alone has nothing to move."""


def cached_masks(
    masks: np.ndarray, capacity: int, window: int, retain: bool, start: CacheIndex | None = None
) -> np.ndarray:
    """masks (B, T, n) of selections -> (B, T, n): the neurons a cache holds after each token, replayed
    token by token (masked evaluation computes what stepwise decoding would). Where every window's union
    fits the cache and nothing is retained, that is the union of the last `window` selections, computed
    at once; otherwise the cache's own bookkeeping is replayed."""
    if start is not None and not start.history:
        start = None
    if not retain and start is None:
        union = window_unions(masks, window)
        if union.shape[1] == 0 or int(union.sum(axis=-1).max()) <= min(capacity, masks.shape[-1]):
            return union
    out = np.zeros_like(masks, dtype=bool)
    for b in range(masks.shape[0]):  # each row continues from `start` (the cache as the prompt found it)
        index = CacheIndex(masks.shape[-1], capacity, window, retain) if start is None else start.bookkeeping()
        for t in range(masks.shape[1]):
            index.update(np.flatnonzero(masks[b, t]).astype(np.int32))
            out[b, t, index.index[: index.used]] = True
    return out


def window_unions(masks: np.ndarray, window: int) -> np.ndarray:
    """masks (B, T, n) -> (B, T, n): at each position the union of that token's selection and the
    window - 1 before it (fewer at the start)."""
    counts = np.cumsum(masks, axis=1, dtype=np.int32)  # (B, T, n) selections so far
    before = np.zeros_like(counts)
    before[:, window:] = counts[:, :-window]
    return counts - before > 0


class NeuronCache(CacheIndex):
    """Per field of the record (gate.weight, up.scales, ..., down.weight) one matrix of `capacity` rows,
    so the FFN multiplies with contiguous prefixes and never copies the cache. Records arrive whole
    (row-column bundling: one read per run of neurons) and are split into the field matrices."""

    def __init__(
        self, neurons: int, capacity: int, layout: RecordLayout, window: int, retain: bool = False, contiguous=False
    ):
        super().__init__(neurons, capacity, window, retain, contiguous)
        self.layout, self.record_bytes = layout, layout.nbytes
        self.fields: dict[str, mx.array] = {}  # name -> (capacity, count) MLX matrix
        self.fields_np: dict[str, np.ndarray] = {}  # the same memory, as (capacity, nbytes) uint8
        for f in layout.fields:
            flat, flat_np = aligned_buffer(self.capacity * f.nbytes)
            self.fields[f.name] = flat.view(mx_dtype(f.dtype)).reshape(self.capacity, f.count)
            self.fields_np[f.name] = flat_np.reshape(self.capacity, f.nbytes)
        self.pieces = record_pieces(layout)  # None: records go through the staging buffer

    def _move_rows(self, holes: np.ndarray, movers: np.ndarray) -> None:
        for rows in self.fields_np.values():
            rows[holes] = rows[movers]

    def write_rows(self, rows: np.ndarray | slice, records: np.ndarray) -> None:
        """Split whole records (m, R) uint8 into the field matrices at rows `rows` (any order)."""
        for f in self.layout.fields:
            self.fields_np[f.name][rows] = records[:, f.offset : f.offset + f.nbytes]

    def read_record(self, row: int) -> np.ndarray:
        """Row `row` as a whole record (R,) uint8 (tests, inspection)."""
        out = np.zeros(self.record_bytes, dtype=np.uint8)
        for f in self.layout.fields:
            out[f.offset : f.offset + f.nbytes] = self.fields_np[f.name][row]
        return out

    _staging: tuple | None = None  # shared by all layers' caches (one fill at a time), allocated once

    def _stage(self, nbytes: int) -> np.ndarray:
        cls = NeuronCache
        if cls._staging is None or cls._staging[1].nbytes < nbytes:
            cls._staging = aligned_buffer(max(nbytes, staging_bytes(self.neurons, self.record_bytes)))
        return cls._staging[1][:nbytes]

    def fill_from_disk(
        self,
        reader: FlashReader,
        block_offset: int,
        missing: np.ndarray,
        rows: np.ndarray,
        gap: int = 0,
        parts: list | None = None,
    ) -> None:
        """Read the missing records and put them in `rows` (one per missing id). Adjacent records are one read; runs
        with gaps of at most `gap` records are read through. `parts` [(offset, bytes), ...] turns
        bundling off: each part of each record is then its own read (the ablation). Reads land in a
        staging buffer of STAGING_BYTES, in as many rounds as it takes, unless the record's fields are
        whole pages: then each field lands in its row directly (no staging, no split, one round)."""
        if self.pieces is not None and parts is None:
            reader.scatter(self._in_place_runs(block_offset, missing, rows, gap))
            return
        limit = max(1, staging_bytes(self.neurons, self.record_bytes) // self.record_bytes)  # records per round
        batch, extent = [], 0
        for lo, hi in _bounded(runs(missing, gap), missing, limit):
            size = int(missing[hi - 1] - missing[lo]) + 1
            if batch and extent + size > limit:
                self._fill_round(reader, block_offset, missing, rows, batch, parts)
                batch, extent = [], 0
            batch.append((lo, hi))
            extent += size
        if batch:
            self._fill_round(reader, block_offset, missing, rows, batch, parts)

    def _in_place_runs(self, block_offset: int, missing: np.ndarray, rows: np.ndarray, gap: int) -> list:
        """(offset, buffers) per run of records: each missing record's fields are views of its rows,
        padding and records read through go to a discard buffer."""
        R = self.record_bytes
        discard = _discard(max(n for _, n in self.pieces))
        skip = [discard[:n] for _, n in self.pieces]
        out = []
        for lo, hi in runs(missing, gap):
            first, bufs, k = int(missing[lo]), [], lo
            for neuron in range(first, int(missing[hi - 1]) + 1):
                if missing[k] == neuron:
                    row = int(rows[k])
                    bufs += [self.fields_np[name][row] if name else discard[:n] for name, n in self.pieces]
                    k += 1
                else:
                    bufs += skip
            out.append((block_offset + first * R, bufs))
        return out

    def _fill_round(self, reader, block_offset: int, missing: np.ndarray, rows: np.ndarray, spans: list, parts) -> None:
        """One round of reads: the runs `spans` (consecutive in `missing`) through the staging buffer."""
        R = self.record_bytes
        sizes = [int(missing[hi - 1] - missing[lo]) + 1 for lo, hi in spans]
        staging = self._stage(sum(sizes) * R).reshape(-1, R)
        first_index = spans[0][0]
        reads, base = [], 0
        wanted = np.empty(spans[-1][1] - first_index, dtype=np.int64)  # staging row of each missing record
        for (lo, hi), size in zip(spans, sizes):
            first = int(missing[lo])
            dest = staging[base : base + size].reshape(-1)
            reads.extend(
                [(block_offset + first * R, dest)] if parts is None else _unbundled(block_offset, R, first, dest, parts)
            )
            wanted[lo - first_index : hi - first_index] = base + missing[lo:hi] - first
            base += size
        reader.read(reads)
        rows = rows[first_index : first_index + len(wanted)]
        if base == len(wanted):  # nothing read through: the records are the staging's first rows
            self.write_rows(_as_slice(rows), staging[: len(wanted)])
            return
        step = max(1, SPLIT_TEMP_BYTES // R)  # gathering the wanted records copies them: a bounded piece at a time
        for lo in range(0, len(wanted), step):
            self.write_rows(_as_slice(rows[lo : lo + step]), staging[wanted[lo : lo + step]])

    def views(self) -> tuple[dict[str, mx.array], mx.array]:
        """The fields of the rows in use, {name: (used, count)} (contiguous, no copy), and their neuron ids."""
        return {name: m[: self.used] for name, m in self.fields.items()}, mx.array(self.index[: self.used])


def record_pieces(layout: RecordLayout) -> list[tuple[str | None, int]] | None:
    """The record in file order as (field name, bytes), None for padding, when every piece is a whole
    number of DIRECT_ALIGN bytes (float records of wide models): reads can then land in the cache's
    field rows, which are as aligned. Else None."""
    pieces, pos = [], 0
    for f in sorted(layout.fields, key=lambda f: f.offset):
        if f.offset > pos:
            pieces.append((None, f.offset - pos))
        pieces.append((f.name, f.nbytes))
        pos = f.offset + f.nbytes
    if layout.nbytes > pos:
        pieces.append((None, layout.nbytes - pos))
    return pieces if all(n % DIRECT_ALIGN == 0 for _, n in pieces) else None


_DISCARD: list = []  # one aligned buffer for bytes read and not kept, shared by every cache


def _discard(nbytes: int) -> np.ndarray:
    if not _DISCARD or _DISCARD[0][1].nbytes < nbytes:
        _DISCARD[:] = [aligned_buffer(nbytes)]
    return _DISCARD[0][1]


def runs(ids: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """Split sorted ids into runs [lo, hi) whose neighbours are at most `gap` ids apart (gap 0: adjacent)."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) > gap + 1) + 1
    edges = np.concatenate([[0], breaks, [len(ids)]])
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def _bounded(spans: list[tuple[int, int]], ids: np.ndarray, limit: int):
    """Cut runs [lo, hi) of sorted `ids` whose extent (last id - first id + 1) exceeds `limit`."""
    for lo, hi in spans:
        while ids[hi - 1] - ids[lo] + 1 > limit:
            cut = lo + int(np.searchsorted(ids[lo:hi], ids[lo] + limit))
            yield lo, cut
            lo = cut
        yield lo, hi


def _unbundled(block_offset: int, R: int, first: int, dest: np.ndarray, parts: list[tuple[int, int]]):
    """The ablation without row-column bundling: each part of each record is its own read."""
    out = []
    for k in range(dest.nbytes // R):
        for off, size in parts:
            out.append((block_offset + (first + k) * R + off, dest[k * R + off : k * R + off + size]))
    return out


def timed_update(cache: NeuronCache, selected: np.ndarray, stats: RuntimeStats) -> tuple[np.ndarray, np.ndarray]:
    t0 = time.perf_counter()
    missing, rows = cache.update(selected)
    stats.mem_seconds += time.perf_counter() - t0
    return missing, rows


def _as_slice(rows: np.ndarray) -> np.ndarray | slice:
    """Consecutive rows as a slice (a plain copy instead of a scatter)."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows
