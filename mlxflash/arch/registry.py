"""Which architectures mlxflash runs, and how each one's MLP maps onto the flash FFN.

One `Architecture` per config.json `model_type`: the model class (mlx-lm's, or the project's own
OPT), where the FFN's matrices sit in the checkpoint, which activation the MLP applies and which
config field names it. The converter reads this to build a bundle; the runtime reads it to build the
model whose blocks' `mlp` it swaps for the flash FFN. An architecture not listed here is refused.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import mlx.nn as nn
from mlx_lm.utils import _get_classes

from . import opt
from .activations import ACTIVATIONS  # noqa: F401  (the names the converter may record)

# Config spellings (Hugging Face's ACT2FN names, mlx-lm's function names) -> the bundle's activation.
ACTIVATION_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",  # 0.5x(1 + tanh(0.79788456 x (1 + 0.044715 x^2))): the same formula
    "gelu_tanh": "gelu_tanh",
    "gelu_approx": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "fatrelu": "fatrelu",  # ProSparse / MiniCPM-S (threshold: hidden_act_param)
    "drelu": "drelu",  # TurboSparse: relu on the gate and the up projection
}
GATED = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


@dataclass(frozen=True)
class Architecture:
    """How one model_type's checkpoint and model class map onto the flash FFN."""

    model_type: str
    # The activation its mlx-lm MLP applies, Hugging Face's default when the config names none. The
    # config's own (a ReLU-fied llama's hidden_act="relu") wins: the flash FFN applies what the bundle says.
    activation: str = "silu"
    activation_fields: tuple[str, ...] = ("hidden_act",)  # config fields naming it, first present wins
    # FFN role -> module name under model.layers.N.mlp in the (sanitized) checkpoint
    matrices: dict[str, str] = field(default_factory=lambda: dict(GATED))
    fused_gate_up: str | None = None  # one (2n, d) matrix, gate rows first (phi3): split at conversion
    width_field: str = "intermediate_size"
    ffn_biases: bool = False  # up/down biases (OPT); gated MLPs with biases are refused
    text_model: str | None = None  # a multimodal wrapper converted as its text model (gemma3)
    module: str | None = None  # mlx_lm.models.<module>, if model_type is not its name

    def classes(self, config: dict) -> tuple[type[nn.Module], type]:
        """(Model, ModelArgs): mlx-lm's, or the project's own OPT (mlx-lm has none)."""
        if self.model_type == "opt":
            return opt.Model, opt.ModelArgs
        if self.module:
            m = importlib.import_module(f"mlx_lm.models.{self.module}")
            return m.Model, m.ModelArgs
        return _get_classes(config)

    def activation_setting(self, config: dict) -> tuple[str, str]:
        """(field, value) of the config that names the activation (the default if none does)."""
        for name in self.activation_fields:
            if config.get(name) is not None:
                return name, config[name]
        return self.activation_fields[0], self.activation


def _silu(model_type: str, **kw) -> Architecture:
    return Architecture(model_type, "silu", **kw)


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        _silu("llama"),
        _silu("mistral", module="llama"),  # mlx-lm runs Mistral checkpoints with its llama class
        _silu("qwen2"),
        _silu("qwen3"),
        _silu("olmo2"),
        _silu("helium"),
        _silu("phi3", fused_gate_up="gate_up_proj", matrices={"down_proj": "down_proj"}),
        # mlx-lm's gemma2/gemma3 MLPs apply nn.gelu_approx (tanh form); HF names it gelu_pytorch_tanh
        Architecture("gemma2", "gelu_tanh", ("hidden_activation", "hidden_act")),
        Architecture("gemma3_text", "gelu_tanh", ("hidden_activation", "hidden_act")),
        Architecture("gemma3", "gelu_tanh", ("hidden_activation", "hidden_act"), text_model="gemma3_text"),
        Architecture(
            "opt",
            "relu",
            ("activation_function",),
            matrices={"up_proj": "fc1", "down_proj": "fc2"},
            width_field="ffn_dim",
            ffn_biases=True,
        ),
    )
}
# Mixture-of-experts model types: their routed experts are mlx-lm's SwitchGLU and stream as whole records
# (format/moe.py, runtime/moe.py); attention, router and shared experts stay resident.
MOE_FAMILY = ("qwen3_moe", "qwen2_moe", "mixtral")
ARCHITECTURES.update({t: _silu(t) for t in MOE_FAMILY})
SUPPORTED = tuple(ARCHITECTURES)


def architecture(config: dict) -> Architecture | None:
    return ARCHITECTURES.get(config.get("model_type"))


def model_classes(config: dict) -> tuple[type[nn.Module], type]:
    """(Model, ModelArgs) for a Hugging Face config of a supported architecture."""
    arch = architecture(config)
    if arch is None:
        raise ValueError(f"unsupported architecture model_type={config.get('model_type')!r}")
    return arch.classes(config)


def as_text_model(arch: Architecture, config: dict, weights: dict) -> tuple[dict, dict]:
    """A multimodal wrapper's (config, sanitized weights) -> its text model's, as mlx-lm's wrapper runs it.

    gemma3 is mlx-lm's gemma3_text under `language_model` with the text settings in `text_config`; the
    wrapper's ModelArgs fills in what the text config leaves out (vocab size, head counts)."""
    _, args_class = arch.classes(config)
    text = dict(args_class.from_dict({**config, "text_config": dict(config["text_config"])}).text_config)
    top = {k: v for k, v in config.items() if k not in ("text_config", "vision_config", "architectures")}
    prefix = "language_model."
    if isinstance(top.get("quantization"), dict):  # per-module overrides are named by module path
        top["quantization"] = {k.removeprefix(prefix): v for k, v in top["quantization"].items()}
    text_config = {**top, **text, "model_type": arch.text_model}
    text_weights = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    return text_config, text_weights


def resolve_activation(arch: Architecture, config: dict) -> str:
    """The bundle's activation for this config; ValueError naming the field and value if unsupported."""
    name, value = arch.activation_setting(config)
    if value not in ACTIVATION_NAMES:
        raise ValueError(
            f"{name}={value!r} is not an activation mlxflash computes (known: {', '.join(ACTIVATION_NAMES)})"
        )
    return ACTIVATION_NAMES[value]
