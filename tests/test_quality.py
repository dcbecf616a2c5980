"""The quality table: calibration on tiny bundles, the planner's choice from it, --max-loss, `mlxflash plan`,
and the activation selector."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny import make_hf_dir

import mlxflash
from mlxflash.cli import main as cli_main
from mlxflash.errors import BundleError, UsageError
from mlxflash.eval.quality import Grid, cache_need, calibrate_quality
from mlxflash.format.bundle import Bundle, update_quality
from mlxflash.format.checksums import with_digest
from mlxflash.format.quality_record import OperatingPoint, QualityTable
from mlxflash.runtime.planner import Budget, PlanRequest, parse_loss, plan, point_bytes, quality_curve
from mlxflash.runtime.reader import FlashReader
from mlxflash.runtime.stats import MaskedCounts

GRID = Grid((("gate", None), ("activation", None), ("gate", 2)), (0.25, 0.5, 1.0), (1, 2))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Calibration text that needs no shared data: this package's own source (the byte tokenizer reads any text)."""
    path = tmp_path_factory.mktemp("text") / "source.txt"
    path.write_text("\n".join(p.read_text() for p in sorted(Path(mlxflash.__file__).parent.rglob("*.py"))[:20]))
    return path


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, text):
    """A tiny 4-bit rows-layout bundle with a measured quality table; its FFN is most of it, as in real models."""
    root = tmp_path_factory.mktemp("quality")
    src = make_hf_dir(root / "src", {"intermediate_size": 4096})
    path = mlxflash.convert(src, root / "b", bits=4, group_size=32, progress=False, layout="rows")
    calibrate_quality(path, text, train_tokens=512, tokens=64, context=32, grid=GRID)
    return path


def _copy(path, tmp_path):
    return shutil.copytree(path, tmp_path / "b")


def test_calibration_measures_every_point_and_all_neurons_lose_nothing(calibrated):
    bundle = Bundle.open(calibrated)  # checksums still hold after the config was rewritten
    table = bundle.spec.quality
    assert len(table.points) == GRID.size and table.measured_on["tokens"] == 62
    for p in table.points:
        assert math.isfinite(p.nll_increase) and p.nll_increase_se >= 0
        if p.density == 1.0:  # every neuron: flash equals dense, nothing read after the first token
            assert abs(p.nll_increase) < 1e-5 and p.capacity == 1.0 and p.loaded == 0.0
        else:
            assert p.density <= p.capacity <= min(1.0, p.density * p.window) + 1e-9
            assert 0 < p.loaded <= p.density
    exact, sketch = (
        [p.selector_bytes for p in table.points if p.selector == "gate" and p.gate_bits == b] for b in (None, 2)
    )
    activation = [p.selector_bytes for p in table.points if p.selector == "activation"]
    assert sketch[0] < exact[0] and activation[0] == 2 * exact[0]  # the up rows beside the gate's


def test_cache_need_takes_the_most_demanding_layer():
    counts = [
        MaskedCounts(0, 100, np.array([10, 20, 30, 40]), np.array([5, 5, 5])),
        MaskedCounts(1, 100, np.array([50] * 4), np.array([1, 2, 3])),
    ]
    capacity, loaded = cache_need(counts)
    assert capacity == pytest.approx(0.5) and loaded == pytest.approx((0.05 + 0.02) / 2)


def _fitting_best(bundle, budget_bytes, reader):
    fits = [p for p in bundle.spec.quality.points if point_bytes(bundle, p, reader) <= budget_bytes]
    return min(fits, key=lambda p: (p.nll_increase, p.loaded)) if fits else None


