"""The memory plan: from a DRAM budget, what stays resident, the window size and the cache capacities.

Fixed in DRAM: the resident weights (embeddings, attention, norms, LM head, FFN biases and group
scales), what the selector keeps (the predictors, or the gate rows or their sketch) and a slice of a layer's
FFN block for prompt processing, plus the staging buffer reads land in. A share of "the model" (`--memory 75%`) is of its weights: predictors are
not part of it. The rest of the budget is the neuron cache, split evenly over layers.
The window k is the largest whose expected union of selections (measured when the predictors were
trained) fits a layer's cache. Not in the budget: the KV cache and the runtime itself (Python, MLX,
tokenizer), reported as the fixed overhead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UsageError
from ..format.bundle import Bundle
from .cache import staging_bytes

MODES = ("resident", "naive", "flash")
SELECTORS = ("predictor", "gate", "all")

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "TB": 1e12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
MAX_WINDOW = 8


def parse_memory(text: str | int | float, model_bytes: int) -> int:
    """'4GB', '512MiB', '75%' (of the model) or a number of bytes -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[kKmMgGtT]?[iI]?[bB]?)\s*", text)
    if not m:
        raise UsageError(f"--memory {text!r}: expected a size like 4GB, 512MiB or a share of the model like 50%")
    value, unit = float(m.group(1)), m.group(2).upper()
    if unit == "%":
        return int(model_bytes * value / 100)
    unit = unit if unit.endswith("B") or not unit else unit + "B"
    if unit not in _UNITS:
        raise UsageError(f"--memory {text!r}: unknown unit {m.group(2)!r}")
    return int(value * _UNITS[unit])


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass
class Plan:
    mode: str
    budget: int | None
    model_bytes: int
    resident_bytes: int  # resident.safetensors without the predictors
    selector_bytes: int  # what the selector keeps: predictors, gate rows or their sketch
    prompt_buffer_bytes: int
    capacity: int = 0  # neuron records cached per layer
    neurons: int = 0  # FFN width
    window: int = 0
    record_bytes: int = 0
    layers: int = 0
    selector: str = ""
    density: float = 0.0  # expected share of neurons selected per token
    note: str = ""  # what the planner changed to fit the budget
    io: str = ""  # how reads are issued
    kv_bytes: int = 0  # the KV cache of the context the budget allows (--max-kv-size), else 0 (outside)

    @property
    def cache_bytes(self) -> int:
        return self.capacity * self.record_bytes * self.layers

    @property
    def planned_bytes(self) -> int:
        return self.resident_bytes + self.selector_bytes + self.prompt_buffer_bytes + self.cache_bytes + self.kv_bytes

    def describe(self) -> str:
        budget = (
            f"budget {_mb(self.budget)} ({100 * self.budget / self.model_bytes:.0f}% of the {_mb(self.model_bytes)} model)"
            if self.budget
            else "no budget"
        )
        if self.mode != "flash":
            return (
                f"memory plan: {budget} -> {self.mode} mode ({_mb(self.model_bytes)} in memory)"
                if self.mode == "resident"
                else f"memory plan: {budget} -> {self.mode} mode"
            )
        lines = [
            f"memory plan: {budget} -> flash mode, {_mb(self.planned_bytes)} planned",
            f"  resident {_mb(self.resident_bytes)}: embeddings, attention, norms, LM head",
            f"  selector '{self.selector}' keeps {_mb(self.selector_bytes)}; I/O buffers {_mb(self.prompt_buffer_bytes)} (a prompt's block slice, read staging and scratch)",
            f"  neuron cache {_mb(self.cache_bytes)}: {self.capacity} of {self.neurons} neurons per layer "
            f"({100 * self.capacity / self.neurons:.0f}%), window k={self.window}, selected density {self.density:.2f}",
            f"  streams from flash: the FFN, {_mb(self.model_bytes - self.resident_bytes)}",
            *([f"  KV cache {_mb(self.kv_bytes)} reserved in the budget (--max-kv-size)"] if self.kv_bytes else []),
        ]
        for extra in (self.io, self.note):
            if extra:
                lines.append(f"  {extra}")
        return "\n".join(lines)


def model_bytes(bundle: Bundle) -> int:
    """The model's weights (predictors excluded): what a share like 75% is of."""
    return bundle.weights_bytes


def resident_weights_bytes(bundle: Bundle) -> int:
    return bundle.resident_bytes - bundle.predictor_bytes


