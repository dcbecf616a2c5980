"""The memory-fit report every front end prints at load: what is resident, what streams, the budget."""

from __future__ import annotations

import os

import mlx.nn as nn

MB = 1e6


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine, if the OS says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _mb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / MB:.1f} MB"


def _placement(rt) -> str:
    """Where the bytes are, for the modes whose plan says it in one line (resident, naive)."""
    dense, ffn = rt.plan.resident_bytes, rt.ffn_bytes  # resident weights, predictors aside
    where = f"  in memory: {_mb(dense)} embeddings, attention, norms, LM head"
    if rt.mode == "resident":
        return f"{where} + {_mb(rt.bundle.spec.ffn_weight_bytes)} FFN; streams: nothing"
    return f"{where}; streams: the whole FFN, {_mb(ffn)} from {rt.bundle.ffn_path.name}, every layer at every token"


def _compute(rt) -> str:
    """Which dtype the math runs in, and why when it is not the stored one."""
    stored = rt.bundle.spec.dtype
    if rt.compute_dtype == stored:
        return f"  compute: {rt.compute_dtype}"
    return f"  compute: {rt.compute_dtype} (the bundle stores {stored}; MLX's CPU {stored} math is many times slower)"


def load_report(model: nn.Module) -> str:
    """A few lines saying where the model's bytes live (memory or flash), the budget, the KV cache."""
    rt = model.flash
    bundle = rt.bundle
    name = os.path.basename(os.path.normpath(str(bundle.path)))
    context = rt.context_length
    lines = [f"mlxflash: {name}: {bundle.num_layers} layers" + (f", context {context} tokens" if context else "")]
    plan = getattr(rt, "plan", None)
    if plan is not None:
        lines.append(plan.describe())
    if plan is None or rt.mode != "flash":
        lines.append(_placement(rt))
    lines.append(_compute(rt))
    kv = rt.kv
    full = f" ({_mb(kv.bytes_for(context))} at the full {context})" if context and kv.tokens is None else ""
    lines.append(kv.describe() + full)
    ram = machine_memory_bytes()
    lines.append(f"  resident at load: {_mb(rt.resident_bytes)}" + (f"; machine memory {_mb(ram)}" if ram else ""))
    lines.append(
        f"  fixed overhead beside the budget: {_mb(rt.fixed_overhead_bytes)} (Python, MLX, mlx-lm and the tokenizer"
        + (", the compute buffer" if kv.buffer_bytes else "")
        + (", MLX's freed-buffer cache" if getattr(plan, "budget", None) else "")
        + ")"
    )
    return "\n".join(lines)
