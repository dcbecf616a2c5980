"""The FFN activations a bundle may record (`flash.activation`) and the functions the runtime applies.

The converter refuses any other name (arch/registry.py maps configs' spellings onto these); the
runtime's FFN applies the function recorded. gelu_tanh is gemma2/3's nn.gelu_approx."""

from __future__ import annotations

import mlx.nn as nn

ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": nn.gelu_approx, "gelu": nn.gelu, "relu": nn.relu}
