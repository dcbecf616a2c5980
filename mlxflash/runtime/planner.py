"""The memory plan: from a DRAM budget and a request, the selector, what stays resident, the window
and the cache capacities. One entry, `plan(bundle, budget, request, reader, weights) -> (selector, Plan)`;
`Budget.of(bundle, memory)` is the one place a --memory value is parsed.

Fixed in DRAM: the resident weights (embeddings, attention, norms, LM head, FFN biases and group
scales), what the selector keeps (the predictors, or the gate rows or their sketch) and a slice of a
layer's FFN block for prompt processing, plus the staging buffer reads land in. A share of "the
model" (`--memory 75%`) is of its weights: predictors are not part of it. The rest of the budget is
the neuron cache, split evenly over layers. The window k is the largest whose expected union of
selections (the record's `SelectionStats`, measured when the selectors were calibrated) fits a
layer's cache. A selector whose density does not fit is re-thresholded to the largest that does.
The KV cache is in the budget when --max-kv-size bounds it (`Budget.kv_bytes`, runtime/kv.py), else
outside it; never in it: the runtime itself (Python, MLX, tokenizer), reported as the fixed overhead.

Extending it: a new resident term is a field of `Plan` counted in `fixed_bytes` (as `kv_bytes` is);
a different way to pick the density (a quality table) replaces `_fitting_density`; a cache of other
units (MoE experts: runtime/moe_plan.py) plans from the same `Budget` and `choose_mode`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import mlx.core as mx

from ..errors import UsageError
from ..format.bundle import Bundle
from ..format.moe import MoEBundle
from .cache import staging_bytes
from .moe_plan import MoEPlan, plan_moe
from .reader import FlashReader
from .selectors import AllSelector, GateSelector, PredictorSelector, Selector, gate_selector, predictor_selector
from .traces import Trace

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
DENSITY_MARGIN = 0.9  # re-thresholded predictors aim below the cache's capacity
MIN_DENSITY = 0.05


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
    def fixed_bytes(self) -> int:
        """What stays in DRAM whatever the tokens (the KV cache --max-kv-size reserves included): the
        budget's neuron cache is what is left of it."""
        return self.resident_bytes + self.selector_bytes + self.prompt_buffer_bytes + self.kv_bytes

    @property
    def planned_bytes(self) -> int:
        return self.fixed_bytes + self.cache_bytes

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


@dataclass(frozen=True)
class Budget:
    """A --memory value parsed against a bundle: `bytes` (None: no limit) and the model it is a share of."""

    bytes: int | None
    model_bytes: int
    kv_bytes: int = 0  # the KV cache --max-kv-size reserves inside the budget (runtime/kv.py)

    @classmethod
    def of(cls, bundle: Bundle, memory: str | int | float | Budget | None, kv_bytes: int = 0) -> Budget:
        """A share (`75%`) is of the weights; `kv_bytes` must fit beside them."""
        if isinstance(memory, Budget):
            return replace(memory, kv_bytes=kv_bytes) if kv_bytes else memory
        total = model_bytes(bundle)
        return cls(parse_memory(memory, total) if memory is not None else None, total, kv_bytes)

    @property
    def below_model(self) -> bool:
        return self.bytes is not None and self.bytes < self.model_bytes + self.kv_bytes


def choose_mode(budget: Budget, mode: str | None) -> str:
    """The mode asked for, else flash when the budget is below the model, else resident."""
    if mode is not None and mode not in MODES:
        raise UsageError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode is None:
        mode = "flash" if budget.below_model else "resident"
    if mode == "resident" and budget.below_model:
        kv = f" and its KV cache ({_mb(budget.kv_bytes)}, --max-kv-size)" if budget.kv_bytes else ""
        raise UsageError(
            f"resident mode needs the whole model ({_mb(budget.model_bytes)}){kv}, "
            f"{_mb(budget.model_bytes + budget.kv_bytes)}, but --memory allows {_mb(budget.bytes)}; use --mode flash"
        )
    return mode


