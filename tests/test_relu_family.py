"""ReLU-family gated FFNs at their real sparsity: ProSparse's FATReLU (ReLU with a threshold on the gate,
Llama-2 architecture) and TurboSparse's dReLU (ReLU on gate and up), tiny random configs: conversion,
the math against a hand computation, exact zeros, oracle flash equal to dense, and the predictor trained
on (and selecting) the non-zero set."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_flash import TOKENS, decode_logits, oracle
from tiny import TINY, make_hf_dir, tiny_weights

import mlxflash
from mlxflash.errors import ConvertError
from mlxflash.format.bundle import Bundle

CONFIGS = {
    "prosparse": {"hidden_act": "fatrelu", "hidden_act_param": 2.0},
    "turbosparse": {"hidden_act": "drelu"},
}


@pytest.fixture(scope="module")
def sparse_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("relu-family")
    return {
        name: mlxflash.convert(make_hf_dir(root / f"{name}-src", config), root / name, progress=False)
        for name, config in CONFIGS.items()
    }


def _by_hand(name: str, x: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(h, y) of one layer's FFN from the source weights, in numpy."""
    w = {k: np.array(v) for k, v in tiny_weights({**TINY, **CONFIGS[name]}).items() if f"layers.{layer}.mlp" in k}
    gate, up = (x @ w[f"model.layers.{layer}.mlp.{p}_proj.weight"].T for p in ("gate", "up"))
    if name == "prosparse":
        h = np.where(gate > 2.0, gate, 0.0) * up
    else:
        h = np.maximum(gate, 0) * np.maximum(up, 0)
    return h, h @ w[f"model.layers.{layer}.mlp.down_proj.weight"].T


@pytest.mark.parametrize("name", list(CONFIGS))
def test_relu_family_math_and_sparsity(sparse_bundles, name):
    spec = Bundle.open(sparse_bundles[name]).spec
    assert spec.activation == CONFIGS[name]["hidden_act"] and spec.gated
    assert spec.activation_threshold == CONFIGS[name].get("hidden_act_param", 0.0)
    model, _ = mlxflash.load(sparse_bundles[name], mode="resident")
    try:
        x = np.random.default_rng(0).normal(size=(16, TINY["hidden_size"])).astype(np.float32)
        ffn = model.model.layers[1].mlp
        h, y = _by_hand(name, x, 1)
        np.testing.assert_allclose(np.array(ffn(mx.array(x))), y, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(np.array(ffn._hidden(mx.array(x), ffn._w, None)), h, atol=1e-4, rtol=1e-4)
        assert 0.02 < (h != 0).mean() < {"prosparse": 0.4, "turbosparse": 0.35}[name]  # real zeros, most of them
    finally:
        model.flash.close()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_relu_family_oracle_flash_equals_dense(sparse_bundles, name):
    path = sparse_bundles[name]
    dense, _ = mlxflash.load(path, mode="resident")
    flash, _ = mlxflash.load(path, mode="flash", selector=oracle(path), window=1)
    try:
        np.testing.assert_allclose(decode_logits(flash), decode_logits(dense), atol=1e-4, rtol=1e-4)
        stats = flash.flash.stats
        assert stats.selected < 0.4 * len(TOKENS) * 2 * TINY["intermediate_size"]  # only the non-zero neurons
    finally:
        flash.flash.close()
        dense.flash.close()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_relu_family_predictor_learns_the_nonzero_set(sparse_bundles, tmp_path, name):
    import shutil

    from mlxflash.runtime.train import train_predictors

    path = shutil.copytree(sparse_bundles[name], tmp_path / "b")
    text = tmp_path / "text.txt"  # any text: the byte tokenizer reads this package's source
    text.write_text("\n".join(p.read_text() for p in sorted(Path(mlxflash.__file__).parent.rglob("*.py"))[:10]))
    reports = train_predictors(path, text, tokens=1024, epochs=4, context=128)
    record = Bundle.open(path).spec.selector
    assert record.kind == "predictor" and record.target == "nonzero"
    assert all(r.recall >= 0.85 for r in reports), reports  # the threshold is set for 0.9 on training tokens
    assert all(r.target_density < 0.4 for r in reports)
    flash, _ = mlxflash.load(path, mode="flash", window=1)
    try:
        assert flash.flash.plan.selector == "predictor"
        flash(mx.array([TOKENS[:4]]))  # a prompt, then decode steps through the predictor
        for t in TOKENS[4:8]:
            flash(mx.array([[t]]))
        assert 0 < flash.flash.stats.selected < 4 * 2 * TINY["intermediate_size"]
    finally:
        flash.flash.close()


def test_a_negative_fatrelu_threshold_is_refused(tmp_path):
    src = make_hf_dir(tmp_path / "src", {"hidden_act": "fatrelu", "hidden_act_param": -1})
    with pytest.raises(ConvertError, match="hidden_act_param=-1, expected a threshold >= 0 for fatrelu"):
        mlxflash.convert(src, tmp_path / "b", progress=False)
