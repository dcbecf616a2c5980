"""tools/bench.py on tiny synthetic bundles: budgets, the drivers' math, rounds and spreads, the output."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench  # noqa: E402
import make_synthetic  # noqa: E402
from benchlib import drivers, report  # noqa: E402
from benchlib.budget import hybrid_keep, resolve_budget  # noqa: E402
from benchlib.measure import ModeResult  # noqa: E402
from benchlib.streams import Clock  # noqa: E402

from mlxflash.format.bundle import Bundle  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_synthetic.make_synthetic(
        "tiny-opt", tmp_path_factory.mktemp("b") / "opt", dtype="float32", rank=0, progress=False
    )


def test_budget_scales_per_layer(tmp_path):
    shape = {"family": "opt", "d": 64, "ffn": 1024, "layers": 8, "heads": 4, "vocab": 64, "max_pos": 32}
    out = make_synthetic.make_synthetic(shape, tmp_path / "o", layers=2, dtype="float32", rank=0, progress=False)
    b = resolve_budget(Bundle.open(out, verify=False), "50%")
    assert b.full_layers == 8 and b.layers == 2 and b.ffn_allowance > 0 and b.scaled
    assert b.budget_full == pytest.approx(b.model_bytes_full / 2, abs=1)
    # each layer gets what a layer of the full-depth model gets; embeddings and one buffer once
    per_layer = (b.budget_full - b.fixed_bytes - b.once_bytes) / 8
    assert b.budget == pytest.approx(b.fixed_bytes + b.once_bytes + 2 * per_layer)


def test_budget_uses_the_planners_parser(tiny):
    b = resolve_budget(Bundle.open(tiny, verify=False), "1MB")
    assert b.budget_full == 1e6 and not b.scaled
    with pytest.raises(Exception, match="expected a size"):
        resolve_budget(Bundle.open(tiny, verify=False), "lots")


@pytest.mark.parametrize("mode", ["naive", "hybrid", "mmap"])
def test_baselines_compute_what_resident_computes(tiny, mode):
    bundle = Bundle.open(tiny, verify=False)
    budget = resolve_budget(bundle, "90%")
    assert mode != "hybrid" or 0 < hybrid_keep(bundle, budget)[0] < bundle.spec.intermediate_size
    args = SimpleNamespace(threads=2)
    reference = drivers.DRIVERS["resident"](bundle, budget, args)
    driver = drivers.DRIVERS[mode](bundle, budget, args)
    x = mx.random.normal((1, bundle.spec.hidden_size), key=mx.random.key(3))
    for layer in range(bundle.num_layers):
        clock = Clock()
        got, want = driver.layer(layer, x, clock), reference.layer(layer, x, Clock())
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
        streamed = bundle.spec.layers[layer].neurons - (driver.keep[layer] if mode == "hybrid" else 0)
        assert clock.bytes == streamed * bundle.spec.record.nbytes


def test_aggregate_takes_medians_and_spreads():
    rounds = []
    for total, io in [(10.0, 4.0), (30.0, 6.0), (20.0, 5.0)]:
        r = ModeResult("flash", total_ms=total, io_ms=io, token_ms=[total, total])
        rounds.append(r)
    a = report.aggregate(rounds)
    assert a.total_ms == 20.0 and a.io_ms == 5.0 and a.rounds == 3
    assert a.spread["total_ms"] == [10.0, 30.0] and a.spread["io_ms"] == [4.0, 6.0]
    assert len(a.token_ms) == 6 and a.extra["round_total_ms"] == [10.0, 30.0, 20.0]


def test_bench_runs_rounds_interleaved(tiny, tmp_path):
    js = tmp_path / "b.json"
    argv = [str(tiny), "--memory", "200%", "--modes", "naive,flash", "--rounds", "2"]
    assert bench.main([*argv, "--tokens", "2", "--warmup", "1", "--json", str(js)]) == 0
    d = json.loads(js.read_text())
    assert {"cpu", "blas", "dtype", "io_mode", "load_average", "disk_curve"} <= set(d["machine"])
    modes = {m["mode"]: m for m in d["modes"]}
    for name in ("naive", "flash"):
        m = modes[name]
        assert m["skipped"] is None, m
        assert m["rounds"] == 2 and len(m["token_ms"]) == 4 and len(m["extra"]["round_total_ms"]) == 2
        lo, hi = m["spread"]["total_ms"]
        assert lo <= m["total_ms"] <= hi
    ffn = Bundle.open(tiny, verify=False).spec.ffn_bytes
    assert modes["naive"]["bytes_per_token"] == ffn
    assert modes["naive"]["speedup_vs_naive"] == pytest.approx(1.0)
    # flash caches the whole FFN at 200%: after warm-up (the paper trace's new neurons only) it reads less
    assert 0 < modes["flash"]["bytes_per_token"] < ffn
    assert modes["flash"]["transferred_per_token"] >= modes["flash"]["bytes_per_token"]


def test_common_attention_figure_replaces_each_modes_own():
    runs = []
    for mode, layer_ms, head_ms, ffn_ms in [
        ("naive", 30.0, 100.0, 900.0),
        ("hybrid", 20.0, 80.0, 700.0),
        ("flash", 40.0, 90.0, 100.0),
    ]:
        r = ModeResult(mode)
        r.attention_ms = 4 * layer_ms + head_ms
        r.compute_ms, r.total_ms = r.attention_ms + 10.0, r.attention_ms + ffn_ms
        r.token_ms = [r.total_ms]
        r.extra = {"attention_layer_ms": layer_ms, "head_ms": head_ms}
        runs.append(r)
    report.common_attention(runs, layers=4)
    common = 4 * 30.0 + 90.0  # medians of the layer and head figures
    assert [r.attention_ms for r in runs] == [common] * 3
    assert [r.total_ms for r in runs] == [common + 900.0, common + 700.0, common + 100.0]
    assert [r.token_ms[0] for r in runs] == [r.total_ms for r in runs]
    assert [r.compute_ms for r in runs] == [common + 10.0] * 3
    assert runs[2].extra["attention_measured_ms"] == 4 * 40.0 + 90.0


def test_floor_takes_the_faster_disk_figure_and_the_larger_of_io_and_compute():
    r = ModeResult("hybrid", attention_ms=50.0, compute_ms=80.0, predicted_io_ms=900.0)
    r.extra = {"predicted_io_stored_ms": 400.0}  # the spot check came in slower than the stored curve
    assert report.floor_ms(r, seq_gbps=2.0) == 50.0 + 400.0
    r.extra = {"predicted_io_stored_ms": 10.0}  # I/O below the FFN compute: compute bounds it
    assert report.floor_ms(r, seq_gbps=2.0) == 80.0
    mmap = ModeResult("mmap", attention_ms=50.0, compute_ms=60.0, transferred_per_token=2e9)
    assert report.floor_ms(mmap, seq_gbps=2.0) == pytest.approx(50.0 + 2e9 / (2.0 * report.GB) * 1e3)


def test_unknown_mode_is_refused(tiny):
    with pytest.raises(SystemExit, match="unknown"):
        bench.main([str(tiny), "--modes", "naive,warp"])


def test_bad_memory_is_refused_with_the_runtimes_message(tiny):
    with pytest.raises(SystemExit, match=r"bench: --memory 'lots': expected a size like 4GB"):
        bench.main([str(tiny), "--memory", "lots", "--modes", "naive"])


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """Wide enough that half of it holds the runtime's buffers and a useful neuron cache."""
    shape = {"family": "opt", "d": 256, "ffn": 4096, "layers": 2, "heads": 4, "vocab": 256, "max_pos": 64}
    out = tmp_path_factory.mktemp("w") / "opt"
    return make_synthetic.make_synthetic(shape, out, dtype="float32", rank=0, progress=False)


