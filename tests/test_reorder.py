"""Reordering neurons on disk: the model's output is unchanged; frequency order gives fewer, longer reads."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import make_synthetic  # noqa: E402

from mlxflash.format.bundle import Bundle, RecordLayout  # noqa: E402
from mlxflash.loader import load  # noqa: E402
from mlxflash.runtime import reorder, traces  # noqa: E402


def decode(bundle: Path, tokens: list[int], **kw) -> np.ndarray:
    model, _ = load(bundle, **kw)
    cache = make_prompt_cache(model)
    out = [np.asarray(model(mx.array([[t]]), cache=cache)[0, -1]) for t in tokens]
    model.flash.close()
    return np.stack(out)


@pytest.mark.parametrize(
    "shape,bits,g", [("tiny-llama", None, 1), ("tiny-opt", None, 1), ("tiny-llama", 4, 32), ("tiny-llama", 8, 1)]
)
def test_reordered_bundle_computes_the_same(tmp_path, shape, bits, g):
    """Float bundles and the 8-bit down quantized per neuron (rows) move neuron by neuron; a grouped
    4-bit down in whole groups."""
    src = make_synthetic.make_synthetic(
        shape, tmp_path / "a", dtype="float32", bits=bits, group_size=32, progress=False
    )
    bundle = Bundle.open(src)
    assert reorder.group_size(bundle) == g
    rng = np.random.default_rng(0)
    perms = []
    for b in bundle.spec.layers:
        groups = rng.permutation(b.neurons // g)
        perms.append((groups[:, None] * g + np.arange(g)).reshape(-1))
    out = reorder.reorder_bundle(bundle, perms, tmp_path / "b", {"method": "random (test)"})
    moved = Bundle.open(out)  # checksums verified
    assert moved.config["neuron_order"]["method"] == "random (test)"
    first = np.fromfile(moved.ffn_path, np.uint8, moved.spec.record.nbytes, offset=moved.spec.layers[0].offset)
    old = np.fromfile(
        bundle.ffn_path,
        np.uint8,
        bundle.spec.record.nbytes,
        offset=bundle.spec.layers[0].offset + perms[0][0] * bundle.spec.record.nbytes,
    )
    assert np.array_equal(first, old) and perms[0][0] != 0
    tokens = [3, 1, 4, 1, 5, 9]
    dense = decode(src, tokens, mode="resident")
    np.testing.assert_allclose(decode(out, tokens, mode="resident"), dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decode(out, tokens, mode="flash", selector="all"), dense, rtol=1e-5, atol=1e-5)
    if bundle.spec.selector:  # the predictors moved with their neurons: same choices, renumbered
        x = mx.random.normal((1, bundle.spec.hidden_size), key=mx.random.key(0))
        before = np.asarray(bundle.resident_weights()["model.layers.0.mlp.predictor.b.weight"])
        after = np.asarray(moved.resident_weights()["model.layers.0.mlp.predictor.b.weight"])
        assert np.array_equal(after, before[perms[0]]) and x.shape[0] == 1


def test_quantized_bundles_move_whole_groups(tmp_path):
    src = make_synthetic.make_synthetic(
        "tiny-llama", tmp_path / "a", dtype="float32", bits=4, group_size=32, progress=False
    )
    bundle = Bundle.open(src)
    perms = [np.roll(np.arange(b.neurons), 1) for b in bundle.spec.layers]
    with pytest.raises(ValueError, match="whole groups of 32"):
        reorder.reorder_bundle(bundle, perms, tmp_path / "b", {})
    assert not (tmp_path / "b").exists()


def test_frequency_order_makes_fewer_longer_reads():
    widths = [2048]
    trace = traces.generate_trace(widths, 40, seed=1)  # power-law popularity, scattered ids
    perm = reorder.frequency_order(trace, 0, widths[0])
    assert sorted(perm.tolist()) == list(range(widths[0]))
    counts = np.bincount(trace.ids[0], minlength=widths[0])
    assert np.all(np.diff(counts[perm]) <= 0)  # hottest first
    moved = reorder.permute_trace(trace, [perm])
    assert [len(moved.token(0, t)) for t in range(5)] == [len(trace.token(0, t)) for t in range(5)]
    kw = {"record_bytes": 1024, "capacity": [widths[0]], "window": 4}
    before, after = reorder.read_stats(trace, **kw), reorder.read_stats(moved, **kw)
    assert after.bytes_used_per_token == before.bytes_used_per_token
    assert after.reads_per_token < before.reads_per_token
    assert after.transferred_over_used < before.transferred_over_used


def test_page_stride_pads_only_where_it_is_cheap():
    from mlxflash.format.bundle import page_stride

    # the 1.5B's 3,648-byte records take a page; 1,008 a quarter; 1,080 would need half a page (+90%): kept
    assert [page_stride(n) for n in (3648, 1008, 1080, 6912, 49152, 240)] == [4096, 1024, 1080, 6912, 49152, 256]


def test_page_fitted_records_compute_the_same_and_move_fewer_bytes(tmp_path):
    src = make_synthetic.make_synthetic(
        "tiny-llama", tmp_path / "a", dtype="float32", bits=8, group_size=32, progress=False
    )
    fitted = Bundle.open(src).spec.record  # the converter fits pages: 240 bytes of fields in 256
    assert fitted.nbytes == 256 and fitted.field_bytes == 240
    perms = [np.arange(b.neurons) for b in Bundle.open(src).spec.layers]
    plain = RecordLayout.build(fitted.parts())
    src = reorder.reorder_bundle(Bundle.open(src), perms, tmp_path / "plain", {"method": "none"}, plain)
    bundle = Bundle.open(src)
    assert bundle.spec.record.nbytes == 240 and reorder.page_fitted(bundle.spec.record) == fitted
    out = reorder.reorder_bundle(bundle, perms, tmp_path / "b", {"method": "none"}, fitted)
    assert Bundle.open(out).spec.record.nbytes == fitted.nbytes
    tokens = [3, 1, 4, 1, 5, 9]
    dense = decode(src, tokens, mode="resident")
    np.testing.assert_allclose(decode(out, tokens, mode="flash", selector="all"), dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decode(out, tokens, mode="naive"), dense, rtol=1e-5, atol=1e-5)
    widths = [b.neurons for b in bundle.spec.layers]
    trace = traces.generate_trace(widths, 30, seed=2)
    kw = {"capacity": widths, "window": 1, "used_bytes": fitted.field_bytes}
    plain = reorder.read_stats(trace, bundle.spec.record.nbytes, **kw)
    padded = reorder.read_stats(trace, fitted.nbytes, **kw)
    assert padded.bytes_used_per_token == plain.bytes_used_per_token
    assert padded.transferred_over_used < plain.transferred_over_used