@dataclass(frozen=True)
class PlanRequest:
    """What the caller asked for; None: what the bundle records and the budget allow.

    selector: "predictor", "gate", "all" or a Selector object (used as it is); density: the share of
    neurons to select (re-thresholds the selector); gate_bits: the gate selector's sketch."""

    mode: str | None = None
    selector: str | Selector | None = None
    window: int | None = None
    density: float | None = None
    gate_bits: int | None = None
    policy: str = "lru"  # MoE bundles: the expert cache's eviction policy
    slots: int | None = None  # MoE bundles: expert slots per layer (None: what the budget allows)
    routing: Trace | None = None  # MoE bundles: a routing trace to expect hit rates on (None: the generator)


def plan(
    bundle: Bundle,
    budget: Budget,
    request: PlanRequest,
    reader: FlashReader,
    weights: dict[str, mx.array] | None = None,
) -> tuple[Selector | None, Plan | MoEPlan]:
    """The mode, and in flash mode the selector and the cache plan. `reader` reads the gate selector's
    rows and sizes its scratch buffers; `weights` are the resident tensors in the compute dtype (the
    predictors among them; not needed for an MoE bundle). Raises TooSmall when not even one token's neurons fit."""
    mode = choose_mode(budget, request.mode)
    if isinstance(bundle, MoEBundle):  # experts, not neurons: moe_plan sizes the expert slots
        return None, plan_moe(
            bundle,
            mode,
            budget.bytes,
            request.policy,
            reader.threads,
            None,
            request.routing,
            reader.scratch_bytes,
            request.slots,
        )
    if mode != "flash":
        return None, Plan(
            mode, budget.bytes, budget.model_bytes, resident_weights_bytes(bundle), 0, 0, kv_bytes=budget.kv_bytes
        )
    selector = make_selector(bundle, reader, weights, request.selector, request.density, request.gate_bits)
    try:
        return selector, _size_flash(bundle, budget, selector, request.window, reader)
    except TooSmall as e:
        density = _fitting_density(bundle, selector, request, e.plan)
        if density is None:
            least = _least_budget(bundle, selector, request, e.plan)
            if least is None:
                raise
            raise TooSmall(f"{e}, or {_mb(least)} with the selector set to density {MIN_DENSITY}", e.plan) from None
        selector = selector.at_density(bundle.spec.selector, density)
        fitted = _size_flash(bundle, budget, selector, request.window, reader)
        fitted.note = (
            f"{selector.kind} selector set to density {density:.2f} (trained at {e.plan.density:.2f}) to fit the budget"
        )
        return selector, fitted


def make_selector(
    bundle: Bundle,
    reader: FlashReader,
    weights: dict[str, mx.array],
    choice: str | Selector | None,
    density: float | None = None,
    gate_bits: int | None = None,
) -> Selector:
    """The selector asked for (a Selector object as it is), else the one the bundle records; at its
    calibrated thresholds, or re-thresholded to `density`."""
    if choice is not None and not isinstance(choice, str):
        return choice
    record = bundle.spec.selector
    choice = choice or (record.kind if record else None)
    if choice is None:
        raise UsageError(
            f"{bundle.path}: flash mode needs a selector and this bundle has no predictors; train them with "
            "`python tools/train_predictors.py BUNDLE --text FILE`, or pass --selector gate (gated FFNs) or all"
        )
    if choice not in SELECTORS:
        raise UsageError(f"selector {choice!r}: expected one of {', '.join(SELECTORS)}")
    if choice == "all":
        return AllSelector([b.neurons for b in bundle.spec.layers])
    if choice == "predictor":
        return predictor_selector(bundle, weights, density)
    if gate_bits is None and record and choice == record.kind:
        gate_bits = record.gate_bits
    if density is None and gate_bits is not None and record:  # thresholds were calibrated on the exact gate
        density = record.gate_density
    return gate_selector(bundle, reader, density, gate_bits)


