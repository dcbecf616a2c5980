"""Repack (and optionally quantize) a checkpoint into a flash bundle.

Sources: a GGUF file of a Llama-family model, or a Hugging Face / mlx-lm model directory with
safetensors (float weights, or mlx-lm's quantized layout). Quantized weights are kept exactly as
they come; float sources can be quantized (`bits`, MLX affine, as `mlx_lm.convert` does) or cast
(`dtype`). `tools/repack.py` and `mlxflash convert` are front ends of `convert` here.
"""

from __future__ import annotations

import glob
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import _get_classes
from tqdm import tqdm

from . import gguf
from .bundle import BundleWriter, FFNSpec, RecordLayout, dtype_name, record_parts, to_numpy_bytes
from .errors import ConvertError
from .ffn import ACTIVATIONS, transpose_packed

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
FFN_MATRICES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Source:
    path: Path
    config: dict  # Hugging Face style, "quantization" (mlx-lm style) included when quantized
    weights: dict[str, mx.array]  # mlx-lm parameter names
    tokenizer_dir: Path


def open_source(path: Path, workdir: Path) -> Source:
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(path, workdir)
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_source(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file or directory")
    raise ConvertError(f"{path}: not a .gguf file nor a model directory with config.json")


def _gguf_source(path: Path, workdir: Path) -> Source:
    tensors, md = gguf.read_gguf(path)
    config = gguf.hf_config(md, tensors, path)
    weights = {}
    for name, value in tensors.items():
        new = gguf.mlx_lm_name(name)
        if new is not None:
            weights[new] = value
    qcfg = _infer_gguf_quantization(weights)
    if qcfg:
        config["quantization"] = qcfg
    gguf.write_tokenizer(md, workdir, path)
    return Source(path, config, weights, workdir)


def _infer_gguf_quantization(weights: dict[str, mx.array]) -> dict | None:
    """mx.load gives every quantized GGUF tensor group size 32; bits follow from the shapes."""
    per_module = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name.removesuffix(".scales")
            bits = weights[module + ".weight"].shape[-1] * 32 // (scales.shape[-1] * 32)
            per_module[module] = {"group_size": 32, "bits": bits}
    if not per_module:
        return None
    default = Counter(q["bits"] for q in per_module.values()).most_common(1)[0][0]
    qcfg: dict = {"group_size": 32, "bits": default}
    qcfg.update({m: q for m, q in per_module.items() if q["bits"] != default})
    return qcfg


def _hf_source(path: Path) -> Source:
    config = json.loads((path / "config.json").read_text())
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise ConvertError(f"{path}: no *.safetensors files")
    weights = {}
    for f in files:
        weights.update(mx.load(f))
    if "quantization_config" in config and "quantization" not in config:
        raise ConvertError(f"{path}/config.json: quantization_config {config['quantization_config'].get('quant_method')!r} is not MLX's; use float or mlx-lm weights")
    return Source(path, config, weights, path)


def quant_params(qcfg: dict, module: str) -> dict:
    """mlx-lm's quantization config: per-module overrides, else the defaults."""
    own = qcfg.get(module)
    if isinstance(own, dict):
        return {"group_size": own["group_size"], "bits": own["bits"]}
    return {"group_size": qcfg["group_size"], "bits": qcfg["bits"]}


def _check_architecture(config: dict, where: Path) -> nn.Module:
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise ConvertError(
            f"{where}: unsupported architecture model_type={model_type!r} (supported: {', '.join(LLAMA_FAMILY)})"
        )
    if config.get("mlp_bias"):
        raise ConvertError(f"{where}: mlp_bias=true is not supported for {model_type}")
    act = config.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ConvertError(f"{where}: hidden_act {act!r} not supported (supported: {', '.join(ACTIVATIONS)})")
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))  # lazy: parameters are never materialized


def _quantize_resident(model: nn.Module, weights: dict, qcfg: dict) -> dict:
    """Quantize what mlx-lm's `convert -q` would: every Linear and Embedding whose width divides."""
    out = dict(weights)
    for path, module in model.named_modules():
        w = weights.get(f"{path}.weight")
        if w is None or ".mlp." in f".{path}." or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        if w.shape[-1] % qcfg["group_size"] == 0:
            out[f"{path}.weight"], out[f"{path}.scales"], out[f"{path}.biases"] = mx.quantize(w, **qcfg)
    return out


def _ffn_tensors(weights: dict, layer: int, qcfg: dict | None, quantize: bool, dtype) -> dict:
    """The layer's gate/up/down as {matrix: (weight, scales, biases)} or {matrix: (weight,)}."""
    out = {}
    for m in FFN_MATRICES:
        name = f"model.layers.{layer}.mlp.{m}"
        w = weights.get(f"{name}.weight")
        if w is None:
            raise ConvertError(f"tensor {name}.weight missing from the source")
        if f"{name}.scales" in weights:
            out[m] = (w, weights[f"{name}.scales"], weights[f"{name}.biases"])
        elif quantize:
            out[m] = mx.quantize(w.astype(dtype) if dtype else w, **quant_params(qcfg, name))
        else:
            out[m] = (w.astype(dtype) if dtype else w,)
    return out


