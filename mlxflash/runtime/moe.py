"""MoE models from flash: mlx-lm's own MoE model with each layer's SwitchGLU swapped for `StreamingExperts`.

The router, the top-k scores, shared experts and everything around them stay mlx-lm's code. The
streaming module gets (x, indices) exactly as SwitchGLU does. It reads the router's choice back once
per layer (one evaluation of the top-k indices), then:

- decode (one token): the routed experts missing from the layer's `ExpertSlots` cache are read
  (all in flight at once) into the slots the policy frees, and mlx-lm's gather_mm / gather_qmm run on
  the slot indices; the cached experts compute (asynchronously) while the missing ones are read. When the cache has fewer slots than the token's experts, they are computed in
  rounds of at most `slots` experts (each round evaluated before its slots are reused).
- prompt (many tokens touch most experts): the layer's block is read sequentially in slices of
  `prompt_slots` experts into a buffer shared by all layers; each slice computes the (token, expert)
  pairs routed to it; the last token's experts are copied into the cache as their slice passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from ..arch.registry import model_classes
from ..errors import UsageError
from ..format.bundle import mx_dtype
from ..format.moe import MoEBundle
from .costmodel import DiskCurve, plan_io
from .experts import ExpertIndex, ExpertSlots, switch_glu
from .kv import KVPlan, kv_plan
from .model import CACHE_LIMIT, _load_resident, hold_freed_memory_to_budget
from .moe_plan import MoEPlan
from .planner import MODES, Budget, PlanRequest, plan
from .reader import SPLIT_BYTES, FlashReader
from .stats import RuntimeStats, TokenStats, current_rss_bytes
from .traces import Trace


class StreamingExperts(nn.Module):
    """One layer's routed experts, streamed from the bundle: a drop-in for mlx-lm's SwitchGLU."""

    def __init__(self, bundle: MoEBundle, block: int, reader: FlashReader, slots: int, policy: str, prompt, stats):
        super().__init__()
        spec = bundle.spec
        self._spec, self._q = spec, spec.quantization
        self._offset = spec.layers[block].offset
        self._reader, self._stats, self._prompt_buf = reader, stats, prompt
        self._index = ExpertIndex(spec.num_experts, slots, policy)
        self._slots = ExpertSlots(spec, self._index.slots)
        self._pending: mx.array | None = None  # the last output computed from the slots
        self.routes: list[np.ndarray] | None = None  # when a list, each call's routing (tokens, k) goes here

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        inds = np.array(indices)  # the router's choice, read back once per layer: (..., k)
        if self.routes is not None:
            self.routes.append(inds.reshape(-1, inds.shape[-1]))
        if self._pending is not None:  # slots are about to be overwritten: finish what reads them
            mx.eval(self._pending)
        if x.size // x.shape[-1] > 1 and self._prompt_buf is not None:
            y = self._prompt(x, inds)
        else:
            y = self._decode(x, inds)
        self._pending = y
        return y

    def _decode(self, x: mx.array, inds: np.ndarray) -> mx.array:
        index, xe = self._index, mx.expand_dims(x, (-2, -3))  # (..., 1, 1, d) as SwitchGLU
        index.begin_token()
        groups = index.rounds(np.unique(inds))
        if len(groups) == 1 and inds.size == inds.shape[-1]:  # one token whose experts all fit
            return self._decode_overlapped(xe, inds, groups[0])
        y = None
        for group in groups:
            if y is not None:
                mx.eval(y)  # the next round reuses slots this one reads
            loads = index.admit(group)
            self._slots.read(self._reader, self._offset, loads)
            self._stats.loaded += len(loads)
            in_group = np.isin(inds, group)
            slot = mx.array(np.where(in_group, index.slot_of[inds], 0).astype(np.uint32))
            part = switch_glu(xe, self._slots.fields, slot, self._q)  # (..., k, 1, d)
            if len(groups) > 1:
                part = part * mx.array(in_group)[..., None, None].astype(part.dtype)
            y = part if y is None else y + part
        self._stats.selected += inds.size
        self._stats.computed += inds.size
        return y.squeeze(-2)

    def _decode_overlapped(self, xe: mx.array, inds: np.ndarray, group: np.ndarray) -> mx.array:
        """The cached experts compute while the missing ones are read (into slots the cached ones do
        not use); each expert's output is the same as computing all k at once."""
        index, k = self._index, inds.shape[-1]
        cached = index.slot_of[inds.reshape(-1)] >= 0  # (k,) before admit moves anything
        loads = index.admit(group)
        slot = index.slot_of[inds.reshape(-1)].astype(np.uint32)
        order = np.concatenate([np.flatnonzero(cached), np.flatnonzero(~cached)])
        parts = []
        if cached.any():
            parts.append(self._experts(xe, slot[cached], inds.shape))
            mx.async_eval(parts[0])
        self._slots.read(self._reader, self._offset, loads)
        if not cached.all():
            parts.append(self._experts(xe, slot[~cached], inds.shape))
        self._stats.loaded += len(loads)
        self._stats.selected += k
        self._stats.computed += k
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-3)  # (..., k, 1, d) in `order`
        if len(parts) > 1:
            y = mx.take(y, mx.array(np.argsort(order).astype(np.uint32)), axis=-3)
        return y.squeeze(-2)

    def _experts(self, xe: mx.array, slots: np.ndarray, shape: tuple[int, ...]) -> mx.array:
        idx = mx.array(slots.reshape(*shape[:-1], len(slots)))  # (..., n) slot indices
        return switch_glu(xe, self._slots.fields, idx, self._q)  # (..., n, 1, d)

    def _prompt(self, x: mx.array, inds: np.ndarray) -> mx.array:
        """Slices of experts read in order; each computes the (token, expert) pairs routed to it."""
        buf, index, E = self._prompt_buf, self._index, self._spec.num_experts
        *lead, k = inds.shape
        flat = inds.reshape(-1)  # (P,) pair p is token p // k
        rows = x.reshape(-1, 1, x.shape[-1])  # (tokens, 1, d)
        hits, misses = index.hits, index.misses
        index.begin_token()
        seeds = dict(index.admit(np.unique(inds.reshape(-1, k)[-1])[: index.slots]))  # expert -> slot
        index.hits, index.misses = hits, misses  # the prompt is not part of the decode hit rate
        needed = np.zeros(E, dtype=bool)
        needed[flat] = True
        outs, order = [], []
        for first in range(0, E, buf.slots):
            count = min(buf.slots, E - first)
            ids = np.flatnonzero(needed[first : first + count]) + first
            if len(ids) == 0:
                continue
            if len(ids) * 2 > count:  # most of the slice: one sequential read
                buf.read_run(self._reader, self._offset, first, count)
            else:
                buf.read(self._reader, self._offset, [(e, e - first) for e in ids.tolist()])
            pairs = np.flatnonzero((flat >= first) & (flat < first + count))
            pairs = pairs[np.argsort(flat[pairs], kind="stable")]
            slot = mx.array((flat[pairs] - first).astype(np.uint32))
            y = switch_glu(rows[mx.array(pairs // k)], buf.fields, slot, self._q, sort=True)  # (pairs, 1, d)
            mx.eval(y)  # the next slice overwrites the buffer
            outs.append(y)
            order.append(pairs)
            for e in ids[np.isin(ids, list(seeds))].tolist():
                self._slots.copy_slot(buf, e - first, seeds[e])
        y = mx.concatenate(outs)[mx.array(np.argsort(np.concatenate(order)))]  # back to pair order
        return y.reshape(*lead, k, x.shape[-1])


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    *parents, last = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, value)


@dataclass
class MoERuntime:
    """`model.flash` for MoE bundles: the bundle, reader, plan and counters (FlashRuntime's interface)."""

    bundle: MoEBundle
    mode: str
    reader: FlashReader
    stats: RuntimeStats
    resident_bytes: int
    fixed_overhead_bytes: int
    plan: MoEPlan
    kv: KVPlan  # the KV cache outside the budget (MoE bundles take no --max-kv-size)
    experts: list = field(default_factory=list)

    @property
    def compute_dtype(self) -> str:
        return self.bundle.spec.dtype  # experts and resident weights are used as stored

    @property
    def ffn_bytes(self) -> int:
        return self.bundle.spec.ffn_bytes

    @property
    def context_length(self) -> int | None:
        return self.bundle.config.get("max_position_embeddings")

    @property
    def hit_rate(self) -> float:
        hits = sum(m._index.hits for m in self.experts)
        total = hits + sum(m._index.misses for m in self.experts)
        return hits / total if total else 0.0

    def token_stats(self) -> TokenStats:
        r = self.reader
        return TokenStats(self.mode, self.ffn_bytes, self.resident_bytes, r.direct_io, r.io_note)

    def live(self) -> dict:
        p = self.plan
        return {
            "fixed_overhead_bytes": self.fixed_overhead_bytes,
            "memory_budget": p.budget,
            "expert_slots": p.slots,
            "policy": p.policy,
            "expert_hit_rate": self.hit_rate,
            "expected_hit_rate": p.expected_hit_rate,
            "planned_bytes": p.planned_bytes,
        }

    def begin_prompt(self) -> None:
        """Nothing to do: a prompt's last token is one decode step of the expert cache."""

    def reset(self) -> None:
        for m in self.experts:
            m._index.clear()

    def close(self) -> None:
        self.reader.close()


def record_routes(model: nn.Module, tokens: list[int], chunk: int = 256) -> Trace:
    """The router's choices on `tokens` (fed in chunks with a KV cache): a routing trace of width E."""
    from mlx_lm.models.cache import make_prompt_cache

    rt: MoERuntime = model.flash
    for m in rt.experts:
        m.routes = []
    cache = make_prompt_cache(model)
    for lo in range(0, len(tokens), chunk):
        mx.eval(model(mx.array([tokens[lo : lo + chunk]]), cache=cache))
    per_layer = [np.concatenate(m.routes) for m in rt.experts]  # (tokens, k) per MoE layer
    for m in rt.experts:
        m.routes = None
    spec = rt.bundle.spec
    selections = [[layer[t] for layer in per_layer] for t in range(len(tokens))]
    meta = {"source": f"router of {rt.bundle.path.name}", "top_k": spec.top_k, "layers": [b.layer for b in spec.layers]}
    return Trace.from_selections(selections, [spec.num_experts] * len(per_layer), **meta)


def load_moe_model(
    path: str | Path,
    mode: str | None = None,
    memory: str | int | None = None,
    policy: str = "lru",
    slots: int | None = None,
    threads: int | None = None,
    verify: bool = True,
    trace=None,
    **unused,
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load an MoE bundle as mlx-lm's model whose routed experts stream from the bundle.

    mode: "resident" (every expert in memory), "naive" (the routed experts read afresh every token)
    or "flash" (an expert cache per layer, `policy` lru or lfu); by default flash when `memory` is
    smaller than the model. `slots` overrides the planner's experts per layer. Options of the dense
    flash mode (selector, window, ...) do not apply and are refused."""
    given = {k: v for k, v in unused.items() if v not in (None, False, True)}
    if given:
        raise UsageError(f"options {', '.join(sorted(given))} do not apply to a mixture-of-experts bundle")
    if mode is not None and mode not in MODES:
        raise UsageError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    bundle = MoEBundle.open(path, verify=verify)
    eos = bundle.config.get("eos_token_id")
    tokenizer = load_tokenizer(bundle.path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    budget = Budget.of(bundle, memory)
    # the runtime itself, and the freed buffers MLX may keep under a budget
    overhead = current_rss_bytes() + (CACHE_LIMIT if budget.bytes is not None else 0)
    curve = DiskCurve.load_or_default()
    reader = FlashReader(
        bundle.ffn_path, threads=threads or plan_io(curve, min(bundle.spec.record.nbytes, SPLIT_BYTES)).threads
    )
    _, memory_plan = plan(bundle, budget, PlanRequest(mode=mode, policy=policy, slots=slots, routing=trace), reader)
    mode = memory_plan.mode
    memory_plan.io = f"reads: {reader.threads} threads, {reader.io_note}"
    model_class, args_class = model_classes(bundle.config)
    model = model_class(args_class.from_dict(bundle.config))
    stats = RuntimeStats(io=reader.counters)
    kv = kv_plan(bundle.config, None, None, dtype_bytes=mx_dtype(bundle.spec.dtype).size)
    runtime = MoERuntime(bundle, mode, reader, stats, memory_plan.planned_bytes, overhead, memory_plan, kv)
    prompt = ExpertSlots(bundle.spec, memory_plan.prompt_slots) if memory_plan.prompt_slots else None
    layers = model.layers
    for block, b in enumerate(bundle.spec.layers):
        experts = StreamingExperts(bundle, block, reader, memory_plan.slots, memory_plan.policy, prompt, stats)
        _set(layers[b.layer], bundle.spec.module, experts)
        runtime.experts.append(experts)
    _load_resident(model, bundle, bundle.resident_weights())
    if mode == "resident":  # every expert in its slot once; "lru" never evicts with E slots
        for m in runtime.experts:
            m._slots.read(reader, m._offset, m._index.admit(np.arange(bundle.spec.num_experts)))
            m._index.hits = m._index.misses = 0
    model.eval()
    if budget.bytes is not None:
        hold_freed_memory_to_budget()
    model.flash = runtime
    return model, tokenizer
