"""Repack (and optionally quantize) a checkpoint into a flash bundle.

Sources: a GGUF file of a Llama-family model, or a Hugging Face / mlx-lm model directory with
safetensors (float weights, or mlx-lm's quantized layout). Quantized weights are kept exactly as
they come; float sources can be quantized (`bits`, MLX affine, as `mlx_lm.convert` does) or cast
(`dtype`). `tools/repack.py` and `mlxflash convert` are front ends of `convert` here.
"""

from __future__ import annotations

import glob
import itertools
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import _get_classes
from tqdm import tqdm

from ..arch.registry import (
    MOE_FAMILY,
    SUPPORTED,
    Architecture,
    architecture,
    as_text_model,
    resolve_activation,
)
from ..errors import ConvertError
from . import gguf, gguf_tokenizer
from .bundle import (
    BundleWriter,
    FFNSpec,
    RecordLayout,
    SelectorRecord,
    down_rows,
    dtype_name,
    record_parts,
    to_numpy_bytes,
)
from .moe import MoEArch, expert_tensors, moe_arch, write_moe_bundle
from .quant import quant_params, requantize_transposed, transpose_packed

FFN_MATRICES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Source:
    path: Path
    config: dict  # Hugging Face style, "quantization" (mlx-lm style) included when quantized
    weights: dict[str, mx.array]  # mlx-lm parameter names
    tokenizer_dir: Path
    bits_applied: bool = False  # a quantized GGUF took `bits` as the target of its requantized types