def _ffn_quantization(qcfg: dict | None, layers: int, quantized: bool) -> dict | None:
    if not quantized:
        return None
    names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    first = {k: quant_params(qcfg, f"model.layers.0.mlp.{m}") for k, m in names.items()}
    for layer in range(layers):
        for k, m in names.items():
            if quant_params(qcfg, f"model.layers.{layer}.mlp.{m}") != first[k]:
                raise ConvertError(f"layer {layer} {m}: quantization differs from layer 0's; mixed FFN quantization is not supported")
    return first


def _record_parts(t: dict, q: dict | None) -> tuple[dict[str, np.ndarray], mx.array | None]:
    """Per-neuron record fields, and the down projection's group scales/biases (resident)."""
    parts = {}
    for key, m in (("gate", "gate_proj"), ("up", "up_proj")):
        for suffix, a in zip(("weight", "scales", "biases"), t[m]):
            parts[f"{key}.{suffix}"] = a
    down = t["down_proj"]
    if q:
        parts["down.weight"] = transpose_packed(down[0], q["down"]["bits"])  # (n, d*bits/32)
    else:
        parts["down.weight"] = down[0].T  # (n, d): column i is neuron i's output weights
    mx.eval(parts)
    return {k: to_numpy_bytes(v) for k, v in parts.items()}, (down[1:] if q else None)


def convert(
    source: str | Path,
    out: str | Path,
    bits: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """Convert `source` into a flash bundle at `out` (written to a temporary directory, then renamed)."""
    source, out = Path(source), Path(out)
    if out.exists():
        raise ConvertError(f"{out}: already exists; choose another output path or remove it first")
    if bits is not None and bits not in (2, 3, 4, 5, 6, 8):
        raise ConvertError(f"--bits {bits}: expected one of 2, 3, 4, 5, 6, 8")
    if group_size not in (32, 64, 128):
        raise ConvertError(f"--group-size {group_size}: expected 32, 64 or 128")
    cast = getattr(mx, dtype) if dtype else None
    if dtype and dtype not in ("float16", "bfloat16", "float32"):
        raise ConvertError(f"--dtype {dtype}: expected float16, bfloat16 or float32")
    workdir = Path(tempfile.mkdtemp(prefix="mlxflash-convert-"))
    try:
        return _convert(open_source(source, workdir), out, bits, group_size, cast, progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _convert(src: Source, out: Path, bits, group_size, cast, progress) -> Path:
    config = {k: v for k, v in src.config.items() if k != "quantization_config"}
    model = _check_architecture(config, src.path)
    weights = model.sanitize(dict(src.weights)) if hasattr(model, "sanitize") else dict(src.weights)
    layers = config["num_hidden_layers"]
    qcfg = config.get("quantization")
    if qcfg and bits:
        raise ConvertError(f"{src.path}: already quantized ({qcfg['bits']}-bit); --bits applies to float sources only")
    if bits:
        qcfg = config["quantization"] = {"group_size": group_size, "bits": bits}
    resident = {k: v for k, v in weights.items() if ".mlp." not in k}
    if cast is not None:
        resident = {k: v.astype(cast) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in resident.items()}
    if bits:
        resident = _quantize_resident(model, resident, qcfg)

    first = _ffn_tensors(weights, 0, qcfg, bits is not None, cast)
    q = _ffn_quantization(qcfg, layers, len(first["gate_proj"]) == 3)
    d = config["hidden_size"]
    spec = FFNSpec(
        hidden_size=d,
        intermediate_size=config["intermediate_size"],
        gated=True,
        activation=config.get("hidden_act", "silu"),
        dtype=dtype_name(first["gate_proj"][1 if q else 0].dtype),
        quantization=q,
        record=RecordLayout([], 0),
    )
    spec.record = RecordLayout.build(record_parts(d, True, spec.dtype, q))
    with BundleWriter(out, spec) as writer:
        for layer in tqdm(range(layers), desc="repack", unit="layer", disable=not progress):
            t = first if layer == 0 else _ffn_tensors(weights, layer, qcfg, bits is not None, cast)
            parts, down_groups = _record_parts(t, q)
            writer.add_layer(parts)
            if down_groups is not None:
                resident[f"model.layers.{layer}.mlp.down_scales"] = down_groups[0]
                resident[f"model.layers.{layer}.mlp.down_biases"] = down_groups[1]
        return writer.finish(config, resident, src.tokenizer_dir)
