"""The KV cache's share of the memory budget. `--max-kv-size N` bounds a conversation to N tokens (mlx-lm's
RotatingKVCache, which never grows past N) and the planner reserves N tokens' keys and values inside the
budget, stored in float16 even where the math runs in float32 (the CPU), as Metal keeps them; `--kv-bits B`
stores them quantized (mlx-lm's QuantizedKVCache: B bits per value plus a scale and bias per group of 64,
in the activations' dtype). Without `--max-kv-size` the KV cache grows with the context, outside the
budget, as the load report says."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache, make_prompt_cache

from ..errors import UsageError

KV_GROUPS = (64, 32)  # values per quantization group: mlx-lm's default, else the smallest mlx allows
KV_BITS = (2, 3, 4, 6, 8)


def activation_bytes() -> int:
    """Bytes of a key or value: the runtime computes in float32 on the CPU (float16 math is slow there)
    and in the bundle's float16 on Metal (tests/test_conversations.py checks this against a real cache)."""
    return 4 if mx.default_device() == mx.cpu else 2


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config.get("hidden_size", 0) // (config.get("num_attention_heads") or 1)


def kv_group(config: dict) -> int | None:
    """The quantization group for the model's keys and values (it must divide head_dim), or None."""
    return next((g for g in KV_GROUPS if head_dim(config) % g == 0), None)


def kv_bytes_per_token(config: dict, dtype_bytes: int | None = None, bits: int | None = None) -> int:
    """KV-cache bytes one token of context costs (all layers, keys and values), `bits` when quantized."""
    heads = config.get("num_attention_heads") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    values = 2 * config.get("num_hidden_layers", 0) * kv_heads * head_dim(config)
    dtype_bytes = dtype_bytes or activation_bytes()
    if bits is None:
        return values * dtype_bytes
    return (
        values * bits // 8 + values // (kv_group(config) or KV_GROUPS[0]) * 2 * dtype_bytes
    )  # packed values + a scale and bias per group


@dataclass(frozen=True)
class KVPlan:
    """What the KV cache may hold: `tokens` (None: unbounded, outside the budget), stored at `bits`."""

    tokens: int | None
    bits: int | None
    bytes_per_token: int
    group: int | None = None  # quantization group, with bits
    half: bool = False  # stored in float16 while the math runs in float32 (a bounded cache on the CPU)

    @property
    def reserved_bytes(self) -> int:
        """The bytes the budget sets aside: the whole context it allows."""
        return (self.tokens or 0) * self.bytes_per_token

    def bytes_for(self, tokens: int) -> int:
        return tokens * self.bytes_per_token

    def describe(self) -> str:
        float_dtype = "float16" if self.half or activation_bytes() == 2 else "float32"
        stored = f"{self.bits}-bit" if self.bits else float_dtype
        per_k = self.bytes_per_token * 1024 / 1e6
        if self.tokens is None:
            return f"  KV cache (outside the budget; --max-kv-size counts it): {stored}, {per_k:.1f} MB per 1k tokens"
        return (
            f"  KV cache (in the budget): {self.tokens} tokens fit (--max-kv-size), {stored}, "
            f"{self.reserved_bytes / 1e6:.1f} MB ({per_k:.1f} MB per 1k tokens)"
        )


def kv_plan(config: dict, max_kv_size: int | None, kv_bits: int | None, dtype_bytes: int | None = None) -> KVPlan:
    """The KV cache's plan; `dtype_bytes`: its keys' and values' dtype, the compute dtype (float32 on the CPU)."""
    if max_kv_size is not None and max_kv_size < 1:
        raise UsageError(f"--max-kv-size {max_kv_size}: must be at least 1 token")
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise UsageError(f"--kv-bits {kv_bits}: expected one of {', '.join(map(str, KV_BITS))}")
    if kv_bits is not None and kv_group(config) is None:
        raise UsageError(
            f"--kv-bits {kv_bits}: this model's head_dim {head_dim(config)} is not a multiple of "
            f"{KV_GROUPS[-1]} (the smallest quantization group), so its KV cache cannot be quantized"
        )
    context = config.get("max_position_embeddings")
    if max_kv_size and context and max_kv_size > context:
        max_kv_size = context  # no conversation can be longer than the model's context anyway
    dtype_bytes = dtype_bytes or activation_bytes()
    half = bool(max_kv_size) and kv_bits is None and dtype_bytes == 4  # a budgeted cache is kept in float16
    per_token = kv_bytes_per_token(config, 2 if half else dtype_bytes, kv_bits)
    return KVPlan(max_kv_size, kv_bits, per_token, kv_group(config), half)


class HalfRotatingKVCache(RotatingKVCache):
    """mlx-lm's rotating cache storing float16 keys and values while attention runs in float32: half the
    bytes of a float32 cache, the precision Metal keeps anyway."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        k, v = super().update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))
        return k.astype(keys.dtype), v.astype(values.dtype)


def make_kv_cache(model: nn.Module, plan: KVPlan | None) -> list:
    """A fresh per-layer KV cache for `model` as `plan` says (mlx-lm's cache classes)."""
    if plan is not None and plan.bits:
        # quantized from the first token; its size is bounded by the context check, not by rotation
        return [QuantizedKVCache(group_size=plan.group, bits=plan.bits) for _ in model.layers]
    if plan is not None and plan.tokens:  # as mlx-lm's make_prompt_cache(model, max_kv_size) builds it
        cache_class = HalfRotatingKVCache if plan.half else RotatingKVCache
        return [cache_class(max_size=plan.tokens, keep=4) for _ in model.layers]
    return make_prompt_cache(model)
