"""Model assembly: mlx-lm's architecture class with each block's MLP swapped for the flash FFN.

Attention, KV cache, norms and the LM head stay mlx-lm's; their weights come from
resident.safetensors. The FFN records stay in ffn.bin and reach the FFN modules through the
mode's source: all in memory (`resident`) or the whole block re-read at every token (`naive`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from ..arch.registry import SUPPORTED, model_classes
from ..errors import BundleError, UsageError
from ..format.bundle import Bundle
from ..format.convert import quant_params
from .costmodel import DiskCurve, plan_io
from .cpu import speed_up_prompts
from .ffn import FlashFFN, FlashOptions, NaiveFFN, ResidentFFN
from .kv import KVPlan, kv_plan
from .planner import (
    MODES,
    SELECTORS,
    Plan,
    TooSmall,
    choose_mode,
    model_bytes,
    plan_flash,
    prompt_chunk_rows,
    resident_weights_bytes,
)
from .reader import DIRECT_ALIGN, FlashReader, aligned_buffer
from .selectors import (
    SKETCH_GROUP,
    AllSelector,
    GateSelector,
    PredictorSelector,
    Selector,
    gate_rows,
    gate_sketch,
    predictor_prefix,
)
from .stats import RuntimeStats, TokenStats, current_rss_bytes

DENSITY_MARGIN = 0.9  # re-thresholded selectors aim below the cache's capacity
MIN_DENSITY = 0.05
CACHE_LIMIT = 4 << 20  # bytes of freed buffers MLX may keep for reuse under a memory budget


class BlockSource:
    """Reads layer blocks, whole (naive mode) or in slices of `rows` records (flash prompts), into one
    shared, aligned buffer: the only FFN memory of the naive mode."""

    def __init__(self, bundle: Bundle, reader: FlashReader, rows: int | None = None):
        self.bundle, self.reader = bundle, reader
        spec = bundle.spec
        self.rows = rows or max(b.neurons for b in spec.layers)
        self._buffer, self._view = aligned_buffer(self.rows * spec.record.nbytes)

    def read_block(self, layer: int) -> mx.array:
        return self.read_rows(layer, 0, self.bundle.spec.layers[layer].neurons)

    def read_rows(self, layer: int, first: int, count: int) -> mx.array:
        """Records first..first+count of a layer (count <= rows): (count, R), valid until the next read."""
        spec = self.bundle.spec
        R = spec.record.nbytes
        self.reader.read([(spec.layers[layer].offset + first * R, self._view[: count * R])])
        return self._buffer[: count * R].reshape(count, R)


@dataclass
class FlashRuntime:
    """What `load` attaches to the model as `model.flash`: the bundle, the reader, the plan and counters."""

    bundle: Bundle
    mode: str
    reader: FlashReader
    stats: RuntimeStats
    resident_bytes: int
    fixed_overhead_bytes: int
    plan: Plan
    options: FlashOptions | None = None
    selector: Selector | None = None
    ffns: list = field(default_factory=list)
    kv: KVPlan = field(default_factory=lambda: KVPlan(None, None, 0))

    @property
    def ffn_bytes(self) -> int:
        return self.bundle.spec.ffn_bytes

    @property
    def context_length(self) -> int | None:
        return self.bundle.config.get("max_position_embeddings")

    @property
    def max_kv_size(self) -> int | None:
        """The tokens a conversation may hold where --max-kv-size bounds it (its KV cache is in the budget)."""
        return self.kv.tokens

    def token_stats(self) -> TokenStats:
        r = self.reader
        neurons = sum(b.neurons for b in self.bundle.spec.layers)
        return TokenStats(self.mode, self.ffn_bytes, self.resident_bytes, r.direct_io, r.io_note, neurons)

    def live(self) -> dict:
        """Figures that change as the model runs (cache contents) and the plan's."""
        out = {
            "fixed_overhead_bytes": self.fixed_overhead_bytes,
            "memory_budget": self.plan.budget,
            "kv_reserved_bytes": self.kv.reserved_bytes,
            "max_kv_size": self.kv.tokens,
        }
        if self.mode == "flash":
            caches = [f._cache for f in self.ffns]
            out.update(
                selector=self.plan.selector,
                window=self.options.window,
                cache_capacity=self.plan.capacity,
                cached_neurons=sum(c.used for c in caches),
                dropped_neurons=sum(c.dropped for c in caches),
                planned_bytes=self.plan.planned_bytes,
            )
        return out

    def begin_prompt(self) -> None:
        """The next forward passes are a prompt, up to and including its one-token last step (mlx-lm's
        generate_step feeds the last prompt token alone): compute them all densely, like the rest."""
        for f in self.ffns:
            f.prompt_tail = True

    def reset(self) -> None:
        """Forget the cached neurons (a new conversation)."""
        for f in self.ffns:
            f._cache.clear()

    def close(self) -> None:
        self.reader.close()


