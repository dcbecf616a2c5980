"""Mixture-of-experts bundles: one record per expert, the experts of a layer in one aligned block.

An MoE bundle is a flash bundle (bundle.py: the same directory, writer, checks and checksums) whose
``ffn.bin`` holds, for every layer with routed experts, a block of ``num_experts`` records in expert
order. Expert e's record is ``[gate_e | up_e | down_e]``: expert e's slice of mlx-lm's stacked
``SwitchGLU`` tensors (``switch_mlp.gate_proj.weight`` (E, n, d), ``up_proj`` (E, n, d),
``down_proj`` (E, d, n); quantized: their packed codes, scales and biases as the source has them, so
a cache slot feeds ``mx.gather_qmm`` directly). Each field starts on a 4 KiB boundary and each record
is a multiple of 16 KiB, so any run of experts is one direct read landing in place.

Resident (in resident.safetensors, loaded into mlx-lm's own model): attention, norms, the router
(``mlp.gate``), shared experts and any dense MLP layers (``mlp_only_layers``).

The ``flash`` section is an `ExpertSpec` (``"kind": "moe"``) instead of an `FFNSpec`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwiGLU, SwitchGLU, SwitchLinear

from ..errors import BundleError, ConvertError
from .bundle import (
    ALIGNMENT,
    CONFIG_FILE,
    FORMAT_VERSION,
    Bundle,
    BundleWriter,
    Field,
    RecordLayout,
    round_up,
    to_numpy_bytes,
)

FIELD_ALIGN = 4096  # each field of a record starts here: slots' field matrices take direct reads in place
PROJECTIONS = ("gate", "up", "down")
MOE_KIND = "moe"


@dataclass(frozen=True)
class MoEArch:
    """Where a model keeps its routed experts (found by inspecting mlx-lm's model class)."""

    module: str  # attribute path of the SwitchGLU inside a decoder layer, e.g. "mlp.switch_mlp"
    layers: tuple[int, ...]  # decoder layers that have routed experts
    num_experts: int
    top_k: int
    hidden_size: int
    expert_size: int  # each expert's FFN width


def moe_arch(model: nn.Module, config: dict, where: Path | str) -> MoEArch | None:
    """The experts' layout of an mlx-lm model, None for a dense model; refuses layouts the streaming
    experts cannot compute (anything but a plain SwitchGLU: biases, other activations, SwitchMLP)."""
    found: dict[int, str] = {}
    switch = None
    for i, layer in enumerate(model.layers):
        modules = dict(layer.named_modules())
        for name, m in modules.items():
            if isinstance(m, SwitchGLU):
                _check_switch(m, f"{where}: layer {i}'s experts ({name})")
                found[i], switch = name, m
            elif isinstance(m, SwitchLinear):
                parent = name.rsplit(".", 1)[0]
                if not isinstance(modules.get(parent), SwitchGLU):
                    raise ConvertError(
                        f"{where}: layer {i}'s experts ({parent}) are {type(modules.get(parent)).__name__}, not "
                        "SwitchGLU [gate | up | down]; this expert layout is not supported"
                    )
    if not found:
        return None
    modules = set(found.values())
    if len(modules) != 1:
        raise ConvertError(f"{where}: experts sit at different places in different layers ({sorted(modules)})")
    top_k = config.get("num_experts_per_tok")
    experts = switch.gate_proj.num_experts
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ConvertError(f"{where}: num_experts_per_tok={top_k!r}, expected 1..{experts}")
    return MoEArch(
        modules.pop(), tuple(sorted(found)), experts, top_k, switch.gate_proj.input_dims, switch.gate_proj.output_dims
    )


def _check_switch(m: SwitchGLU, what: str) -> None:
    if type(m.activation) is not SwiGLU:
        raise ConvertError(f"{what} use activation {type(m.activation).__name__}; only mlx-lm's SwiGLU is supported")
    if any("bias" in getattr(m, p) for p in ("gate_proj", "up_proj", "down_proj")):
        raise ConvertError(f"{what} have biases; experts with biases are not supported")


@dataclass
class ExpertBlock:
    layer: int  # the decoder layer
    offset: int
    experts: int
    sha256: str = ""


@dataclass
class ExpertSpec:
    """The `flash` section of an MoE bundle: what ffn.bin holds and how."""

    hidden_size: int
    expert_size: int
    num_experts: int
    top_k: int
    module: str
    dtype: str
    quantization: dict | None  # {"gate"|"up"|"down": {"bits", "group_size"}}
    record: RecordLayout
    layers: list[ExpertBlock] = field(default_factory=list)
    files: dict = field(default_factory=dict)
    routing: dict | None = None  # routing statistics (record_routing), optional
    alignment: int = ALIGNMENT
    format_version: int = FORMAT_VERSION
    kind: str = MOE_KIND
    selector = None  # no neuron selector: the router is the selector

    def block_bytes(self, i: int) -> int:
        return self.layers[i].experts * self.record.nbytes

    @property
    def ffn_bytes(self) -> int:
        return sum(self.block_bytes(i) for i in range(len(self.layers)))

    @property
    def ffn_weight_bytes(self) -> int:
        """What the model's size counts of the experts: their records, as a dense FFN counts its fields."""
        return self.ffn_bytes

    def field_shape(self, name: str) -> tuple[int, int]:
        """The per-expert shape of a record field, as mlx-lm's SwitchLinear stores it (without E)."""
        rows = self.hidden_size if name.startswith("down.") else self.expert_size
        return rows, self.record[name].count // rows

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("kind", "format_version", "dtype", "hidden_size", "expert_size")}
        d.update(num_experts=self.num_experts, top_k=self.top_k, module=self.module, quantization=self.quantization)
        d.update(record=self.record.to_json(), alignment=self.alignment, routing=self.routing)
        return {**d, "layers": [b.__dict__ for b in self.layers], "files": self.files}

    @classmethod
    def from_json(cls, d: dict, where: str) -> ExpertSpec:
        if d.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{where}: unsupported flash format_version {d.get('format_version')!r}; reconvert")
        try:
            return cls(
                hidden_size=d["hidden_size"],
                expert_size=d["expert_size"],
                num_experts=d["num_experts"],
                top_k=d["top_k"],
                module=d["module"],
                dtype=d["dtype"],
                quantization=d["quantization"],
                record=RecordLayout.from_json(d["record"]),
                layers=[ExpertBlock(**b) for b in d["layers"]],
                files=d["files"],
                routing=d.get("routing"),
                alignment=d["alignment"],
            )
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where}: malformed MoE flash section ({e!r} missing or wrong)") from e


