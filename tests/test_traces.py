"""Traces: storage round trip, width mapping, replay as a selector, generator statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxflash.runtime import traces as T


@st.composite
def traces(draw):
    layers = draw(st.integers(1, 3))
    tokens = draw(st.integers(0, 6))
    widths = [draw(st.integers(1, 64)) for _ in range(layers)]
    sel = [[draw(st.lists(st.integers(0, w - 1), max_size=w)) for w in widths] for _ in range(tokens)]
    return T.Trace.from_selections(sel, widths, source="hypothesis"), sel


@settings(max_examples=40, deadline=None)
@given(traces())
def test_round_trip(tmp_path_factory, case):
    trace, sel = case
    path = tmp_path_factory.mktemp("t") / "trace.npz"
    back = T.Trace.load(trace.save(path))
    assert back.widths == trace.widths and back.num_tokens == len(sel) and back.meta["source"] == "hypothesis"
    for t in range(len(sel)):
        for layer in range(trace.num_layers):
            got = back.token(layer, t)
            assert got.dtype == np.int32
            assert got.tolist() == sorted(set(sel[t][layer]))


def test_malformed_is_refused():
    with pytest.raises(ValueError):
        T.Trace.from_selections([[np.array([5])]], [4])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.data())
def test_width_map_is_consistent(n, m, data):
    ids = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1)))), dtype=np.int64)
    src = T.width_map(n, m)
    got = T.remap_ids(ids, n, m)
    assert got.tolist() == np.flatnonzero(np.isin(src, ids)).tolist()  # j selected iff src(j) is
    if n == m:
        assert got.tolist() == ids.tolist()


def test_width_map_preserves_density_and_scatters():
    n, m = 1536, 16384
    mapper = T.WidthMapper(n, m)
    rng = np.random.default_rng(0)
    dens = [len(mapper(np.sort(rng.choice(n, 154, replace=False)))) / m for _ in range(50)]
    assert np.mean(dens) == pytest.approx(0.1, rel=0.05)
    ids = mapper(np.array([7]))
    assert len(ids) > 5 and np.all(np.diff(ids) > 1)  # one source neuron does not become a run


def test_selector_replays_and_advances():
    trace = T.generate_trace([64, 64], tokens=3, seed=1)
    sel = T.TraceSelector(trace)
    first = [sel.select(layer, None) for layer in range(2)]
    assert sel.token == 1
    assert [a.tolist() for a in first] == [trace.token(layer, 0).tolist() for layer in range(2)]
    for _ in range(2):
        for layer in range(2):
            sel.select(layer, None)
    assert sel.select(0, None).tolist() == trace.token(0, 0).tolist()  # loops
    sel.reset()
    assert sel.token == 0


def test_selector_on_another_shape():
    trace = T.generate_trace([128] * 2, tokens=4)
    sel = T.TraceSelector(trace, num_layers=4, width=512)
    out = [sel.select(layer, None) for layer in range(4)]
    assert all(o.dtype == np.int32 and o.max() < 512 for o in out)
    assert sel.token == 1


def test_recording_selector():
    trace = T.generate_trace([32, 32], tokens=3)
    rec = T.RecordingSelector(T.TraceSelector(trace), num_layers=2, widths=[32, 32], source="replay")
    for _ in range(3):
        for layer in range(2):
            rec.select(layer, None)
    got = rec.trace()
    assert got.num_tokens == 3 and all(
        got.token(layer, t).tolist() == trace.token(layer, t).tolist() for t in range(3) for layer in range(2)
    )


def test_generator_matches_the_paper():
    stats = T.paper_stats(T.generate_trace([4096], tokens=150, seed=3))
    for key, target in T.PAPER_TARGETS.items():
        assert stats[key] == pytest.approx(target, rel=0.10), (key, stats)


def test_generator_popularity_is_a_power_law():
    trace = T.generate_trace([4096], tokens=200)
    freq = np.sort(np.bincount(trace.ids[0], minlength=4096))[::-1] / trace.num_tokens
    assert freq[0] > 0.9 and freq[len(freq) // 2] < 0.05  # a hot head and a long cold tail


def test_window_stats_shapes():
    s = T.window_stats(T.generate_trace([256], tokens=30), max_window=4)
    assert len(s["union_mean"]) == len(s["new_mean"]) == 4
    assert all(a <= b for a, b in zip(s["union_mean"], s["union_mean"][1:]))
    assert all(a >= b for a, b in zip(s["new_mean"], s["new_mean"][1:]))


def test_recording_selector_takes_masks():
    class MaskSelector:
        def select(self, layer, x):
            m = np.zeros((2, 8), dtype=bool)
            m[0, [1, 3]] = True
            m[1, [layer]] = True
            return m

    rec = T.RecordingSelector(MaskSelector(), num_layers=2, widths=[8, 8])
    for layer in range(2):
        rec.select(layer, None)
    got = rec.trace()
    assert got.num_tokens == 2
    assert got.token(0, 0).tolist() == [1, 3] and got.token(1, 1).tolist() == [1]


def test_selector_masks_for_prompts():
    trace = T.generate_trace([64], tokens=5)
    sel = T.TraceSelector(trace)
    masks = sel.select(0, np.zeros((1, 3, 16)))
    assert masks.shape == (3, 64) and masks.dtype == np.bool_
    assert np.flatnonzero(masks[2]).tolist() == trace.token(0, 2).tolist()
    assert sel.token == 3