def test_the_planner_picks_the_least_expected_loss_that_fits(calibrated):
    bundle = Bundle.open(calibrated)
    reader = FlashReader(bundle.ffn_path)
    costs = sorted({point_bytes(bundle, p, reader) for p in bundle.spec.quality.points})
    reader.close()
    for budget in costs[:: max(1, len(costs) // 4)]:
        budget += 1 << 20  # the runtime's reader keeps scratch buffers a bare reader does not
        model, _ = mlxflash.load(calibrated, mode="flash", memory=budget)
        try:
            chosen = model.flash.plan
            base = _fitting_best(bundle, budget, model.flash.reader)  # the point chosen, before filling the cache
            key = lambda p: (p.selector, p.gate_bits, p.window)  # noqa: E731
            assert key(chosen.expected) == key(base) and chosen.expected.density >= base.density
            assert chosen.planned_bytes <= budget and chosen.window == chosen.expected.window
            assert chosen.selector == chosen.expected.selector
            assert "expected (quality table)" in chosen.describe()
            if chosen.window == 1:  # top-k fills the rows the budget leaves over
                assert chosen.density >= chosen.expected.density
                assert model.flash.selector.top_k == min(chosen.capacity, round(chosen.density * chosen.neurons))
        finally:
            model.flash.close()


def test_max_loss_picks_the_smallest_budget_that_keeps_it(calibrated):
    bundle = Bundle.open(calibrated)
    reader = FlashReader(bundle.ffn_path)
    points = bundle.spec.quality.points
    cost = {p: point_bytes(bundle, p, reader) for p in points}
    below = [p for p in points if cost[p] < bundle.weights_bytes]  # cheaper than the whole model
    limit = max(min(below, key=cost.get).perplexity_increase, 1e-6)
    want = min(cost[p] for p in points if p.perplexity_increase <= limit)
    _, chosen = plan(bundle, Budget.of(bundle, None), PlanRequest(max_loss=limit), reader, _weights(bundle))
    reader.close()
    assert chosen.mode == "flash" and chosen.budget == want
    assert chosen.expected.perplexity_increase <= limit


def _weights(bundle):
    from mlxflash.runtime.dtypes import cast_floats

    return cast_floats(bundle.resident_weights(), mx.float32, keep_quant=True)


def test_max_loss_no_budget_meets(calibrated, tmp_path):
    path = _copy(calibrated, tmp_path)
    bundle = Bundle.open(path)
    worst = [OperatingPoint(**{**p.__dict__, "nll_increase": 0.5 + p.density}) for p in bundle.spec.quality.points]
    update_quality(bundle, QualityTable(worst, bundle.spec.quality.dense_nll))
    with pytest.raises(UsageError) as e:
        mlxflash.load(path, mode="flash", max_loss="2%")
    text = str(e.value)
    assert (
        "--max-loss 2%: no budget meets it; the best achievable is +111.7% perplexity (gate (exact), density 0.25"
        in text
        and "\n" not in text
    )
    model, _ = mlxflash.load(path, max_loss="2%")  # without --mode flash the whole model keeps any loss
    assert model.flash.mode == "resident"
    model.flash.close()


def test_a_bundle_without_a_table_plans_blind_and_says_how_to_calibrate(tmp_path, text):
    from mlxflash.runtime.train import calibrate_gate

    path = mlxflash.convert(make_hf_dir(tmp_path / "src", {"intermediate_size": 4096}), tmp_path / "b", progress=False)

    calibrate_gate(path, text, tokens=512, context=64)
    model, _ = mlxflash.load(path, memory="80%")
    try:
        note = model.flash.plan.note
        assert "no quality table in this bundle: density and window planned blind" in note
        assert f"python tools/train_predictors.py {path} --text FILE" in note
    finally:
        model.flash.close()
    with pytest.raises(UsageError, match="--max-loss needs the bundle's quality table"):
        mlxflash.load(path, max_loss="5%")


def test_parse_loss():
    assert parse_loss("2%") == pytest.approx(0.02) and parse_loss("0.5") == pytest.approx(0.005)
    for bad in ("two", "-1%", "0"):
        with pytest.raises(UsageError, match="--max-loss"):
            parse_loss(bad)


def test_plan_command_prints_the_curve(calibrated, tmp_path, capsys):
    out = tmp_path / "curve.json"
    assert cli_main(["plan", str(calibrated), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    curve = json.loads(out.read_text())
    assert curve[-1]["mode"] == "resident" and curve[-1]["expected_perplexity_increase"] == 0.0
    losses = [c["expected_nll_increase"] for c in curve[:-1]]
    assert losses == sorted(losses, reverse=True)  # each larger budget buys less loss
    budgets = [c["budget_bytes"] for c in curve]
    assert budgets == sorted(budgets)
    assert text.count("\n| ") == len(curve) + 1 and "resident (the whole model)" in text
    bundle = Bundle.open(calibrated)
    reader = FlashReader(bundle.ffn_path)
    assert [c.budget_bytes for c in quality_curve(bundle, reader)] == budgets
    reader.close()


def test_plan_command_without_a_table(tmp_path, capsys):
    path = mlxflash.convert(make_hf_dir(tmp_path / "src"), tmp_path / "b", progress=False)
    assert cli_main(["plan", str(path)]) == 1
    err = capsys.readouterr().err
    assert "no quality table in this bundle, so the planner plans blind" in err and "train_predictors.py" in err


def test_plan_plot_writes_a_png(calibrated, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curve.png"
    assert cli_main(["plan", str(calibrated), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_selector_is_refused(calibrated):
    with pytest.raises(UsageError, match="selector 'magic': expected one of predictor, gate, activation, all"):
        mlxflash.load(calibrated, mode="flash", selector="magic")


def test_a_malformed_table_is_refused_at_load(calibrated, tmp_path):
    path = _copy(calibrated, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["flash"]["quality"]["points"][0]["selector"] = "magic"
    (path / "config.json").write_text(json.dumps(with_digest(config)))  # a writer's bug, not corruption
    with pytest.raises(BundleError, match=r"flash.quality.points\[0\].selector 'magic'"):
        Bundle.open(path, verify=False)


def test_new_selectors_drop_the_table(calibrated, tmp_path, text):
    from mlxflash.runtime.train import calibrate_gate

    path = _copy(calibrated, tmp_path)
    calibrate_gate(path, text, tokens=512, context=64)
    assert Bundle.open(path).spec.quality is None


def test_activation_selector_picks_the_largest_activations(tmp_path):
    """Exact rows: the top share by |h| per token, as the dense FFN computes h."""
    path = mlxflash.convert(make_hf_dir(tmp_path / "src"), tmp_path / "b", progress=False)
    dense, _ = mlxflash.load(path, mode="resident")
    model, _ = mlxflash.load(path, mode="flash", selector="activation", density=0.25)
    try:
        x = mx.random.normal((5, 64))
        resident = dense.model.layers[1].mlp
        h = np.abs(np.array(resident._hidden(x, resident._w, None)))
        mask = np.array(model.flash.selector.select(1, x))
        assert (mask.sum(-1) == 32).all()
        kth = np.sort(h, axis=-1)[:, -32][:, None]
        np.testing.assert_array_equal(mask, h >= kth)
    finally:
        model.flash.close()
        dense.flash.close()


def test_a_budget_below_every_measured_point_names_the_smallest(calibrated):
    bundle = Bundle.open(calibrated)
    reader = FlashReader(bundle.ffn_path)
    least = min(point_bytes(bundle, p, reader) for p in bundle.spec.quality.points)
    reader.close()
    with pytest.raises(
        UsageError, match=r"is below the smallest measured operating point \(gate \(2-bit sketch\), density 0.25"
    ):
        mlxflash.load(calibrated, memory=least // 2)


def test_merging_points_into_a_table(calibrated, tmp_path, text):
    from mlxflash.eval.quality import merged

    path = _copy(calibrated, tmp_path)
    before = Bundle.open(path).spec.quality
    extra = Grid((("gate", 2),), (0.25, 0.75), (1,))  # one point re-measured, one new
    calibrate_quality(path, text, 512, 64, 32, grid=extra, merge=True)
    after = Bundle.open(path).spec.quality
    assert len(after.points) == len(before.points) + 1
    assert sum(p.density == 0.75 for p in after.points) == 1
    other = QualityTable(before.points, before.dense_nll, {**before.measured_on, "tokens": 10})
    with pytest.raises(UsageError, match="merge needs the same text, tokens and context"):
        merged(other, after)


def test_a_filled_point_interpolates_towards_the_next_measured_density():
    from mlxflash.runtime.planner import interpolated

    def point(density, nll):
        return OperatingPoint("gate", 2, density, 1, density, 100, nll, 0.01, density / 2)

    table = QualityTable([point(0.2, 1.0), point(0.4, 0.5), point(0.6, 0.1)], 3.0)
    mid = interpolated(table, table.points[0], 0.3)
    assert mid.density == 0.3 and mid.nll_increase == pytest.approx(0.75) and mid.loaded == pytest.approx(0.15)
    top = interpolated(table, table.points[2], 0.7)  # nothing denser measured: the point's own loss bounds it
    assert top.density == 0.7 and top.nll_increase == 0.1