def choose_mode(bundle: Bundle, mode: str | None, memory, kv_bytes: int = 0) -> tuple[str, int | None]:
    """The mode and budget; a share (`75%`) is of the weights, and `kv_bytes` (the KV cache --max-kv-size
    reserves) must fit beside them."""
    total = model_bytes(bundle)
    budget = parse_memory(memory, total) if memory is not None else None
    if mode is None:
        mode = "flash" if budget is not None and budget < total + kv_bytes else "resident"
    if mode == "resident" and budget is not None and budget < total + kv_bytes:
        kv = f" and its KV cache ({_mb(kv_bytes)}, --max-kv-size)" if kv_bytes else ""
        raise UsageError(
            f"resident mode needs the whole model ({_mb(total)}){kv}, {_mb(total + kv_bytes)}, but --memory "
            f"allows {_mb(budget)}; use --mode flash"
        )
    return mode, budget


def plan_flash(
    bundle: Bundle,
    budget: int | None,
    selector: str,
    selector_bytes: int,
    window: int | None = None,
    density: float | None = None,
    read_scratch: Callable[[int], int] | None = None,
    kv_bytes: int = 0,
) -> Plan:
    """Cache capacities and window for flash mode within `budget` (None: cache the whole FFN).

    `density` is the share of neurons the selector will pick (None: as measured at training);
    `read_scratch(largest_read)`: the reader threads' buffers for unaligned direct reads
    (`FlashReader.scratch_bytes`); `kv_bytes`: the KV cache the budget must also hold (runtime/kv.py)."""
    spec = bundle.spec
    n, layers, R = spec.intermediate_size, bundle.num_layers, spec.record.nbytes
    slice_bytes, staging = prompt_chunk_rows(spec) * R, staging_bytes(n, R)  # no read is larger than these
    scratch = read_scratch(max(slice_bytes, staging)) if read_scratch else 0
    prompt_buffer = slice_bytes + staging + scratch  # all the I/O buffers
    plan = Plan(
        "flash",
        budget,
        model_bytes(bundle),
        resident_weights_bytes(bundle),
        selector_bytes,
        prompt_buffer,
        neurons=n,
        record_bytes=R,
        layers=layers,
        selector=selector,
        kv_bytes=kv_bytes,
    )
    stats = (spec.selector or {}).get("stats", {}).get(selector, {})
    union = stats.get("window_union") or [] if density is None else []  # union share of n, windows 1..8
    density = density if density is not None else (1.0 if selector == "all" else stats.get("density", 0.0))
    plan.density = density
    if budget is None:
        plan.capacity = n
    else:
        fixed = plan.resident_bytes + selector_bytes + prompt_buffer + kv_bytes
        plan.capacity = min(n, max(0, (budget - fixed) // (layers * R)))
        need = max(1, int(n * max(density, union[0] if union else 0.0)))
        if plan.capacity < need:
            raise TooSmall(
                f"--memory {_mb(budget)} is too small: {_mb(fixed)} must stay resident (weights "
                f"{_mb(plan.resident_bytes)}, selector {_mb(selector_bytes)}, I/O buffers {_mb(prompt_buffer)}"
                + (f", KV cache {_mb(kv_bytes)} for --max-kv-size" if kv_bytes else "")
                + ") and "
                f"the cache needs at least {_mb(need * layers * R)} for one token's neurons at density {density:.2f}; "
                f"the smallest workable budget is about {_mb(fixed + need * layers * R)}",
                plan,
            )
    plan.window = window if window is not None else _largest_window(plan.capacity, n, union, density)
    return plan


PROMPT_CHUNKS = 8  # a prompt reads each layer's block in this many sequential slices


def prompt_chunk_rows(spec) -> int:
    """Records per prompt read: an eighth of the widest layer, in whole down-projection groups."""
    n = max(b.neurons for b in spec.layers)
    group = spec.quantization["down"]["group_size"] if spec.quantization else 1
    return min(n, -(-n // PROMPT_CHUNKS // group) * group)


class TooSmall(UsageError):
    """The budget cannot hold one token's neurons; carries the plan so a caller may pick a lower density."""

    def __init__(self, message: str, plan: Plan):
        super().__init__(message)
        self.plan = plan


def _largest_window(capacity: int, n: int, union: list[float], density: float) -> int:
    if union:
        fits = [k + 1 for k, share in enumerate(union) if share * n <= capacity]
        return max(fits) if fits else 1
    if density > 0:  # no measurements: assume no overlap between tokens, the worst case
        return max(1, min(MAX_WINDOW, int(capacity / (density * n))))
    return 4
