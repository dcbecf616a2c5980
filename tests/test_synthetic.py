"""Synthetic bundles: a tiny custom shape written through the real writer loads and verifies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlxflash.format.bundle import Bundle

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
    assert sel["kind"] == "predictor" and sel["rank"] == [16, 16] and sel["predictor_threshold"] == [0.5, 0.5]
    assert 0.09 < sel["density"] < 0.11 and len(sel["window_union"]) == 8
    w = b.resident_weights()
    assert w["model.embed_positions.weight"].shape == (2048 + 2, 64)
    assert w["model.layers.1.mlp.predictor.b.weight"].shape == (256, 16)
    assert w["model.layers.0.mlp.down_bias"].shape == (64,)
    # the writer keeps the up bias in the record or resident (one number per neuron)
    assert "up.bias" in b.spec.record.names() or w["model.layers.0.mlp.up_bias"].shape == (256,)


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
