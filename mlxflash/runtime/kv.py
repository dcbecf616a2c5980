"""The KV cache's share of the memory budget. `--max-kv-size N` bounds a conversation to N tokens (mlx-lm's
RotatingKVCache, which never grows past N) and the planner reserves N tokens' keys and values inside the
budget; `--kv-bits B` stores them quantized (mlx-lm's QuantizedKVCache: B bits per value plus a float16
scale and bias per group of 64). Without `--max-kv-size` the KV cache grows with the context, outside the
budget, as the load report says."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

from ..errors import UsageError

KV_GROUP = 64  # values per quantization group (mlx-lm's default kv_group_size)
KV_BITS = (2, 3, 4, 6, 8)
DTYPE_BYTES = 2  # keys and values in float16 (Metal); on the CPU the compute dtype, float32, is passed in


def kv_bytes_per_token(config: dict, dtype_bytes: int = DTYPE_BYTES, bits: int | None = None) -> int:
    """KV-cache bytes one token of context costs (all layers, keys and values), `bits` when quantized."""
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    kv_heads = config.get("num_key_value_heads") or heads
    values = 2 * config.get("num_hidden_layers", 0) * kv_heads * head_dim
    if bits is None:
        return values * dtype_bytes
    return values * bits // 8 + values // KV_GROUP * 2 * dtype_bytes  # packed values + scales and biases


@dataclass(frozen=True)
class KVPlan:
    """What the KV cache may hold: `tokens` (None: unbounded, outside the budget), stored at `bits`."""

    tokens: int | None
    bits: int | None
    bytes_per_token: int

    @property
    def reserved_bytes(self) -> int:
        """The bytes the budget sets aside: the whole context it allows."""
        return (self.tokens or 0) * self.bytes_per_token

    def bytes_for(self, tokens: int) -> int:
        return tokens * self.bytes_per_token

    def describe(self) -> str:
        stored = f"{self.bits}-bit" if self.bits else "float16"
        per_k = self.bytes_per_token * 1024 / 1e6
        if self.tokens is None:
            return f"  KV cache (outside the budget; --max-kv-size counts it): {stored}, {per_k:.1f} MB per 1k tokens"
        return (
            f"  KV cache (in the budget): {self.tokens} tokens fit (--max-kv-size), {stored}, "
            f"{self.reserved_bytes / 1e6:.1f} MB ({per_k:.1f} MB per 1k tokens)"
        )


def kv_plan(config: dict, max_kv_size: int | None, kv_bits: int | None, dtype_bytes: int = DTYPE_BYTES) -> KVPlan:
    """The KV cache's plan; `dtype_bytes`: its keys' and values' dtype, the compute dtype (float32 on the CPU)."""
    if max_kv_size is not None and max_kv_size < 1:
        raise UsageError(f"--max-kv-size {max_kv_size}: must be at least 1 token")
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise UsageError(f"--kv-bits {kv_bits}: expected one of {', '.join(map(str, KV_BITS))}")
    context = config.get("max_position_embeddings")
    if max_kv_size and context and max_kv_size > context:
        max_kv_size = context  # no conversation can be longer than the model's context anyway
    return KVPlan(max_kv_size, kv_bits, kv_bytes_per_token(config, dtype_bytes, kv_bits))


def make_kv_cache(model: nn.Module, plan: KVPlan | None) -> list:
    """A fresh per-layer KV cache for `model` as `plan` says (mlx-lm's cache classes)."""
    if plan is not None and plan.bits:
        # quantized from the first token; its size is bounded by the context check, not by rotation
        return [QuantizedKVCache(group_size=KV_GROUP, bits=plan.bits) for _ in model.layers]
    return make_prompt_cache(model, plan.tokens if plan else None)
