"""The FFN activations a bundle may record (`flash.activation`) and the functions the runtime applies.

The converter refuses any other name (arch/registry.py maps configs' spellings onto these); the
runtime's FFN applies the function recorded. gelu_tanh is gemma2/3's nn.gelu_approx. The ReLU family
gives exact zeros, so its predictor learns the non-zero set (the paper's setting):

- relu: ReLU (OPT, ReluLLaMA);
- fatrelu: ReLU with a threshold, x where x > t else 0 (ProSparse, MiniCPM-S; t is the config's
  `hidden_act_param`, recorded as `flash.activation_threshold`), on the gate of a gated FFN;
- drelu: ReLU on both the gate and the up projection, relu(gate) * relu(up) (TurboSparse's dReLU).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": nn.gelu_approx, "gelu": nn.gelu, "relu": nn.relu}
ACTIVATIONS.update(fatrelu=nn.relu, drelu=nn.relu)  # fatrelu's threshold: activation_fn
SPARSE = ("relu", "fatrelu", "drelu")  # exact zeros: selectors pick the non-zero set
UP_ACTIVATED = ("drelu",)  # the up projection passes through the activation too


def activation_fn(name: str, threshold: float = 0.0) -> Callable[[mx.array], mx.array]:
    """The function the FFN applies to the gate (or, ungated, the up projection)."""
    if name == "fatrelu":
        return lambda x: mx.where(x > threshold, x, mx.zeros_like(x))
    return ACTIVATIONS[name]


def is_sparse(name: str) -> bool:
    return name in SPARSE
