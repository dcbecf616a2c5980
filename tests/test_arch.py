"""Architectures beyond llama (gemma3's GeGLU and extra norms, phi3's fused gate_up), the activation the
bundle records, and the compute dtype (float32 on the CPU whatever the bundle stores)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model as mlx_lm_load_model
from tiny import TINY, byte_tokenizer

import mlxflash
from mlxflash.arch.registry import ARCHITECTURES, MOE_FAMILY, model_classes
from mlxflash.errors import ConvertError
from mlxflash.format.bundle import Bundle
from mlxflash.runtime.ffn import ACTIVATIONS
from mlxflash.runtime.report import load_report

TOKENS = [5, 17, 99, 3, 42, 7, 200, 11, 64, 9, 31, 77]
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 256}
GEMMA3_TEXT = {
    **SMALL,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "rms_norm_eps": 1e-6,
    "sliding_window": 4,  # shorter than TOKENS: the sliding layers' rotating cache really rotates
    "sliding_window_pattern": 2,
    "max_position_embeddings": 96,
    "hidden_activation": "gelu_pytorch_tanh",
    "eos_token_id": 0,
}
# One tiny config per registered mlx-lm architecture (and the weights its checkpoint leaves out).
CONFIGS = {
    "llama": (TINY, ()),
    "mistral": ({**TINY, "model_type": "mistral"}, ()),
    "qwen2": ({**TINY, "model_type": "qwen2", "tie_word_embeddings": True}, ("lm_head.",)),
    "qwen3": ({**TINY, "model_type": "qwen3", "head_dim": 16}, ()),
    "olmo2": ({**TINY, "model_type": "olmo2", "tie_word_embeddings": False}, ()),
    "helium": (
        {**TINY, "model_type": "helium", "head_dim": 16, "attention_bias": False, "mlp_bias": False},
        (),
    ),
    "gemma2": (
        {
            **{k: v for k, v in GEMMA3_TEXT.items() if "sliding" not in k},
            "model_type": "gemma2",
            "hidden_act": "gelu_pytorch_tanh",
        },
        (),
    ),
    "gemma3_text": (GEMMA3_TEXT, ()),
    "gemma3": (  # the multimodal wrapper: text model under language_model, tied head (as Gemma 3 4B+)
        {"model_type": "gemma3", "vocab_size": 256, "eos_token_id": 0, "text_config": GEMMA3_TEXT},
        ("language_model.lm_head.",),
    ),
    "phi3": (
        {**TINY, "model_type": "phi3", "num_key_value_heads": 4, "max_position_embeddings": 96},
        (),
    ),
}


def make_source(out: Path, config: dict, leave_out=(), quantize: tuple[int, int] | None = None, seed: int = 0):
    """A checkpoint directory from mlx-lm's own model class with random weights (norms included, so the
    extra norms matter), float32, or quantized as mlx-lm's `convert -q` writes it (mlx-community layout)."""
    out.mkdir(parents=True)
    mx.random.seed(seed)
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(json.loads(json.dumps(config))))
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    model.load_weights([(k, 0.3 * mx.random.normal(v.shape, key=key)) for (k, v), key in zip(params, keys)])
    config = dict(config)
    if quantize:
        group, bits = quantize
        nn.quantize(model, group_size=group, bits=bits)
        config["quantization"] = config["quantization_config"] = {"group_size": group, "bits": bits}
    weights = {k: v for k, v in tree_flatten(model.parameters()) if not any(k.startswith(o) for o in leave_out)}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    byte_tokenizer(out, 256)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (source dir, bundle) for every architecture (float32) and 4-bit gemma3/phi3 sources."""
    root = tmp_path_factory.mktemp("arch")
    out = {}
    for name, (config, leave_out) in CONFIGS.items():
        src = make_source(root / f"{name}-src", config, leave_out)
        out[name] = (src, mlxflash.convert(src, root / name, progress=False))
    for name in ("gemma3_text", "gemma3", "phi3"):
        config, leave_out = CONFIGS[name]
        src = make_source(root / f"{name}-q4-src", config, leave_out, quantize=(32, 4))
        out[f"{name}-q4"] = (src, mlxflash.convert(src, root / f"{name}-q4", progress=False))
        float_src = out[name][0]  # and quantized by the converter (`--bits 4`), as mlx-lm's convert -q does
        out[f"{name}-bits4"] = (
            float_src,
            mlxflash.convert(float_src, root / f"{name}-b4", bits=4, group_size=32, progress=False),
        )
    return out


def decode_logits(model, tokens=TOKENS) -> np.ndarray:
    """Token by token through the KV cache (flash mode's decode path)."""
    cache = make_prompt_cache(model)
    out = [model(mx.array([[t]]), cache=cache) for t in tokens]
    return np.array(mx.concatenate(out, axis=1))


def prompt_logits(model, tokens=TOKENS) -> np.ndarray:
    return np.array(model(mx.array(tokens)[None]))


def test_every_registered_architecture_is_tested():
    assert set(CONFIGS) == set(ARCHITECTURES) - {"opt", *MOE_FAMILY}  # OPT: tests/test_flash.py; MoE: test_moe.py


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resident_matches_mlx_lm(converted, name):
    src, bundle = converted[name]
    reference, _ = mlx_lm_load_model(src)
    model, _ = mlxflash.load(bundle, mode="resident")
    np.testing.assert_allclose(prompt_logits(model), prompt_logits(reference), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(decode_logits(model), decode_logits(reference), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gemma3_text", "gemma3", "phi3", "gemma3_text-q4", "gemma3-q4", "phi3-q4"])
def test_resident_naive_flash_and_mlx_lm_agree(converted, name):
    src, bundle = converted[name]
    reference, _ = mlx_lm_load_model(src)  # quantized sources: mlx-lm reads the same codes
    resident, _ = mlxflash.load(bundle, mode="resident")
    naive, _ = mlxflash.load(bundle, mode="naive")
    flash, _ = mlxflash.load(bundle, mode="flash", selector="all")
    expected = decode_logits(resident)
    np.testing.assert_allclose(expected, decode_logits(reference), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(decode_logits(naive), expected)  # the same math on the same bytes
    # flash: every neuron, the sparse path (rows in cache order, down dequantized per row): same sum
    np.testing.assert_allclose(decode_logits(flash), expected, atol=1e-5, rtol=1e-5)
    assert flash.flash.stats.computed == len(TOKENS) * 2 * 128  # it really ran the sparse path


@pytest.mark.parametrize("name", ["gemma3_text", "gemma3", "phi3"])
def test_quantized_at_conversion_matches_mlx_lm_quantized(converted, name):
    src, bundle = converted[f"{name}-bits4"]
    reference, _ = mlx_lm_load_model(src)
    nn.quantize(reference, group_size=32, bits=4)
    model, _ = mlxflash.load(bundle, mode="resident")
    np.testing.assert_allclose(decode_logits(model), decode_logits(reference), atol=1e-5, rtol=1e-5)


def test_bundle_records_the_activation(converted):
    expected = {"gemma3_text": "gelu_tanh", "gemma3": "gelu_tanh", "gemma2": "gelu_tanh", "phi3": "silu"}
    for name, act in expected.items():
        spec = Bundle.open(converted[name][1]).spec
        assert spec.activation == act and spec.gated
    assert Bundle.open(converted["gemma3"][1]).config["model_type"] == "gemma3_text"


def test_the_ffn_applies_the_recorded_activation(converted):
    """Swapping the recorded activation changes the logits: the FFN reads it, not a hard-coded SiLU."""
    bundle = converted["gemma3_text"][1]
    model, _ = mlxflash.load(bundle, mode="resident")
    right = prompt_logits(model)
    for block in model.model.layers:
        block.mlp._act = ACTIVATIONS["silu"]
    assert np.abs(prompt_logits(model) - right).max() > 1e-2


def test_phi3_gate_up_split_exactly(converted):
    from mlxflash.format.convert import read_ffn_layer

    for name in ("phi3", "phi3-q4"):
        src, bundle = converted[name]
        weights = mx.load(str(src / "model.safetensors"))
        back = read_ffn_layer(Bundle.open(bundle), 1)
        for i, suffix in enumerate(("weight", "scales", "biases")[: len(back["gate_proj"])]):
            fused = weights[f"model.layers.1.mlp.gate_up_proj.{suffix}"]
            assert mx.array_equal(back["gate_proj"][i], fused[:128]).item()
            assert mx.array_equal(back["up_proj"][i], fused[128:]).item()


@pytest.mark.parametrize(
    "config, message",
    [
        ({**TINY, "hidden_act": "xielu"}, "hidden_act='xielu' is not an activation"),
        ({**GEMMA3_TEXT, "hidden_activation": "gelu_quick"}, "hidden_activation='gelu_quick' is not an activation"),
        ({**CONFIGS["gemma3"][0], "text_config": {**GEMMA3_TEXT, "hidden_activation": "xielu"}}, "'xielu' is not an"),
        ({**TINY, "model_type": "starcoder2"}, "unsupported architecture model_type='starcoder2'"),
        ({**TINY, "mlp_bias": True}, "mlp_bias=true is not supported"),
    ],
)
def test_unsupported_mlp_is_refused_at_conversion(tmp_path, config, message):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(src / "model.safetensors"), {"x": mx.zeros((1,))})
    byte_tokenizer(src, 256)
    with pytest.raises(ConvertError, match=message.replace("(", r"\(")):
        mlxflash.convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def half_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    src = make_source(root / "src", GEMMA3_TEXT)
    return {
        dtype: mlxflash.convert(src, root / dtype, dtype=dtype, progress=False)
        for dtype in ("float16", "bfloat16", "float32")
    }


def _rounded_float32_model(path: Path, stored: str):
    """The float32 bundle, resident, with every weight rounded to `stored` and back: what a `stored`
    bundle computed in float32 must equal."""
    model, _ = mlxflash.load(path, mode="resident")
    dtype = getattr(mx, stored)
    model.load_weights([(k, v.astype(dtype).astype(mx.float32)) for k, v in tree_flatten(model.parameters())])
    for block in model.model.layers:
        block.mlp._w = {k: v.astype(dtype).astype(mx.float32) for k, v in block.mlp._w.items()}
    return model


@pytest.mark.parametrize("stored", ["float16", "bfloat16"])
def test_half_bundle_computes_in_float32_on_cpu(half_bundles, stored):
    assert mx.default_device() == mx.cpu
    assert Bundle.open(half_bundles[stored]).spec.dtype == stored
    resident, _ = mlxflash.load(half_bundles[stored], mode="resident")
    flash, _ = mlxflash.load(half_bundles[stored], mode="flash", selector="all")
    for model in (resident, flash):
        assert model.flash.compute_dtype == "float32"
        assert model.flash.token_stats().as_dict()["compute_dtype"] == "float32"
        assert f"compute: float32 (the bundle stores {stored}" in load_report(model)
        assert model.model.embed_tokens(mx.array([[1, 2]])).dtype == mx.float32  # flash: rows streamed, as float32
        layer = model.model.layers[0]
        assert layer.self_attn.q_proj.weight.dtype == mx.float32
        assert layer.mlp(mx.random.normal((1, 1, 64))).dtype == mx.float32  # records converted as read
    for block in resident.model.layers:  # converted once at load, not at every product
        assert all(v.dtype in (mx.float32, mx.uint32) for v in block.mlp._w.values())
    half = decode_logits(resident)
    assert half.dtype == np.float32
    np.testing.assert_allclose(decode_logits(flash), half, atol=1e-5, rtol=1e-5)
    # The same computation as float32 math on the weights rounded to `stored`: summation-order noise only.
    np.testing.assert_allclose(
        half, decode_logits(_rounded_float32_model(half_bundles["float32"], stored)), atol=1e-5, rtol=1e-5
    )
    # Against the float32 bundle: rounding each weight to `stored` perturbs it by at most one unit
    # roundoff u (2^-11 float16, 2^-8 bfloat16); the logits move by about u of their largest (measured:
    # 4.7e-4 and 3.4e-3). 4u bounds it with margin; the rounded-weights check above is the exact one.
    full = decode_logits(mlxflash.load(half_bundles["float32"], mode="resident")[0])
    scale = np.abs(full).max()
    u = 2.0**-11 if stored == "float16" else 2.0**-8
    assert np.abs(half - full).max() < 4 * u * scale
