"""The neuron cache's bookkeeping, property-tested: rows hold exactly the window's union (with `retain`, plus
the most recently used neurons that fit), the replay used by masked evaluation agrees, the index is a
bijection onto the used rows, each row holds its neuron's record, and nothing reallocates."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxflash.format.bundle import RecordLayout
from mlxflash.runtime.cache import NeuronCache, cached_masks, runs

N, R = 40, 16
LAYOUT = RecordLayout.build([("gate.weight", "uint8", 3), ("up.weight", "float32", 2), ("down.weight", "uint16", 1)])
assert LAYOUT.nbytes == R


FIELD_BYTES = np.zeros(R, dtype=np.uint8)
for _f in LAYOUT.fields:
    FIELD_BYTES[_f.offset : _f.offset + _f.nbytes] = 1


def record(neuron: int) -> np.ndarray:
    """A distinct record per neuron (padding bytes zero, as the cache keeps fields only)."""
    return (np.full(R, neuron % 251, dtype=np.uint8) + np.arange(R, dtype=np.uint8)) * FIELD_BYTES


selections = st.lists(st.sets(st.integers(0, N - 1), max_size=N), min_size=1, max_size=25)


def _apply(cache: NeuronCache, selected: set[int]) -> np.ndarray:
    ids = np.array(sorted(selected), dtype=np.int32)
    missing, rows = cache.update(ids)
    assert np.all(np.diff(missing) > 0) and len(rows) == len(missing)
    assert np.array_equal(cache.index[rows], missing) and np.all(rows < cache.used)
    cache.write_rows(rows, np.stack([record(int(n)) for n in missing]) if len(missing) else np.zeros((0, R), np.uint8))
    return ids


def _check(cache: NeuronCache, expected_union: set[int]):
    used = cache.used
    held = cache.index[:used]
    assert set(held.tolist()) == expected_union and len(held) == len(expected_union)
    assert np.all(cache.index[used:] == -1)
    assert np.all(cache.row_of[held] == np.arange(used))  # bijection rows <-> cached neurons
    assert np.count_nonzero(cache.row_of >= 0) == used
    for row, neuron in enumerate(held):
        assert np.array_equal(cache.read_record(row), record(int(neuron)))


@settings(max_examples=150, deadline=None)
@given(seq=selections, window=st.integers(1, 6), contiguous=st.booleans())
def test_rows_hold_exactly_the_window_union(seq, window, contiguous):
    cache = NeuronCache(N, N, LAYOUT, window, contiguous=contiguous)
    pointers = {k: v.ctypes.data for k, v in cache.fields_np.items()}
    matrices = dict(cache.fields)
    for t, selected in enumerate(seq):
        _apply(cache, selected)
        _check(cache, set().union(*seq[max(0, t - window + 1) : t + 1]))
        assert {k: v.ctypes.data for k, v in cache.fields_np.items()} == pointers  # no reallocation
        assert all(cache.fields[k] is m for k, m in matrices.items())
        assert cache.dropped == 0


@settings(max_examples=150, deadline=None)
@given(seq=selections, window=st.integers(1, 6), capacity=st.integers(1, N), contiguous=st.booleans())
def test_full_cache_drops_oldest_tokens_first(seq, window, capacity, contiguous):
    cache = NeuronCache(N, capacity, LAYOUT, window, contiguous=contiguous)
    for selected in seq:
        ids = _apply(cache, selected)
        kept = set().union(*[set(h.tolist()) for h in cache.history])
        _check(cache, kept)
        assert cache.used <= capacity
        assert set(ids[:capacity].tolist()) <= kept  # the newest token is always whole (up to capacity)
        assert len(cache.history) <= window


@settings(max_examples=100, deadline=None)
@given(seq=selections, window=st.integers(1, 6), capacity=st.integers(1, N))
def test_new_neurons_take_the_freed_rows_and_contiguous_ones_the_end(seq, window, capacity):
    """New neurons fill the rows of neurons that left (a row is moved only for holes left over), so they
    move no more rows than the contiguous cache, whose new rows are always the last ones."""
    moved = {True: 0, False: 0}
    caches = {c: NeuronCache(N, capacity, LAYOUT, window, contiguous=c) for c in moved}
    for c, cache in caches.items():  # count the rows each moves
        cache._move_rows = lambda holes, movers, c=c: moved.__setitem__(c, moved[c] + len(holes))
    for selected in seq:
        ids = np.array(sorted(selected), dtype=np.int32)
        cache, moves = caches[False], moved[False]
        leaving = set(cache.index[: cache.used].tolist()) - set(ids[:capacity].tolist())
        freed = {int(cache.row_of[n]) for n in leaving}  # window 1: the rows of every neuron not selected now
        (missing, rows), (missing_c, rows_c) = cache.update(ids), caches[True].update(ids)
        assert np.array_equal(missing, missing_c)
        assert np.array_equal(rows_c, np.arange(caches[True].used - len(missing), caches[True].used))
        if window == 1 and len(missing) == len(freed):  # every new neuron takes a freed row, nothing moves
            assert set(rows.tolist()) == freed and moved[False] == moves
    assert moved[False] <= moved[True]


@given(ids=st.lists(st.integers(0, 500), unique=True).map(sorted), gap=st.integers(-1, 5))
def test_runs_cover_ids_and_respect_gap(ids, gap):
    ids = np.array(ids, dtype=np.int64)
    spans = runs(ids, gap)
    assert [i for lo, hi in spans for i in range(lo, hi)] == list(range(len(ids)))
    for lo, hi in spans:
        assert np.all(np.diff(ids[lo:hi]) <= gap + 1)
    for (_, hi), (lo, _) in zip(spans, spans[1:]):
        assert ids[lo] - ids[hi - 1] > gap + 1


@settings(max_examples=150, deadline=None)
@given(seq=selections, window=st.integers(1, 6), capacity=st.integers(1, N), contiguous=st.booleans())
def test_retain_keeps_the_window_and_the_most_recent_others(seq, window, capacity, contiguous):
    """With `retain`, rows hold the window's union plus neurons past it, as many as fit, most recent first."""
    cache = NeuronCache(N, capacity, LAYOUT, window, retain=True, contiguous=contiguous)
    pointers = {k: v.ctypes.data for k, v in cache.fields_np.items()}
    seen: set[int] = set()
    for selected in seq:
        ids = _apply(cache, selected)
        kept = set(ids[:capacity].tolist())
        seen |= kept
        window_union = set().union(*[set(h.tolist()) for h in cache.history])
        held = set(cache.index[: cache.used].tolist())
        assert window_union <= held and kept <= held
        assert cache.used == min(capacity, len(seen))  # nothing leaves while there is room
        _check(cache, held)
        others = held - window_union
        if others:  # every retained neuron was used no earlier than any neuron that left
            gone = seen - held
            assert not gone or min(cache.last_used[list(others)]) >= max(cache.last_used[list(gone)])
    assert {k: v.ctypes.data for k, v in cache.fields_np.items()} == pointers


@settings(max_examples=60, deadline=None)
@given(seq=selections, window=st.integers(1, 4), capacity=st.integers(1, N), retain=st.booleans())
def test_cached_masks_replay_the_cache(seq, window, capacity, retain):
    """Masked evaluation's replay holds, after each token, exactly what the real cache holds."""
    masks = np.zeros((1, len(seq), N), dtype=bool)
    for t, s in enumerate(seq):
        masks[0, t, sorted(s)] = True
    replay = cached_masks(masks, capacity, window, retain)
    cache = NeuronCache(N, capacity, LAYOUT, window, retain=retain)
    for t, s in enumerate(seq):
        _apply(cache, s)
        assert set(np.flatnonzero(replay[0, t]).tolist()) == set(cache.index[: cache.used].tolist())
