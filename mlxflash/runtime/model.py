"""Model assembly: mlx-lm's architecture class with each block's MLP swapped for the flash FFN.

Attention, KV cache, norms and the LM head stay mlx-lm's; their weights come from
resident.safetensors. The FFN records stay in ffn.bin and reach the FFN modules through the
mode's source: all in memory (`resident`) or the whole block re-read at every token (`naive`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from ..arch.registry import architecture
from ..errors import BundleError
from ..format.bundle import Bundle, dtype_name
from ..format.quant import quant_params
from . import planner
from .blocks import BlockSource
from .costmodel import DiskCurve, plan_io
from .cpu import release_freed_memory, speed_up_prompts
from .dtypes import cast_floats, compute_dtype
from .embedding import StreamedEmbedding
from .ffn import FlashFFN, FlashOptions, NaiveFFN, ResidentFFN
from .kv import KVPlan, kv_plan
from .planner import Budget, Plan, PlanRequest, parse_loss, prompt_chunk_rows
from .reader import DIRECT_ALIGN, FlashReader, aligned_buffer, scratch_size_for
from .selectors import Selector
from .stats import RuntimeStats, TokenStats, current_rss_bytes

CACHE_LIMIT = 4 << 20  # bytes of freed buffers MLX may keep for reuse under a memory budget


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
    compute_dtype: str = "float32"  # what the math runs in (float32 on the CPU, the bundle's dtype on Metal)
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
        return TokenStats(
            self.mode,
            self.ffn_bytes,
            self.resident_bytes,
            r.direct_io,
            r.io_note,
            neurons,
            compute_dtype=self.compute_dtype,
        )

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
    memory: str | int | Budget | None = None,
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
    overlap: bool = False,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    max_loss: float | str | None = None,
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a bundle as an mlx-lm model whose FFNs live in the bundle; `model.flash` holds the runtime.

    mode: "resident", "naive" or "flash"; by default "flash" when `memory` is smaller than the model.
    threads default to the disk cost model's choice; gap (records read through between needed ones)
    defaults to 0 (only adjacent records are merged), "auto" takes the cost model's: fewer, larger reads
    at the price of more bytes. retain keeps neurons past the window while the cache has room (no reads,
    more compute; off by default: on the default model it did not improve answers). overlap computes the
    cached neurons while the missing ones are read (off by default: on the 2-core CPU the compute slowed the
    reads and full-depth decode lost 5%; the bench's flash-overlap mode measures it on yours). max_kv_size bounds a
    conversation's tokens and reserves their KV cache (kv_bits: quantized) inside the budget (runtime/kv.py).
    max_loss ("2%") runs at the smallest budget (within `memory`) whose measured point in the bundle's
    quality table keeps the perplexity increase within it.
    """
    bundle = Bundle.open(path, verify=verify)
    dtype = compute_dtype(bundle.spec.dtype)  # CPU: float32 (float16 math is ~45x slower); the KV cache too
    kv = kv_plan(bundle.config, max_kv_size, kv_bits, dtype_bytes=dtype.size)
    budget = Budget.of(bundle, memory, kv.reserved_bytes)
    planner.choose_mode(budget, mode)  # a mode the budget cannot take is refused before anything is built
    eos = bundle.config.get("eos_token_id")
    tokenizer = load_tokenizer(bundle.path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    # the runtime itself (Python, MLX, mlx-lm, the tokenizer), the compute buffer a bounded context needs and
    # the freed buffers MLX may keep under a budget
    overhead = current_rss_bytes() + kv.buffer_bytes + (CACHE_LIMIT if budget.bytes is not None else 0)
    config = bundle.config
    arch = architecture(config)
    if arch is None:
        raise BundleError(
            f"{bundle.path}/config.json: unsupported architecture model_type={config.get('model_type')!r}"
        )
    model_class, args_class = arch.classes(config)
    model = model_class(args_class.from_dict(config))
    io_plan = plan_io(DiskCurve.load_or_default(), bundle.spec.record.nbytes)
    reader = FlashReader(bundle.ffn_path, threads=threads or io_plan.threads)
    if gap is None:
        gap = 0
    elif gap == "auto":  # what the cost model says is cheaper to read than to skip (a page at least)
        page = DIRECT_ALIGN // bundle.spec.record.nbytes - 1 if reader.direct_io else 0
        gap = max(0, page, io_plan.gap_bytes // bundle.spec.record.nbytes)
    reader.scratch = scratch_size_for(bundle.spec.record.nbytes, int(gap))  # before the plan counts it
    stats = RuntimeStats(io=reader.counters)
    weights = cast_floats(bundle.resident_weights(), dtype, keep_quant=True)
    biases = "model.layers.0.mlp.up_bias" in weights
    spec = bundle.spec
    try:
        chosen, plan = planner.plan(
            bundle,
            budget,
            PlanRequest(mode, selector, window, density, gate_bits, None if max_loss is None else parse_loss(max_loss)),
            reader,
            weights,
        )
    except Exception:
        reader.close()
        raise
    mode = plan.mode
    runtime = FlashRuntime(bundle, mode, reader, stats, plan.resident_bytes, overhead, plan, selector=chosen, kv=kv)
    runtime.compute_dtype = dtype_name(dtype)
    if mode == "flash":
        runtime.options = FlashOptions(
            window=plan.window,
            gap=gap,
            bundled=bundled,
            masked_prompts=masked_prompts,
            retain=retain,
            overlap=overlap,
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
    resident = {k: v for k, v in weights.items() if ".mlp.predictor." not in k}
    if mode == "flash" and bundle.streamed_embedding:  # an untied input embedding stays on the SSD
        model.model.embed_tokens = StreamedEmbedding(bundle, dtype)
        resident = {k: v for k, v in resident.items() if k not in bundle.streamed_embedding}
    _load_resident(model, bundle, resident)
    if mode == "resident":
        _load_all_records(bundle, reader, model)
        runtime.resident_bytes += spec.ffn_weight_bytes
    elif mode == "flash":
        runtime.resident_bytes += plan.selector_bytes + plan.prompt_buffer_bytes + plan.cache_bytes
    model.eval()
    if budget.bytes is not None:
        hold_freed_memory_to_budget()
    model.flash = runtime
    return model, tokenizer


def hold_freed_memory_to_budget() -> None:
    """Under a budget, freed buffers go back to the system instead of staying in MLX's or malloc's caches."""
    mx.set_cache_limit(CACHE_LIMIT)
    release_freed_memory()


def _load_resident(model: nn.Module, bundle: Bundle, weights: dict) -> None:
    """The resident weights (already in the compute dtype) into the model, as mlx-lm's loader does:
    sanitized by the model class (gemma3 decides there whether its head is tied), then quantized modules."""
    if hasattr(model, "sanitize"):
        weights = model.sanitize(dict(weights))
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


def _load_all_records(bundle: Bundle, reader: FlashReader, model: nn.Module) -> None:
    """Layer by layer: a block's records are read, split into contiguous field matrices (padding
    dropped) and freed, so loading holds one block beside the weights."""
    spec = bundle.spec
    for i, block in enumerate(_layers(model)):
        buf, view = aligned_buffer(spec.block_bytes(i))
        reader.read([(spec.layers[i].offset, view)])
        block.mlp.set_records(buf.reshape(spec.layers[i].neurons, spec.record.nbytes))
        del buf, view


def record_parts_spans(spec) -> list[tuple[int, int]]:
    """(offset, bytes) of the gate, up and down parts of a record (for the unbundled ablation)."""
    spans = {}
    for f in spec.record.fields:
        part = f.name.split(".")[0]
        lo, hi = spans.get(part, (f.offset, f.offset))
        spans[part] = (min(lo, f.offset), max(hi, f.offset + f.nbytes))
    return [(lo, hi - lo) for lo, hi in spans.values()]