def expert_layout(d: int, n: int, dtype: str, q: dict | None) -> RecordLayout:
    """[gate | up | down] of one expert; fields on 4 KiB, the record a multiple of 16 KiB."""
    parts = []
    for proj in PROJECTIONS:
        rows, cols = (d, n) if proj == "down" else (n, d)
        if q:
            bits, group = q[proj]["bits"], q[proj]["group_size"]
            parts += [
                (f"{proj}.weight", "uint32", rows * cols * bits // 32),
                (f"{proj}.scales", dtype, rows * cols // group),
                (f"{proj}.biases", dtype, rows * cols // group),
            ]
        else:
            parts.append((f"{proj}.weight", dtype, rows * cols))
    fields, offset = [], 0
    for name, dt, count in parts:
        f = Field(name, dt, count, round_up(offset, FIELD_ALIGN))
        fields.append(f)
        offset = f.offset + f.nbytes
    return RecordLayout(tuple(fields), round_up(offset, ALIGNMENT))


class MoEBundle(Bundle):
    """A validated MoE bundle (read-only): `spec` is an ExpertSpec."""

    spec: ExpertSpec

    @classmethod
    def _parse_spec(cls, flash: dict, where: str) -> ExpertSpec:
        if flash.get("kind") != MOE_KIND:
            raise BundleError(f"{where}: not an MoE bundle (flash.kind={flash.get('kind')!r})")
        return ExpertSpec.from_json(flash, where)

    def block_of(self, layer: int) -> int:
        """The index in spec.layers of decoder layer `layer`'s experts."""
        return [b.layer for b in self.spec.layers].index(layer)


def is_moe_bundle(path: str | os.PathLike) -> bool:
    """Whether `path` holds an MoE bundle (False for anything else, including no bundle: Bundle.open says why)."""
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text()).get("flash", {}).get("kind") == MOE_KIND
    except (OSError, ValueError, AttributeError):
        return False


def expert_tensors(weights: dict, arch: MoEArch, layer: int, quant: dict | None, cast) -> dict[str, mx.array]:
    """Layer `layer`'s stacked experts {"gate.weight": (E, n, d), ...} as the bundle stores them:
    quantized as the source is, or quantized with `quant` ({bits, group_size}) / cast to `cast`."""
    out = {}
    for proj in PROJECTIONS:
        name = f"model.layers.{layer}.{arch.module}.{proj}_proj"
        w = weights.get(f"{name}.weight")
        if w is None:
            raise ConvertError(f"tensor {name}.weight missing from the source (after mlx-lm's sanitize)")
        if f"{name}.scales" in weights:
            out.update({f"{proj}.weight": w, f"{proj}.scales": weights[f"{name}.scales"]})
            out[f"{proj}.biases"] = weights[f"{name}.biases"]
        elif not mx.issubdtype(w.dtype, mx.floating):
            raise ConvertError(
                f"{name}: packed {w.dtype} codes without stacked {name}.scales (mlx-lm saves quantized experts stacked)"
            )
        elif quant:
            w = w.astype(cast) if cast else w
            codes, scales, biases = mx.quantize(w, group_size=quant["group_size"], bits=quant["bits"])
            out.update({f"{proj}.weight": codes, f"{proj}.scales": scales, f"{proj}.biases": biases})
        else:
            out[f"{proj}.weight"] = w.astype(cast) if cast else w
    return out


def experts_quantization(t: dict[str, mx.array], arch: MoEArch) -> dict | None:
    """{"gate"|"up"|"down": {bits, group_size}} from the stacked tensors' shapes."""
    if "gate.scales" not in t:
        return None
    q = {}
    for proj in PROJECTIONS:
        in_dim = arch.expert_size if proj == "down" else arch.hidden_size
        w, s = t[f"{proj}.weight"], t[f"{proj}.scales"]
        q[proj] = {"bits": w.shape[-1] * 32 // in_dim, "group_size": in_dim // s.shape[-1]}
    return q


class MoEBundleWriter(BundleWriter):
    """BundleWriter for expert blocks: a layer's experts are packed and written one record at a time."""

    spec: ExpertSpec

    def add_experts(self, layer: int, t: dict[str, mx.array]) -> None:
        spec, h = self.spec, hashlib.sha256()
        offset = self._ffn.tell()
        mx.eval(t)
        for e in range(spec.num_experts):
            parts = {name: to_numpy_bytes(t[name][e]).reshape(1, -1) for name in spec.record.names()}
            data = spec.record.pack(parts).tobytes()
            h.update(data)
            self._ffn.write(data)
        spec.layers.append(ExpertBlock(layer, offset, spec.num_experts, h.hexdigest()))


def write_moe_bundle(
    out: str | Path,
    config: dict,
    arch: MoEArch,
    resident: dict[str, mx.array],
    experts,
    tokenizer_dir: Path | None = None,
    routing: dict | None = None,
) -> Path:
    """Write an MoE bundle: resident tensors (mlx-lm names, no routed experts) and, per layer of
    `arch.layers` in order, its stacked expert tensors (`expert_tensors`' form)."""
    experts = iter(experts)
    first = next(experts)
    q = experts_quantization(first, arch)
    dtype = str((first["gate.scales"] if q else first["gate.weight"]).dtype).removeprefix("mlx.core.")
    layout = expert_layout(arch.hidden_size, arch.expert_size, dtype, q)
    spec = ExpertSpec(
        arch.hidden_size, arch.expert_size, arch.num_experts, arch.top_k, arch.module, dtype, q, layout, routing=routing
    )
    with MoEBundleWriter(out, spec) as writer:
        for layer, t in zip(arch.layers, _chain(first, experts)):
            if experts_quantization(t, arch) != q:
                raise ConvertError(f"layer {layer}: experts' quantization differs from layer {arch.layers[0]}'s")
            writer.add_experts(layer, t)
        if len(spec.layers) != len(arch.layers):
            raise ConvertError(f"got experts for {len(spec.layers)} layers, the model has {len(arch.layers)}")
        return writer.finish(config, resident, tokenizer_dir)


def _chain(first, rest):
    yield first
    yield from rest


def read_experts(bundle: MoEBundle, i: int) -> dict[str, np.ndarray]:
    """Block i's stacked expert fields {name: (E, rows, cols)} read back from disk (tests, inspection)."""
    spec = bundle.spec
    with open(bundle.ffn_path, "rb") as f:
        f.seek(spec.layers[i].offset)
        raw = np.frombuffer(f.read(spec.block_bytes(i)), dtype=np.uint8).reshape(spec.layers[i].experts, -1)
    out = {}
    for fl in spec.record.fields:
        np_dtype = np.uint16 if fl.dtype == "bfloat16" else np.dtype(fl.dtype)
        out[fl.name] = (
            raw[:, fl.offset : fl.offset + fl.nbytes].copy().view(np_dtype).reshape(-1, *spec.field_shape(fl.name))
        )
    return out
