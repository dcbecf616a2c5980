"""The FFN activations a bundle may record (`flash.activation`), by the names configs use.

The converter refuses any other name; the runtime's FFN applies the function recorded."""

from __future__ import annotations

import mlx.nn as nn

ACTIVATIONS = {"silu": nn.silu, "relu": nn.relu, "gelu": nn.gelu}