def open_source(path: Path, workdir: Path, bits: int | None = None, dtype: str | None = None) -> Source:
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(path, workdir, bits, dtype)
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_source(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file or directory")
    raise ConvertError(f"{path}: not a .gguf file nor a model directory with config.json")


def _gguf_source(path: Path, workdir: Path, bits: int | None, dtype: str | None) -> Source:
    # Scales and biases in float16 unless float32 is asked for (then K-quants map bit-exactly).
    g = gguf.load_gguf(path, bits, np.float32 if dtype == "float32" else np.float16)
    for line in gguf.describe(g.report):
        print(f"{path.name}: {line}")
    config = gguf.hf_config(g.metadata, g.tensors, path)
    arch = g.metadata["general.architecture"]
    weights = {}
    for name, value in g.tensors.items():
        new = gguf.mlx_lm_name(name, arch)
        if new is not None:
            weights[new] = value
    qcfg = _infer_gguf_quantization(weights)
    if qcfg:
        config["quantization"] = qcfg
    gguf_tokenizer.write_tokenizer(g.metadata, workdir, path)
    return Source(path, config, weights, workdir, bits_applied=g.quantized)


def _infer_gguf_quantization(weights: dict[str, mx.array]) -> dict | None:
    """Every quantized GGUF tensor comes in groups of 32; bits follow from the shapes."""
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
        raise ConvertError(
            f"{path}/config.json: quantization_config {config['quantization_config'].get('quant_method')!r} is not MLX's; use float or mlx-lm weights"
        )
    mode = (config.get("quantization") or {}).get("mode", "affine")
    if mode != "affine":
        raise ConvertError(f"{path}/config.json: quantization mode {mode!r} is not supported (expected 'affine')")
    return Source(path, config, weights, path)


def _check_architecture(config: dict, where: Path) -> Architecture:
    """The registry's description of this config's architecture; refuses what the flash FFN cannot compute."""
    arch = architecture(config)
    if arch is None:
        _refuse_moe(config, where)
        raise ConvertError(
            f"{where}: unsupported architecture model_type={config.get('model_type')!r} (supported: {', '.join(SUPPORTED)})"
        )
    if config.get("mlp_bias"):
        raise ConvertError(f"{where}: mlp_bias=true is not supported for {arch.model_type}")
    return arch


def _build_model(arch: Architecture, config: dict, where: Path) -> nn.Module:
    model_class, args_class = arch.classes(config)
    try:
        return model_class(args_class.from_dict(config))
    except (ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"{where}: config.json does not fit mlx-lm's {arch.model_type} ({e!r})") from e


def _sanitize(model: nn.Module, weights: dict, arch: Architecture, where: Path) -> dict:
    """mlx-lm's own renaming/dropping of checkpoint tensors (vision towers, tied heads)."""
    if not hasattr(model, "sanitize"):
        return weights
    try:
        return model.sanitize(weights)
    except KeyError as e:
        raise ConvertError(
            f"{where}: the weights do not look like a {arch.model_type} checkpoint ({e!r} missing)"
        ) from e


def ffn_activation(config: dict, where: Path | str = "config.json") -> str:
    """The activation the bundle records (and the runtime applies) for this config."""
    arch = _check_architecture(config, Path(where))
    try:
        return resolve_activation(arch, config)
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from e


def activation_threshold(config: dict) -> float:
    """fatrelu's threshold: the config's hidden_act_param (ProSparse, MiniCPM-S); 0 for the others."""
    if config.get("hidden_act") != "fatrelu":
        return 0.0
    value = config.get("hidden_act_param", 0.0)
    if not isinstance(value, (int, float)) or value < 0:
        raise ConvertError(f"config.json: hidden_act_param={value!r}, expected a threshold >= 0 for fatrelu")
    return float(value)


MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _refuse_moe(config: dict, where: Path) -> None:
    """An MoE model type outside the registry: say why its experts cannot stream (their layout), if
    mlx-lm has the architecture."""
    if not any(isinstance(config.get(k), int) and config[k] > 0 for k in MOE_KEYS):
        return
    try:
        model_class, args_class = _get_classes(config)  # mlx-lm's own class: the registry does not list it
        model = model_class(args_class.from_dict(config))
    except (ValueError, TypeError, KeyError, AttributeError):
        return  # mlx-lm has no such model: the plain "unsupported architecture" message says it
    moe_arch(model, config, where)  # raises with the reason for a layout the streaming experts cannot run
    raise ConvertError(
        f"{where}: model_type={config['model_type']!r} has SwitchGLU experts but is not in the MoE registry "
        f"(supported: {', '.join(MOE_FAMILY)})"
    )


def _quantize_resident(model: nn.Module, weights: dict, qcfg: dict) -> dict:
    """Quantize what mlx-lm's `convert -q` would: every Linear and Embedding whose width divides."""
    out = dict(weights)
    for path, module in model.named_modules():
        w = weights.get(f"{path}.weight")
        if (
            w is None
            or ".mlp." in f".{path}."
            or "embed_positions" in path
            or not isinstance(module, (nn.Linear, nn.Embedding))
        ):
            continue
        if w.shape[-1] % qcfg["group_size"] == 0:
            out[f"{path}.weight"], out[f"{path}.scales"], out[f"{path}.biases"] = mx.quantize(w, **qcfg)
    return out


def _ffn_tensors(
    weights: dict, arch: Architecture, config: dict, layer: int, qcfg: dict | None, quantize: bool, dtype
) -> dict:
    """The layer's FFN as write_bundle takes it: {matrix: (weight,) or (weight, scales, biases)}, biases."""
    prefix = f"model.layers.{layer}.mlp."
    source = {m: (weights, prefix + src) for m, src in arch.matrices.items()}
    if arch.fused_gate_up:  # rows 0..n are the gate, n..2n the up projection (codes, scales, biases alike)
        fused = prefix + arch.fused_gate_up
        n = config[arch.width_field]
        if f"{fused}.weight" not in weights:
            raise ConvertError(f"tensor {fused}.weight missing from the source")
        halves = {}
        for suffix in ("weight", "scales", "biases", "bias"):
            if f"{fused}.{suffix}" in weights:
                whole = weights[f"{fused}.{suffix}"]
                if whole.shape[0] != 2 * n:
                    raise ConvertError(f"tensor {fused}.{suffix}: {whole.shape[0]} rows, expected 2 x {n}")
                halves[f"gate.{suffix}"], halves[f"up.{suffix}"] = whole[:n], whole[n:]
        source.update(gate_proj=(halves, "gate"), up_proj=(halves, "up"))
    out = {}
    for m, (tensors, name) in source.items():
        w = tensors.get(f"{name}.weight")
        if w is None:
            raise ConvertError(f"tensor {name}.weight missing from the source")
        if f"{name}.scales" in tensors:
            out[m] = (w, tensors[f"{name}.scales"], tensors[f"{name}.biases"])
        elif quantize:
            out[m] = mx.quantize(w.astype(dtype) if dtype else w, **quant_params(qcfg, prefix + m))
        else:
            out[m] = (w.astype(dtype) if dtype else w,)
        if f"{name}.bias" in tensors:
            if m == "gate_proj" or not arch.ffn_biases:
                raise ConvertError(f"tensor {name}.bias: biases in a {arch.model_type} MLP are not supported")
            bias = tensors[f"{name}.bias"]
            out["up_bias" if m == "up_proj" else "down_bias"] = bias.astype(dtype) if dtype else bias
    return out


def _ffn_quantization(config: dict, t: dict) -> dict | None:
    """{"gate"|"up"|"down": {bits, group_size}} from the shapes of a layer's quantized FFN tensors."""
    if len(t["up_proj"]) != 3:
        return None
    d, n = config["hidden_size"], ffn_width(config)
    q = {}
    for key, m, in_dim in (("gate", "gate_proj", d), ("up", "up_proj", d), ("down", "down_proj", n)):
        if m in t:
            w, scales = t[m][0], t[m][1]
            q[key] = {"bits": w.shape[-1] * 32 // in_dim, "group_size": in_dim // scales.shape[-1]}
    return q


def ffn_width(config: dict) -> int:
    return config.get("intermediate_size") or config["ffn_dim"]


DOWN_ROWS_MIN_BITS = 8  # re-quantized per neuron at this many bits at least: its rounding stays below the source's


def down_layout(q: dict | None, hidden_size: int, layout: str = "auto") -> dict | None:
    """The FFN quantization with the down projection's layout decided: "rows" (per neuron, along d; "auto"
    takes it where the source's down has 8 bits or more, so nothing grows) or "groups" (as the source)."""
    if layout not in ("auto", "rows", "groups"):
        raise ConvertError(f"--down-layout {layout!r}: expected auto, rows or groups")
    if not q or layout == "groups":
        return q
    down = q["down"]
    g = down["group_size"]
    if hidden_size % g or (layout == "auto" and down["bits"] < DOWN_ROWS_MIN_BITS):
        return q
    return {**q, "down": {"bits": max(down["bits"], DOWN_ROWS_MIN_BITS), "group_size": g, "layout": "rows"}}


def _record_parts(t: dict, q: dict | None, source_q: dict | None = None) -> tuple[dict[str, np.ndarray], tuple | None]:
    """Per-neuron record fields, and the down projection's group scales/biases (resident; None in the
    rows layout, where each record carries its own)."""
    parts = {}
    for key, m in (("gate", "gate_proj"), ("up", "up_proj")):
        for suffix, a in zip(("weight", "scales", "biases"), t.get(m, ())):
            parts[f"{key}.{suffix}"] = a
    down = t["down_proj"]
    groups = down[1:] if q else None
    if down_rows(q):  # (d, n) grouped along n -> float32 -> each neuron's column quantized along d
        rows = requantize_transposed(*down, source_q["down"], q["down"])
        parts.update(zip(("down.weight", "down.scales", "down.biases"), rows))
        groups = None
    elif q:
        parts["down.weight"] = transpose_packed(down[0], q["down"]["bits"])  # (n, d*bits/32)
    else:
        parts["down.weight"] = down[0].T  # (n, d): column i is neuron i's output weights
    mx.eval(parts)
    return {k: to_numpy_bytes(v) for k, v in parts.items()}, groups


def write_bundle(
    out: str | Path,
    config: dict,
    resident: dict[str, mx.array],
    ffn_layers: Iterable[dict[str, tuple]],
    selector: SelectorRecord | None = None,
    tokenizer_dir: Path | None = None,
    progress: bool = True,
    layout: str = "auto",
) -> Path:
    """Write a bundle from resident tensors (runtime names) and per-layer FFN tensors (`layout`: the
    quantized down projection's, `down_layout`).

    Each layer is {"gate_proj": (w,), "up_proj": (w,), "down_proj": (w,)} in nn.Linear's convention
    (gate/up (ffn, d), down (d, ffn)), or (w, scales, biases) when quantized; no "gate_proj" for a
    plain FFN, and "up_bias" (ffn,) / "down_bias" (d,) when it has them. The real converter and the synthetic-model tool
    both come through here.
    """
    resident = dict(resident)
    layers = iter(ffn_layers)
    first = next(layers)
    source_q = _ffn_quantization(config, first)
    q = down_layout(source_q, config["hidden_size"], layout)
    gated = "gate_proj" in first
    scale_or_weight = first["up_proj"][1 if q else 0]
    spec = FFNSpec(
        hidden_size=config["hidden_size"],
        intermediate_size=ffn_width(config),
        gated=gated,
        activation=ffn_activation(config),
        activation_threshold=activation_threshold(config),
        dtype=dtype_name(scale_or_weight.dtype),
        quantization=q,
        record=RecordLayout.build(
            record_parts(config["hidden_size"], gated, dtype_name(scale_or_weight.dtype), q), page_fit=True
        ),
        selector=selector,
    )
    total = config["num_hidden_layers"]
    with BundleWriter(out, spec) as writer:
        bar = tqdm(total=total, desc="repack", unit="layer", disable=not progress)
        for layer, t in enumerate(itertools.chain([first], layers)):
            if _ffn_quantization(config, t) != source_q:
                raise ConvertError(
                    f"layer {layer}: FFN quantization differs from layer 0's; mixed FFN quantization is not supported"
                )
            parts, down_groups = _record_parts(t, q, source_q)
            writer.add_layer(parts)
            for bias in ("up_bias", "down_bias"):  # small: resident, and records stay page-sized
                if bias in t:
                    resident[f"model.layers.{layer}.mlp.{bias}"] = t[bias]
            if down_groups is not None:
                resident[f"model.layers.{layer}.mlp.down_scales"] = down_groups[0]
                resident[f"model.layers.{layer}.mlp.down_biases"] = down_groups[1]
            bar.update()
        bar.close()
        if len(spec.layers) != total:
            raise ConvertError(f"got FFN tensors for {len(spec.layers)} layers, config says num_hidden_layers={total}")
        return writer.finish(config, resident, tokenizer_dir)


def convert(
    source: str | Path,
    out: str | Path,
    bits: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    progress: bool = True,
    layout: str = "auto",
) -> Path:
    """Convert `source` into a flash bundle at `out` (written to a temporary directory, then renamed).
    `layout`: where a quantized down projection's scales live (`down_layout`: auto, rows or groups)."""
    source, out = Path(source), Path(out)
    if out.exists():
        raise ConvertError(f"{out}: already exists; choose another output path or remove it first")
    if bits is not None and bits not in (2, 3, 4, 5, 6, 8):
        raise ConvertError(f"--bits {bits}: expected one of 2, 3, 4, 5, 6, 8")
    if group_size not in (32, 64, 128):
        raise ConvertError(f"--group-size {group_size}: expected 32, 64 or 128")
    down_layout(None, 0, layout)  # an unknown layout is refused before any work
    cast = getattr(mx, dtype) if dtype else None
    if dtype and dtype not in ("float16", "bfloat16", "float32"):
        raise ConvertError(f"--dtype {dtype}: expected float16, bfloat16 or float32")
    workdir = Path(tempfile.mkdtemp(prefix="mlxflash-convert-"))
    try:
        src = open_source(source, workdir, bits, dtype)
        return _convert(src, out, None if src.bits_applied else bits, group_size, cast, progress, layout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _convert(src: Source, out: Path, bits, group_size, cast, progress, layout: str = "auto") -> Path:
    config = {k: v for k, v in src.config.items() if k != "quantization_config"}
    arch = _check_architecture(config, src.path)
    ffn_activation(config.get("text_config", {}) if arch.text_model else config, src.path)  # refused first
    model = _build_model(arch, config, src.path)  # lazy: parameters are never materialized
    weights = _sanitize(model, dict(src.weights), arch, src.path)
    if arch.text_model:  # the bundle holds the text model the wrapper runs (gemma3 -> gemma3_text)
        config, weights = as_text_model(arch, config, weights)
        arch = _check_architecture(config, src.path)
        model = _build_model(arch, config, src.path)
        weights = _sanitize(model, weights, arch, src.path)
    qcfg = config.get("quantization")
    if qcfg and bits:
        raise ConvertError(f"{src.path}: already quantized ({qcfg['bits']}-bit); --bits applies to float sources only")
    if bits:
        qcfg = config["quantization"] = {"group_size": group_size, "bits": bits}
    moe = moe_arch(model, config, src.path) if config["model_type"] in MOE_FAMILY else None
    if moe is not None:
        return _convert_moe(src, out, model, moe, config, weights, bits, group_size, cast)
    resident = {k: v for k, v in weights.items() if ".mlp." not in k}
    if cast is not None:
        resident = {k: v.astype(cast) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in resident.items()}
    if bits:
        resident = _quantize_resident(model, resident, qcfg)
    layers = range(config["num_hidden_layers"])
    ffn = (_ffn_tensors(weights, arch, config, i, qcfg, bits is not None, cast) for i in layers)
    return write_bundle(out, config, resident, ffn, tokenizer_dir=src.tokenizer_dir, progress=progress, layout=layout)


def _convert_moe(src: Source, out: Path, model, arch: MoEArch, config, weights, bits, group_size, cast) -> Path:
    """Routed experts to ffn.bin (one record per expert); everything else, router and shared experts
    included, resident."""
    resident = {k: v for k, v in weights.items() if f".{arch.module}." not in k}
    if cast is not None:
        resident = {k: v.astype(cast) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in resident.items()}
    if bits:
        resident = _quantize_resident(model, resident, config["quantization"])
    quant = {"group_size": group_size, "bits": bits} if bits else None
    experts = (expert_tensors(weights, arch, layer, quant, cast) for layer in arch.layers)
    return write_moe_bundle(out, config, arch, resident, experts, tokenizer_dir=src.tokenizer_dir)


def read_ffn_layer(bundle, layer: int) -> dict[str, tuple]:
    """The inverse of the repack: layer `layer`'s FFN tensors, as write_bundle takes them, from disk."""
    spec = bundle.spec
    with open(bundle.ffn_path, "rb") as f:
        f.seek(spec.layers[layer].offset)
        raw = f.read(spec.block_bytes(layer))
    records = mx.array(np.frombuffer(raw, dtype=np.uint8).reshape(spec.layers[layer].neurons, spec.record.nbytes))
    field = {name: spec.record.view(records, name) for name in spec.record.names()}
    out: dict[str, tuple] = {}
    for key, m in (("gate", "gate_proj"), ("up", "up_proj")):
        if f"{key}.weight" in field:
            out[m] = tuple(field[f"{key}.{s}"] for s in ("weight", "scales", "biases") if f"{key}.{s}" in field)
    resident = bundle.resident_weights()
    prefix = f"model.layers.{layer}.mlp."
    if prefix + "up_bias" in resident:
        out["up_bias"] = resident[prefix + "up_bias"]
    q = spec.quantization
    if down_rows(q):  # back to (d, n) grouped along n, as mlx-lm's down_proj holds it (re-quantized)
        rows = (field["down.weight"], field["down.scales"], field["down.biases"])
        out["down_proj"] = requantize_transposed(*rows, q["down"], q["down"])
    elif q:
        down = transpose_packed(field["down.weight"], q["down"]["bits"])
        out["down_proj"] = (down, resident[prefix + "down_scales"], resident[prefix + "down_biases"])
    else:
        out["down_proj"] = (field["down.weight"].T,)
    return out
