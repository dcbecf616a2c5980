"""The KV cache's share of the memory budget. `--max-kv-size N` bounds a conversation to N tokens (mlx-lm's
RotatingKVCache, which never grows past N) and the planner reserves N tokens' keys and values inside the
budget, stored in float16 even where the math runs in float32 (the CPU), as Metal keeps them; `--kv-bits B`
stores them quantized (mlx-lm's QuantizedKVCache: B bits per value plus a scale and bias per group of 64,
in the activations' dtype). Without `--max-kv-size` the KV cache grows with the context, outside the
budget, as the load report says.

A bounded context also bounds the compute buffer, the memory a forward pass allocates and frees (attention
scores, float32 copies of a layer's keys and values, a dequantized weight slice): as llama.cpp reports its
compute buffer beside the model and the KV cache, the load report states it as part of the fixed overhead,
and each prompt is prefilled in steps small enough to stay inside it (`prefill_step`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache, make_prompt_cache

from ..errors import UsageError

KV_GROUPS = (64, 32)  # values per quantization group: mlx-lm's default, else the smallest mlx allows
KV_BITS = (2, 3, 4, 6, 8)
MAX_PREFILL_STEP = 512  # prompt tokens per forward pass (llama.cpp's default batch)
MIN_PREFILL_STEP = 16
BUFFER_STEP = 32  # the compute buffer lets a prompt step of this many tokens run at the full context
WEIGHT_SLICE_ROWS = 4096  # runtime/cpu.py dequantizes at most this many rows of a weight at once


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


def step_scratch_bytes(config: dict, step: int, context: int) -> int:
    """An upper estimate of what one float32 forward pass of `step` tokens over `context` cached tokens
    allocates and frees; tests/test_conversations.py checks it against MLX's measured peak."""
    hidden, ffn = config.get("hidden_size", 0), config.get("intermediate_size", 0)
    heads = config.get("num_attention_heads") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    weight_slice = min(WEIGHT_SLICE_ROWS, max(hidden, ffn)) * hidden * 4  # a prompt's dequantized weight slice
    layer_kv = 2 * kv_heads * head_dim(config) * context * 4  # one layer's keys and values in float32
    per_token = 4 * (8 * hidden + 4 * ffn + 2 * heads * context)  # activations; scores and their softmax
    return weight_slice + layer_kv + step * per_token


def prefill_step(config: dict, context: int, buffer_bytes: int) -> int:
    """The largest prompt step (MIN_PREFILL_STEP..MAX_PREFILL_STEP tokens) whose scratch at `context`
    tokens fits `buffer_bytes`; MAX_PREFILL_STEP where no buffer is set (an unbounded context)."""
    if not buffer_bytes:
        return MAX_PREFILL_STEP
    fixed = step_scratch_bytes(config, 0, context)
    per_token = step_scratch_bytes(config, 1, context) - fixed
    return max(MIN_PREFILL_STEP, min(MAX_PREFILL_STEP, (buffer_bytes - fixed) // per_token))


@dataclass(frozen=True)
class KVPlan:
    """What the KV cache may hold: `tokens` (None: unbounded, outside the budget), stored at `bits`."""

    tokens: int | None
    bits: int | None
    bytes_per_token: int
    group: int | None = None  # quantization group, with bits
    half: bool = False  # stored in float16 while the math runs in float32 (a bounded cache on the CPU)
    buffer_bytes: int = 0  # the compute buffer a bounded context needs (outside the budget, stated), else 0

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
            f"{self.reserved_bytes / 1e6:.1f} MB ({per_k:.1f} MB per 1k tokens); compute buffer "
            f"{self.buffer_bytes / 1e6:.1f} MB beside it (fixed overhead): prompts run {BUFFER_STEP}+ tokens a step"
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
    buffer = step_scratch_bytes(config, BUFFER_STEP, max_kv_size) if max_kv_size else 0
    return KVPlan(max_kv_size, kv_bits, per_token, kv_group(config), half, buffer)


class SharedCopies:
    """A KV cache whose deepcopy (what mlx-lm's LRU prompt cache hands out for a kept conversation) shares
    the keys' and values' memory: an MLX array is never changed in place while another holds its buffer,
    so the kept cache and its working copy cost one cache until they diverge, and a kept one evicted right
    after the copy (one long conversation) costs nothing; a deep copy would hold two for a moment."""

    def __deepcopy__(self, memo: dict) -> SharedCopies:
        out = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, mx.array):
                setattr(out, name, value.view(value.dtype))
            elif isinstance(value, tuple) and value and all(isinstance(v, mx.array) for v in value):
                setattr(out, name, tuple(v.view(v.dtype) for v in value))  # a quantized cache's parts
        return out


class SharedRotatingKVCache(SharedCopies, RotatingKVCache):
    pass


class SharedQuantizedKVCache(SharedCopies, QuantizedKVCache):
    pass


class HalfRotatingKVCache(SharedRotatingKVCache):
    """mlx-lm's rotating cache storing float16 keys and values while attention runs in float32: half the
    bytes of a float32 cache, the precision Metal keeps anyway."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        k, v = super().update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))
        return k.astype(keys.dtype), v.astype(values.dtype)


def make_kv_cache(model: nn.Module, plan: KVPlan | None) -> list:
    """A fresh per-layer KV cache for `model` as `plan` says (mlx-lm's cache classes)."""
    if plan is not None and plan.bits:
        # quantized from the first token; its size is bounded by the context check, not by rotation
        return [SharedQuantizedKVCache(group_size=plan.group, bits=plan.bits) for _ in model.layers]
    if plan is not None and plan.tokens:  # as mlx-lm's make_prompt_cache(model, max_kv_size) builds it
        cache_class = HalfRotatingKVCache if plan.half else SharedRotatingKVCache
        return [cache_class(max_size=plan.tokens, keep=4) for _ in model.layers]
    return make_prompt_cache(model)
