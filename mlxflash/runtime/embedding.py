"""The input embedding left on the SSD (flash mode, models whose LM head is not the embedding).

A token needs one row of the embedding table, and the table is a tenth of a 1.5B model (146 MB of
Qwen2.5-1.5B's 1.42 GB): flash mode reads each forward's rows from a read-only memory map of
resident.safetensors instead of holding it, and the budget's bytes go to the neuron cache. The pages of
rows read stay in the OS's page cache (clean, reclaimable): a few KB per distinct token.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..format.bundle import EMBEDDING_PREFIX, Bundle
from ..format.quant import quant_params
from .dtypes import f32_dequantize


class StreamedEmbedding(nn.Module):
    """Drop-in for mlx-lm's `embed_tokens` (nn.Embedding or nn.QuantizedEmbedding lookups): the same rows,
    dequantized as PromptQuantizedEmbedding does, with no parameters in memory."""

    def __init__(self, bundle: Bundle, dtype: mx.Dtype):
        super().__init__()
        names = bundle.streamed_embedding
        self._rows = {name[len(EMBEDDING_PREFIX) :]: m for name, m in bundle.resident_rows(names).items()}
        self._bf16 = {k for k in self._rows if bundle.resident_header[1][EMBEDDING_PREFIX + k]["dtype"] == "BF16"}
        qcfg = bundle.config.get("quantization")
        self._q = quant_params(qcfg, EMBEDDING_PREFIX.rstrip(".")) if "scales" in self._rows else None
        self._dtype = dtype

    def _take(self, name: str, ids: np.ndarray) -> mx.array:
        rows = mx.array(np.ascontiguousarray(self._rows[name][ids]))  # (u, ...) only these rows' pages are read
        return rows.view(mx.bfloat16) if name in self._bf16 else rows

    def __call__(self, x: mx.array) -> mx.array:
        tokens = np.asarray(x).reshape(-1)
        ids, where = np.unique(tokens, return_inverse=True)  # each distinct token's row read once
        if self._q:
            biases = self._take("biases", ids) if "biases" in self._rows else None
            rows = f32_dequantize(
                self._take("weight", ids),
                self._take("scales", ids),
                biases,
                self._q["group_size"],
                self._q["bits"],
                self._dtype,
            )
        else:
            rows = self._take("weight", ids).astype(self._dtype)
        return rows[mx.array(where.astype(np.int32))].reshape(*x.shape, -1)  # (..., d)
