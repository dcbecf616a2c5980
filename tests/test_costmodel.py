"""Cost model: interpolation, prediction, planner choices, JSON round trip; a tiny real probe."""

from __future__ import annotations

import numpy as np
import pytest

from mlxflash.runtime import costmodel as cm


def flat_curve() -> cm.DiskCurve:
    # throughput doubles with chunk size and with threads: easy to interpolate by hand (log-log grid)
    chunks, threads = [4096, 8192, 16384], [1, 2, 4]
    gbps = [[0.1 * 2**i * 2**j for j in range(3)] for i in range(3)]
    return cm.DiskCurve(chunks, threads, gbps, sequential_gbps=2.0)


def test_throughput_at_grid_points_and_between():
    c = flat_curve()
    assert c.throughput(8192, 2) == pytest.approx(0.4e9)
    # halfway in log2 on both axes: mean of the four corners' bilinear blend
    assert c.throughput(4096 * 2**0.5, 2**0.5) == pytest.approx(0.1e9 * (1 + 2 + 2 + 4) / 4)


def test_throughput_clamps_outside_the_grid():
    c = flat_curve()
    assert c.throughput(1, 1) == pytest.approx(0.1e9)
    assert c.throughput(1 << 30, 64) == pytest.approx(1.6e9)


def test_throughput_is_monotone_in_chunk_despite_noise():
    c = cm.DiskCurve([4096, 8192, 16384], [1], [[0.2], [0.1], [0.3]])  # a noisy dip at 8 KiB
    assert c.throughput(8192, 1) == pytest.approx(0.2e9)


def test_predict_io_seconds():
    c = flat_curve()
    assert cm.predict_io_seconds(0, 4096, 1, c) == 0.0
    assert cm.predict_io_seconds(1e9, 16384, 4, c) == pytest.approx(1 / 1.6)


def test_gap_is_overhead_times_bandwidth():
    # t(c) = 20 us + c / 1 GB/s exactly -> gap 20 KB
    chunks = [4096 << i for i in range(6)]
    gbps = [[c / (20e-6 + c / 1e9) / 1e9] for c in chunks]
    c = cm.DiskCurve(chunks, [8], gbps)
    alpha, beta = c.overhead(8)
    assert beta == pytest.approx(chunks[-1] / (20e-6 + chunks[-1] / 1e9), rel=1e-6)
    assert cm.coalesce_gap(c, 8) == pytest.approx(alpha * beta, abs=1)
    assert 15_000 < cm.coalesce_gap(c, 8) < 25_000


def test_plan_io_picks_the_fewest_threads_near_the_best():
    c = cm.DiskCurve([32768], [1, 4, 16, 32], [[0.3, 1.0, 1.5, 1.52]])
    plan = cm.plan_io(c, 32768)
    assert plan.threads == 16 and plan.gbps == pytest.approx(1.5)
    assert cm.plan_io(c, 32768, max_threads=4).threads == 4


def test_json_round_trip(tmp_path):
    c = flat_curve()
    c.meta = {"io_mode": "O_DIRECT"}
    back = cm.DiskCurve.load(c.save(tmp_path / "curve.json"))
    assert back == c
    assert "| 4 KiB |" in back.table()
    assert cm.DiskCurve.load_or_default(tmp_path / "missing.json") is cm.REFERENCE_CURVE


def test_bad_shape_is_refused():
    with pytest.raises(ValueError):
        cm.DiskCurve([4096, 8192], [1], [[0.1]])


def test_tiny_probe_measures_something(tmp_path):
    f = cm.make_scratch(tmp_path / "scratch", 8 << 20)
    curve = cm.probe(f, chunks=[4096, 65536], threads=[1, 2], min_seconds=0.01, repeats=1)
    g = np.asarray(curve.gbps)
    assert g.shape == (2, 2) and np.all(g > 0) and curve.sequential_gbps > 0
    assert curve.meta["file_bytes"] == 8 << 20


def test_rescaled_keeps_the_shape_and_sets_the_level():
    c = flat_curve()
    r = cm.rescaled(c, 8192, 2, 0.2)  # the curve said 0.4 there: everything halves
    assert r.throughput(8192, 2) == pytest.approx(0.2e9)
    assert r.throughput(16384, 4) == pytest.approx(c.throughput(16384, 4) / 2)
    assert r.sequential_gbps == pytest.approx(1.0) and r.meta["rescaled"]["factor"] == pytest.approx(0.5)


def test_spot_check_measures_the_file_now(tmp_path):
    f = cm.make_scratch(tmp_path / "scratch", 4 << 20)
    gbps = cm.spot_check(f, 10_000, threads=2, reads=32)  # rounded up to 12 KiB reads
    assert 0 < gbps < 1000
    assert cm.spot_check(f, 8 << 20, threads=1, reads=4) > 0  # clamped to the file
    small = tmp_path / "small"
    small.write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match="smaller than one page"):
        cm.spot_check(small, 4096, threads=1)