def _fitting_density(bundle: Bundle, selector: Selector, request: PlanRequest, too_big: Plan) -> float | None:
    """The largest density whose selections fit the cache `too_big` could offer, or None where the
    selector cannot be re-thresholded (a density was asked for, no calibration, or under MIN_DENSITY)."""
    record = bundle.spec.selector
    top_k = isinstance(selector, GateSelector)  # selects exactly its share: the whole cache may be used
    calibrated = isinstance(selector, PredictorSelector) and record is not None and record.density_grid
    given = request.selector is not None and not isinstance(request.selector, str)  # the caller's own object
    if request.density is not None or given or not (top_k or calibrated):
        return None
    fits = too_big.capacity / too_big.neurons * (1.0 if top_k else DENSITY_MARGIN)
    if fits < MIN_DENSITY:
        return None
    return fits if top_k else math.floor(fits / MIN_DENSITY) * MIN_DENSITY


def _least_budget(bundle: Bundle, selector: Selector, request: PlanRequest, too_big: Plan) -> int | None:
    """The budget at which the selector, re-thresholded to MIN_DENSITY, would fit; None where it cannot be."""
    if _fitting_density(bundle, selector, request, replace(too_big, capacity=too_big.neurons)) is None:
        return None
    need = max(
        1, math.ceil(MIN_DENSITY * too_big.neurons / (1.0 if isinstance(selector, GateSelector) else DENSITY_MARGIN))
    )
    return too_big.fixed_bytes + need * too_big.layers * too_big.record_bytes


def _size_flash(bundle: Bundle, budget: Budget, selector: Selector, window: int | None, reader: FlashReader) -> Plan:
    """Cache capacities and window for `selector` within the budget (no limit: cache the whole FFN)."""
    spec = bundle.spec
    n, layers, R = spec.intermediate_size, bundle.num_layers, spec.record.nbytes
    slice_bytes, staging = prompt_chunk_rows(spec) * R, staging_bytes(n, R)  # no read is larger than these
    R = spec.record.field_bytes  # a cached record: its fields (a page-fitted record's padding stays on disk)
    prompt_buffer = slice_bytes + staging + reader.scratch_bytes(max(slice_bytes, staging))  # all the I/O buffers
    plan = Plan(
        "flash",
        budget.bytes,
        budget.model_bytes,
        resident_weights_bytes(bundle),
        selector.resident_bytes,
        prompt_buffer,
        neurons=n,
        record_bytes=R,
        layers=layers,
        selector=selector.kind,
        kv_bytes=budget.kv_bytes,
    )
    density, union = _expected_selection(bundle, selector)
    plan.density = density
    if budget.bytes is None:
        plan.capacity = n
    else:
        plan.capacity = min(n, max(0, (budget.bytes - plan.fixed_bytes) // (layers * R)))
        need = max(1, int(n * max(density, union[0] if union else 0.0)))
        if plan.capacity < need:
            raise TooSmall(
                f"--memory {_mb(budget.bytes)} is too small: {_mb(plan.fixed_bytes)} must stay resident (weights "
                f"{_mb(plan.resident_bytes)}, selector {_mb(plan.selector_bytes)}, I/O buffers {_mb(prompt_buffer)}"
                + (f", KV cache {_mb(plan.kv_bytes)} for --max-kv-size" if plan.kv_bytes else "")
                + ") and "
                f"the cache needs at least {_mb(need * layers * R)} for one token's neurons at density {density:.2f}; "
                f"the smallest workable budget is about {_mb(plan.fixed_bytes + need * layers * R)}",
                plan,
            )
    plan.window = window if window is not None else _largest_window(plan.capacity, n, union, density)
    return plan


def _expected_selection(bundle: Bundle, selector: Selector) -> tuple[float, tuple[float, ...]]:
    """(share of neurons selected per token, union share for windows 1..8): the selector's own density
    when it is set to one (no union measured at it), else what the record measured for its kind."""
    own = getattr(selector, "density", None)  # duck-typed selectors (a replayed trace) may not say
    if own is not None:
        return own, ()
    record = bundle.spec.selector
    stats = record.stats_for(selector.kind) if record else None
    return (stats.density, stats.window_union) if stats else (0.0, ())


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


def _largest_window(capacity: int, n: int, union: tuple[float, ...], density: float) -> int:
    if union:
        fits = [k + 1 for k, share in enumerate(union) if share * n <= capacity]
        return max(fits) if fits else 1
    if density > 0:  # no measurements: assume no overlap between tokens, the worst case
        return max(1, min(MAX_WINDOW, int(capacity / (density * n))))
    return 4