def _layers(model: nn.Module) -> list[nn.Module]:
    return model.model.layers


def load_model(
    path: str | Path,
    mode: str | None = None,
    memory: str | int | None = None,
    selector: str | Selector | None = None,
    window: int | None = None,
    gap: int | str | None = None,
    bundled: bool = True,
    masked_prompts: bool = False,
    density: float | None = None,
    gate_bits: int | None = None,
    verify: bool = True,
    threads: int | None = None,
    retain: bool = False,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a bundle as an mlx-lm model whose FFNs live in the bundle; `model.flash` holds the runtime.

    mode: "resident", "naive" or "flash"; by default "flash" when `memory` is smaller than the model.
    threads default to the disk cost model's choice; gap (records read through between needed ones)
    defaults to 0 (only adjacent records are merged), "auto" takes the cost model's: fewer, larger reads
    at the price of more bytes. retain keeps neurons past the window while the cache has room (no reads,
    more compute; off by default: on the default model it did not improve answers). max_kv_size bounds a
    conversation's tokens and reserves their KV cache (kv_bits: quantized) inside the budget (runtime/kv.py).
    """
    if mode is not None and mode not in MODES:
        raise UsageError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    bundle = Bundle.open(path, verify=verify)
    eos = bundle.config.get("eos_token_id")
    tokenizer = load_tokenizer(bundle.path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    overhead = current_rss_bytes()  # the runtime itself: Python, MLX, mlx-lm, the tokenizer
    kv = kv_plan(bundle.config, max_kv_size, kv_bits)
    mode, budget = choose_mode(bundle, mode, memory, kv.reserved_bytes)
    config = bundle.config
    if config.get("model_type") not in SUPPORTED:
        raise BundleError(
            f"{bundle.path}/config.json: unsupported architecture model_type={config.get('model_type')!r}"
        )
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    io_plan = plan_io(DiskCurve.load_or_default(), bundle.spec.record.nbytes)
    reader = FlashReader(bundle.ffn_path, threads=threads or io_plan.threads)
    if gap is None:
        gap = 0
    elif gap == "auto":  # what the cost model says is cheaper to read than to skip (a page at least)
        page = DIRECT_ALIGN // bundle.spec.record.nbytes - 1 if reader.direct_io else 0
        gap = max(0, page, io_plan.gap_bytes // bundle.spec.record.nbytes)
    stats = RuntimeStats(io=reader.counters)
    weights = bundle.resident_weights()
    biases = "model.layers.0.mlp.up_bias" in weights
    spec = bundle.spec
    plan = Plan(mode, budget, model_bytes(bundle), resident_weights_bytes(bundle), 0, 0, kv_bytes=kv.reserved_bytes)
    runtime = FlashRuntime(bundle, mode, reader, stats, plan.resident_bytes, overhead, plan, kv=kv)
    if mode == "flash":
        runtime.selector, plan = _plan_flash(
            bundle, reader, weights, selector, budget, window, density, gate_bits, kv.reserved_bytes
        )
        runtime.plan = plan
        runtime.options = FlashOptions(
            window=plan.window,
            gap=gap,
            bundled=bundled,
            masked_prompts=masked_prompts,
            retain=retain,
            parts=record_parts_spans(spec),
        )
        plan.io = f"reads: {reader.threads} threads, {reader.io_note}, read-through gap {gap} records"
    blocks = None
    if mode != "resident":  # flash reads prompts' blocks in slices; naive needs whole blocks
        blocks = BlockSource(bundle, reader, prompt_chunk_rows(spec) if mode == "flash" else None)
    for i, block in enumerate(_layers(model)):
        if mode == "flash":
            block.mlp = FlashFFN(
                i, spec, stats, blocks, reader, runtime.selector, plan.capacity, runtime.options, biases
            )
            runtime.ffns.append(block.mlp)
        elif mode == "naive":
            block.mlp = NaiveFFN(i, spec, stats, blocks, biases)
        else:
            block.mlp = ResidentFFN(i, spec, stats, biases)
    _load_resident(model, bundle, {k: v for k, v in weights.items() if ".mlp.predictor." not in k})
    if mode == "resident":
        _load_all_records(bundle, reader, model)
        runtime.resident_bytes += spec.ffn_bytes
    elif mode == "flash":
        runtime.resident_bytes += plan.selector_bytes + plan.prompt_buffer_bytes + plan.cache_bytes
    model.eval()
    if budget is not None:  # freed buffers go back to the system instead of MLX's cache
        mx.set_cache_limit(CACHE_LIMIT)
    model.flash = runtime
    return model, tokenizer


def _load_resident(model: nn.Module, bundle: Bundle, weights: dict) -> None:
    qcfg = bundle.config.get("quantization")
    if qcfg:
        nn.quantize(
            model,
            class_predicate=lambda p, m: (
                f"{p}.scales" in weights and hasattr(m, "to_quantized") and quant_params(qcfg, p)
            ),
        )
        speed_up_prompts(model)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise BundleError(f"{bundle.path}/resident.safetensors: does not match the config ({e})") from e
    mx.eval(model.parameters())


def read_all_records(bundle: Bundle, reader: FlashReader) -> list[mx.array]:
    """Every layer's records (n, R), read once through the reader."""
    spec = bundle.spec
    buffers = [aligned_buffer(spec.block_bytes(i)) for i in range(bundle.num_layers)]
    reader.read([(spec.layers[i].offset, view) for i, (_, view) in enumerate(buffers)])
    return [buf.reshape(spec.layers[i].neurons, spec.record.nbytes) for i, (buf, _) in enumerate(buffers)]


def _load_all_records(bundle: Bundle, reader: FlashReader, model: nn.Module) -> None:
    for records, block in zip(read_all_records(bundle, reader), _layers(model)):
        block.mlp.set_records(records)


def _plan_flash(
    bundle, reader, weights, choice, budget, window, density, gate_bits, kv_bytes=0
) -> tuple[Selector, Plan]:
    """The selector and the plan. A predictor or gate selector whose density does not fit the budget
    is re-thresholded (predictor: from its score quantiles; gate: top-k) to the largest that does."""
    selector = make_selector(bundle, reader, weights, choice, density, gate_bits)
    explicit = (
        density
        if density is not None
        else (getattr(selector, "top_k", None) or 0) / bundle.spec.intermediate_size or None
    )
    try:
        return selector, plan_flash(
            bundle, budget, selector.kind, selector.resident_bytes, window, explicit, reader.scratch_bytes, kv_bytes
        )
    except TooSmall as e:
        top_k = selector.kind == "gate"  # selects exactly its share: the whole cache may be used
        fits = e.plan.capacity / e.plan.neurons * (1.0 if top_k else DENSITY_MARGIN)
        adjustable = top_k or (selector.kind == "predictor" and (bundle.spec.selector or {}).get("density_grid"))
        if density is not None or not adjustable or fits < MIN_DENSITY:
            raise
        density = fits if top_k else math.floor(fits / MIN_DENSITY) * MIN_DENSITY
        selector = make_selector(bundle, reader, weights, choice, density, gate_bits)
        plan = plan_flash(
            bundle, budget, selector.kind, selector.resident_bytes, window, density, reader.scratch_bytes, kv_bytes
        )
        plan.note = (
            f"{selector.kind} selector set to density {density:.2f} (trained at {e.plan.density:.2f}) to fit the budget"
        )
        return selector, plan


def make_selector(
    bundle: Bundle,
    reader: FlashReader,
    weights: dict,
    choice: str | Selector | None,
    density: float | None = None,
    gate_bits: int | None = None,
) -> Selector:
    """The selector asked for, else the one recorded in the bundle."""
    if isinstance(choice, Selector) or (choice is not None and not isinstance(choice, str)):
        return choice
    recorded = bundle.spec.selector or {}
    choice = choice or recorded.get("kind")
    if choice is None:
        raise UsageError(
            f"{bundle.path}: flash mode needs a selector and this bundle has no predictors; train them with "
            "`python tools/train_predictors.py BUNDLE --text FILE`, or pass --selector gate (gated FFNs) or all"
        )
    if choice not in SELECTORS:
        raise UsageError(f"selector {choice!r}: expected one of {', '.join(SELECTORS)}")
    spec = bundle.spec
    if choice == "all":
        return AllSelector([b.neurons for b in spec.layers])
    if choice == "predictor":
        if "predictor_threshold" not in recorded or predictor_prefix(0) + "a.weight" not in weights:
            raise UsageError(
                f"{bundle.path}: no predictors in this bundle; train them with `python tools/train_predictors.py {bundle.path} --text FILE`"
            )
        if density is None:
            return PredictorSelector(weights, recorded["predictor_threshold"])
        if "score_quantiles" not in recorded:
            raise UsageError(
                f"{bundle.path}: these predictors carry no score quantiles; retrain them to choose a density"
            )
        grid = recorded["density_grid"]
        logits = [float(np.interp(density, grid, q)) for q in recorded["score_quantiles"]]
        return PredictorSelector(weights, logits=logits)
    if not spec.gated:
        raise UsageError(f"{bundle.path}: the gate selector needs a gated (SwiGLU) FFN")
    if gate_bits is None and choice == recorded.get("kind"):
        gate_bits = recorded.get("gate_bits")
    if density is None and gate_bits is not None:  # thresholds were calibrated on the exact gate: use top-k
        density = recorded.get("gate_density")
    if density is None and "gate_threshold" not in recorded:
        raise UsageError(
            f"{bundle.path}: no calibrated gate thresholds; run `python tools/train_predictors.py {bundle.path} "
            "--text FILE`, or give a --density"
        )
    gates, q = gate_rows(bundle, BlockSource(bundle, reader)), spec.quantization
    if gate_bits is not None:  # a lossy, smaller copy of the gate, for selection only
        gates, q = gate_sketch(gates, q, gate_bits), {"gate": {"bits": gate_bits, "group_size": SKETCH_GROUP}}
    if density is not None:
        return GateSelector(gates, q, None, top_k=max(1, int(round(density * spec.intermediate_size))))
    return GateSelector(gates, q, recorded["gate_threshold"])


def record_parts_spans(spec) -> list[tuple[int, int]]:
    """(offset, bytes) of the gate, up and down parts of a record (for the unbundled ablation)."""
    spans = {}
    for f in spec.record.fields:
        part = f.name.split(".")[0]
        lo, hi = spans.get(part, (f.offset, f.offset))
        spans[part] = (min(lo, f.offset), max(hi, f.offset + f.nbytes))
    return [(lo, hi - lo) for lo, hi in spans.values()]
