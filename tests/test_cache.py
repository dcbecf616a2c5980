"""The neuron cache's bookkeeping, property-tested: rows hold exactly the window's union, the index is a
bijection onto the used rows, each row holds its neuron's record, and nothing reallocates."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxflash.cache import NeuronCache, runs

N, R = 40, 16


def record(neuron: int) -> np.ndarray:
    return np.full(R, neuron % 251, dtype=np.uint8) + np.arange(R, dtype=np.uint8)


selections = st.lists(st.sets(st.integers(0, N - 1), max_size=N), min_size=1, max_size=25)


def _apply(cache: NeuronCache, selected: set[int]) -> np.ndarray:
    ids = np.array(sorted(selected), dtype=np.int32)
    missing, start = cache.update(ids)
    assert np.all(np.diff(missing) > 0)
    for k, neuron in enumerate(missing):  # what a read would put there
        cache.rows_np[start + k] = record(int(neuron))
    return ids


def _check(cache: NeuronCache, expected_union: set[int]):
    used = cache.used
    held = cache.index[:used]
    assert set(held.tolist()) == expected_union and len(held) == len(expected_union)
    assert np.all(cache.index[used:] == -1)
    assert np.all(cache.row_of[held] == np.arange(used))  # bijection rows <-> cached neurons
    assert np.count_nonzero(cache.row_of >= 0) == used
    for row, neuron in enumerate(held):
        assert np.array_equal(cache.rows_np[row], record(int(neuron)))


@settings(max_examples=150, deadline=None)
@given(seq=selections, window=st.integers(1, 6))
def test_rows_hold_exactly_the_window_union(seq, window):
    cache = NeuronCache(N, N, R, window)
    pointer = cache.rows_np.ctypes.data
    matrix = cache.matrix
    for t, selected in enumerate(seq):
        _apply(cache, selected)
        _check(cache, set().union(*seq[max(0, t - window + 1) : t + 1]))
        assert cache.rows_np.ctypes.data == pointer and cache.matrix is matrix  # no reallocation
        assert cache.dropped == 0


@settings(max_examples=150, deadline=None)
@given(seq=selections, window=st.integers(1, 6), capacity=st.integers(1, N))
def test_full_cache_drops_oldest_tokens_first(seq, window, capacity):
    cache = NeuronCache(N, capacity, R, window)
    for selected in seq:
        ids = _apply(cache, selected)
        kept = set().union(*[set(h.tolist()) for h in cache.history])
        _check(cache, kept)
        assert cache.used <= capacity
        assert set(ids[:capacity].tolist()) <= kept  # the newest token is always whole (up to capacity)
        assert len(cache.history) <= window


@given(ids=st.lists(st.integers(0, 500), unique=True).map(sorted), gap=st.integers(-1, 5))
def test_runs_cover_ids_and_respect_gap(ids, gap):
    ids = np.array(ids, dtype=np.int64)
    spans = runs(ids, gap)
    assert [i for lo, hi in spans for i in range(lo, hi)] == list(range(len(ids)))
    for lo, hi in spans:
        assert np.all(np.diff(ids[lo:hi]) <= gap + 1)
    for (_, hi), (lo, _) in zip(spans, spans[1:]):
        assert ids[lo] - ids[hi - 1] > gap + 1