def test_flash_ablations_and_mmap(wide, tmp_path):
    """Each ablation turns one mechanism off: the window (reuse), bundling (one read per record instead of
    one per part), coalescing (reads through gaps). mmap runs under its cgroup cap where one can be made."""
    js = tmp_path / "b.json"
    modes = "mmap,flash-predictor,flash-window,flash-bundle,flash"
    args = [str(wide), "--memory", "50%", "--modes", modes, "--tokens", "2", "--warmup", "1", "--threads", "2"]
    assert bench.main([*args, "--rounds", "1", "--json", str(js)]) == 0
    d = json.loads(js.read_text())
    m = {r["mode"]: r for r in d["modes"]}
    flash = [m[k] for k in ("flash-predictor", "flash-window", "flash-bundle", "flash")]
    for r in flash:
        assert r["skipped"] is None, r
        assert r["extra"]["planned_bytes"] <= r["extra"]["memory_budget"] and r["io_mode"] == "O_DIRECT"
    predictor, window, bundle, coalesced = flash
    assert predictor["extra"]["window"] == 0 and window["extra"]["window"] >= 1
    assert window["extra"]["window"] == bundle["extra"]["window"] == coalesced["extra"]["window"]
    assert predictor["bytes_per_token"] > window["bytes_per_token"]  # the window reuses cached neurons
    assert window["bytes_per_token"] == bundle["bytes_per_token"]  # bundling reads the same records...
    assert window["reads_per_token"] == 2 * bundle["reads_per_token"]  # ...in one read, not up and down apart
    assert coalesced["reads_per_token"] < bundle["reads_per_token"]  # coalescing: fewer, larger reads
    assert coalesced["transferred_per_token"] >= bundle["transferred_per_token"]
    assert coalesced["predicted_io_ms"] > 0 and "spot_check" in coalesced["extra"]
    mmap = m["mmap"]
    if os.geteuid() != 0 or sys.platform != "linux":  # the cap needs root's cgroup memory controller
        assert "cgroup" in mmap["skipped"]
        return
    assert mmap["skipped"] is None, mmap
    assert mmap["io_mode"] == "mmap (page cache, default read-ahead)" and "memory" in mmap["note"]
    assert mmap["dram_bytes"] == d["budget"]["budget"] == predictor["extra"]["memory_budget"]
    assert mmap["total_ms"] > 0 and mmap["bytes_per_token"] == mmap["disk_bytes_per_token"]


