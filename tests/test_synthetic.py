"""Synthetic bundles: a tiny custom shape written through the real writer loads and verifies, and its
selector record is the one the planner reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mlxflash
from mlxflash.format.bundle import Bundle
from mlxflash.format.selector_record import SelectionStats
from mlxflash.runtime import traces

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import make_synthetic  # noqa: E402


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_synthetic.py"), *args], capture_output=True, text=True
    )


def test_cli_tiny_opt_custom_shape(tmp_path):
    out = tmp_path / "opt"
    r = run_tool(
        "--shape",
        "opt-125m",
        "--layers",
        "2",
        "--hidden-size",
        "64",
        "--ffn-size",
        "256",
        "--heads",
        "4",
        "--vocab-size",
        "300",
        "--rank",
        "16",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    b = Bundle.open(out, verify=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "opt" and cfg["ffn_dim"] == 256 and cfg["num_hidden_layers"] == 2
    assert cfg["synthetic"]["full_layers"] == 12
    assert b.num_layers == 2 and not b.spec.gated and b.spec.activation == "relu"
    assert b.spec.dtype == "float16"
    sel = b.spec.selector
    assert sel.kind == "predictor" and sel.rank == [16, 16] and sel.predictor_threshold == [0.5, 0.5]
    # the statistics are the paper-calibrated trace's at this width, where the planner reads them
    paper = traces.window_stats(traces.generate_trace([256], tokens=48), max_window=8)
    assert sel.stats == {"predictor": SelectionStats(paper["density"], tuple(paper["union_mean"]))}
    assert sel.stats["predictor"].window_union[0] == sel.stats["predictor"].density  # k = 1: one token's set
    w = b.resident_weights()
    assert w["model.embed_positions.weight"].shape == (2048 + 2, 64)
    assert w["model.layers.1.mlp.predictor.b.weight"].shape == (256, 16)
    # one number per neuron: the up bias stays resident, exactly the generated values, not in the records
    rand = make_synthetic.Rand(0, mx.float16)
    assert b.spec.record.names() == ["up.weight", "down.weight"]
    for key, seed_name, n in (("up_bias", "mlp.up_bias", 256), ("down_bias", "down_bias", 64)):
        generated = rand.normal(f"model.layers.1.{seed_name}", (n,))
        assert mx.array_equal(w[f"model.layers.1.mlp.{key}"], generated).item(), key


def test_synthetic_bundle_plans_its_window_from_its_statistics(tmp_path):
    """At a 50% budget the window is the largest whose recorded union fits the cache (not a default)."""
    shape = {"family": "opt", "d": 256, "ffn": 4096, "layers": 2, "heads": 4, "vocab": 256, "max_pos": 64}
    out = make_synthetic.make_synthetic(shape, tmp_path / "s", dtype="float32", rank=16, progress=False)
    model, _ = mlxflash.load(out, memory="50%", threads=1)
    plan = model.flash.plan
    union = Bundle.open(out).spec.selector.stats["predictor"].window_union
    assert plan.mode == "flash" and plan.selector == "predictor"
    assert plan.density == pytest.approx(0.1001, abs=1e-4)  # the trace's, recorded in the bundle
    assert plan.window == 6 and model.flash.options.window == 6
    assert union[5] * 4096 <= plan.capacity < union[6] * 4096  # k = 6 fits the cache, k = 7 does not
    model.flash.close()


@pytest.mark.parametrize("bits", [None, 4])
def test_tiny_llama(tmp_path, bits):
    out = make_synthetic.make_synthetic(
        "tiny-llama", tmp_path / "l", dtype="float32", bits=bits, group_size=32, rank=0, progress=False
    )
    b = Bundle.open(out, verify=True)
    assert b.spec.gated and b.spec.selector is None and b.spec.intermediate_size == 128
    assert (b.spec.quantization is not None) == (bits is not None)
    if bits:
        assert "model.layers.0.mlp.down_scales" in b.resident_weights()


def test_fixed_seed_is_deterministic(tmp_path):
    a = make_synthetic.make_synthetic("tiny-opt", tmp_path / "a", rank=8, progress=False)
    b = make_synthetic.make_synthetic("tiny-opt", tmp_path / "b", rank=8, progress=False)
    assert (a / "ffn.bin").read_bytes() == (b / "ffn.bin").read_bytes()
    assert Bundle.open(a).spec.layers[0].sha256 == Bundle.open(b).spec.layers[0].sha256