def test_moe_bench_modes_and_floor(tmp_path):
    """bench_moe on a tiny qwen3_moe bundle: naive reads every routed expert, flash fewer, floor and
    resident none (the same experts' compute); the expected hit rate comes from the family's profile."""
    import bench_moe

    from mlxflash.format.moe import MoEBundle

    path = make_synthetic.make_synthetic("tiny-qwen3-moe", tmp_path / "moe", dtype="float32", rank=0, progress=False)
    js = tmp_path / "moe.json"
    argv = [str(path), "--memory", "60%", "--modes", "naive,flash,floor,resident", "--tokens", "3", "--warmup", "4"]
    assert bench_moe.main([*argv, "--json", str(js)]) == 0
    d = json.loads(js.read_text())
    modes = {m["mode"]: m for m in d["modes"]}
    b = d["budget"]
    fields = sum(f.nbytes for f in MoEBundle.open(path).spec.record.fields)  # what a read of an expert moves
    routed = b["layers"] * 2 * fields  # tiny-qwen3-moe routes 2 experts per layer
    assert modes["naive"]["bytes_per_token"] == routed and modes["naive"]["hit_rate"] == 0
    assert 0 <= modes["flash"]["bytes_per_token"] < routed and 0 < modes["flash"]["slots"] < b["experts"]
    for name in ("floor", "resident"):
        assert modes[name]["bytes_per_token"] == 0 and modes[name]["hit_rate"] == 1.0
    assert 0 < d["trace"]["reuse_within8"] <= 1
