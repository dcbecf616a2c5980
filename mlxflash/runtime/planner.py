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

With a quality table in the bundle (format/quality_record.py, measured at calibration) and nothing
asked of the selector, density or window, the planner picks the measured operating point of least
expected loss whose DRAM fits (`_plan_from_table`), and `max_loss` turns a tolerated loss into the
smallest budget that keeps it (`budget_for_loss`); `quality_curve` lists what each budget buys.
Without a table it plans blind, from the budget alone, and says so.

Extending it: a new resident term is a field of `Plan` counted in `fixed_bytes` (as `kv_bytes` is);
a cache of other units (MoE experts: runtime/moe_plan.py) plans from the same `Budget` and `choose_mode`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import mlx.core as mx

from ..errors import UsageError
from ..format.bundle import Bundle
from ..format.moe import MoEBundle
from ..format.quality_record import OperatingPoint, QualityTable
from .cache import staging_bytes
from .moe_plan import MoEPlan, plan_moe
from .reader import FlashReader
from .selectors import (
    AllSelector,
    GateSelector,
    PredictorSelector,
    Selector,
    activation_selector,
    gate_selector,
    predictor_selector,
)
from .traces import Trace

MODES = ("resident", "naive", "flash")
SELECTORS = ("predictor", "gate", "activation", "all")

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
    resident_bytes: int  # resident.safetensors without the predictors (flash: and an untied input embedding)
    selector_bytes: int  # what the selector keeps: predictors, gate rows or their sketch
    prompt_buffer_bytes: int
    capacity: int = 0  # neuron records cached per layer
    neurons: int = 0  # FFN width
    window: int = 0
    record_bytes: int = 0
    read_bytes: int = 0  # a record on disk (page padding included): what a read of one neuron moves
    layers: int = 0
    selector: str = ""
    density: float = 0.0  # expected share of neurons selected per token
    note: str = ""  # what the planner changed to fit the budget
    io: str = ""  # how reads are issued
    kv_bytes: int = 0  # the KV cache of the context the budget allows (--max-kv-size), else 0 (outside)
    expected: OperatingPoint | None = None  # the quality table's point the plan follows, if any

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
            f"  resident {_mb(self.resident_bytes)}: attention, norms, LM head (and the input embedding where it is the head)",
            f"  selector '{self.selector}' keeps {_mb(self.selector_bytes)}; I/O buffers {_mb(self.prompt_buffer_bytes)} (a prompt's block slice, read staging and scratch)",
            f"  neuron cache {_mb(self.cache_bytes)}: {self.capacity} of {self.neurons} neurons per layer "
            f"({100 * self.capacity / self.neurons:.0f}%), window k={self.window}, selected density {self.density:.2f}",
            f"  streams from flash: {_mb(self.model_bytes - self.resident_bytes)}, the FFN (and an untied input embedding)",
            *([f"  KV cache {_mb(self.kv_bytes)} reserved in the budget (--max-kv-size)"] if self.kv_bytes else []),
        ]
        if self.expected:
            p = self.expected
            lines.append(
                f"  expected (quality table): {p.describe()}: NLL +{p.nll_increase:.3f} nats/token over dense "
                f"(perplexity {100 * p.perplexity_increase:+.1f}%), {_mb(p.loaded * self.neurons * self.layers * self.read_bytes)} read per token"
            )
        for extra in (self.io, self.note):
            if extra:
                lines.append(f"  {extra}")
        return "\n".join(lines)


def model_bytes(bundle: Bundle) -> int:
    """The model's weights (predictors excluded): what a share like 75% is of."""
    return bundle.weights_bytes


def resident_weights_bytes(bundle: Bundle) -> int:
    return bundle.resident_bytes - bundle.predictor_bytes


def flash_resident_bytes(bundle: Bundle) -> int:
    """What flash mode keeps of resident.safetensors: an untied input embedding stays on the SSD
    (runtime/embedding.py)."""
    return resident_weights_bytes(bundle) - bundle.streamed_embedding_bytes


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

    selector: "predictor", "gate", "activation", "all" or a Selector object (used as it is); density: the share of
    neurons to select (re-thresholds the selector); gate_bits: the gate selector's sketch."""

    mode: str | None = None
    selector: str | Selector | None = None
    window: int | None = None
    density: float | None = None
    gate_bits: int | None = None
    max_loss: float | None = None  # the perplexity increase tolerated (0.02: 2%): the smallest budget that keeps it
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
    if request.max_loss is not None and not isinstance(bundle, MoEBundle):
        budget = budget_for_loss(bundle, budget, request, reader)
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
    table = bundle.spec.quality
    if table is not None and _open_request(request):
        chosen = _plan_from_table(bundle, budget, table, reader, weights)
        if chosen is not None:
            return chosen
        if bundle.spec.selector is None:  # nothing to plan blind with
            cost, least = min(
                ((point_bytes(bundle, p, reader, budget.kv_bytes), p) for p in table.points), key=lambda c: c[0]
            )
            raise UsageError(
                f"--memory {_mb(budget.bytes)} is below the smallest measured operating point ({least.describe()}, "
                f"{_mb(cost)}); give more memory, or choose --selector and --density to run unmeasured"
            )
    selector = make_selector(bundle, reader, weights, request.selector, request.density, request.gate_bits)
    try:
        chosen = selector, _size_flash(bundle, budget, selector, request.window, reader)
    except TooSmall as e:
        chosen = _refit(bundle, budget, request, reader, selector, e)
    if _open_request(request):
        chosen[1].note = "; ".join(filter(None, [chosen[1].note, _blind_note(bundle, table)]))
    return chosen


def _open_request(request: PlanRequest) -> bool:
    """Whether the caller left the operating point to the planner (no selector, density, window or bits)."""
    return all(v is None for v in (request.selector, request.density, request.window, request.gate_bits))


def _blind_note(bundle: Bundle, table: QualityTable | None) -> str:
    if table is None:
        return (
            "no quality table in this bundle: density and window planned blind, from the budget alone; measure "
            f"one with `python tools/train_predictors.py {bundle.path} --text FILE`"
        )
    least = min(table.points, key=lambda p: p.capacity).capacity
    return f"below the quality table's smallest cache ({100 * least:.0f}% of the neurons): planned blind"


def _refit(
    bundle: Bundle, budget: Budget, request: PlanRequest, reader: FlashReader, selector: Selector, e: TooSmall
) -> tuple[Selector, Plan]:
    """The selector re-thresholded to the largest density that fits, where it can be."""
    density = _fitting_density(bundle, selector, request, e.plan)
    if density is None:
        least = _least_budget(bundle, selector, request, e.plan)
        if least is None:
            raise e
        raise TooSmall(f"{e}, or {_mb(least)} with the selector set to density {MIN_DENSITY}", e.plan) from None
    selector = selector.at_density(bundle.spec.selector, density)
    fitted = _size_flash(bundle, budget, selector, request.window, reader)
    fitted.note = (
        f"{selector.kind} selector set to density {density:.2f} (trained at {e.plan.density:.2f}) to fit the budget"
    )
    return selector, fitted


def io_buffer_bytes(bundle: Bundle, reader: FlashReader) -> int:
    """A prompt's block slice, the read staging buffer and the reader's scratch: all the I/O buffers."""
    spec = bundle.spec
    slice_bytes = prompt_chunk_rows(spec) * spec.record.nbytes
    staging = staging_bytes(spec.intermediate_size, spec.record.nbytes)  # no read is larger than these
    return slice_bytes + staging + reader.scratch_bytes(max(slice_bytes, staging))


def point_bytes(bundle: Bundle, point: OperatingPoint, reader: FlashReader, kv_bytes: int = 0) -> int:
    """The DRAM a quality table's point needs on this machine: what stays resident, its selector, the I/O
    buffers and the cache rows its window's union needed."""
    spec = bundle.spec
    rows = math.ceil(point.capacity * spec.intermediate_size)
    fixed = flash_resident_bytes(bundle) + point.selector_bytes + io_buffer_bytes(bundle, reader) + kv_bytes
    return fixed + rows * bundle.num_layers * spec.record.field_bytes


def _plan_from_table(
    bundle: Bundle, budget: Budget, table: QualityTable, reader: FlashReader, weights: dict[str, mx.array]
) -> tuple[Selector, Plan] | None:
    """The measured point of least expected loss (then fewest reads) that fits; None where none fits."""
    fits = [
        p
        for p in table.points
        if budget.bytes is None or point_bytes(bundle, p, reader, budget.kv_bytes) <= budget.bytes
    ]
    if not fits:
        return None
    best = min(fits, key=lambda p: (p.nll_increase, p.loaded))
    selector = make_selector(bundle, reader, weights, best.selector, best.density, best.gate_bits)
    fitted = _size_flash(bundle, budget, selector, best.window, reader)
    note = f"the least expected loss of the {len(fits)} of {len(table.points)} measured points that fit"
    fill = fitted.capacity / fitted.neurons
    if best.window == 1 and isinstance(selector, GateSelector) and fill > best.density:
        # top-k with one token's neurons cached: the rows the budget leaves over select more, never less well
        selector = selector.at_density(bundle.spec.selector, fill)
        fitted = _size_flash(bundle, budget, selector, best.window, reader)
        note += f"; density raised from the measured {best.density:.2f} to {fill:.2f} to fill the cache"
        best = interpolated(table, best, fill)
    fitted.expected, fitted.note = best, note
    return selector, fitted


@dataclass(frozen=True)
class CurvePoint:
    """One budget of `quality_curve`: the point the planner would run there (None: resident mode)."""

    budget_bytes: int
    model_bytes: int
    point: OperatingPoint | None
    bytes_per_token: int  # read from flash per decoded token

    @property
    def perplexity_increase(self) -> float:
        return self.point.perplexity_increase if self.point else 0.0


def quality_curve(bundle: Bundle, reader: FlashReader) -> list[CurvePoint]:
    """What each budget buys: the measured points that lower the expected loss below every cheaper one
    (the planner's choices as the budget grows), then the whole model (resident, no loss)."""
    table = bundle.spec.quality
    if table is None:
        raise UsageError(
            f"{bundle.path}: no quality table in this bundle, so the planner plans blind; measure one with "
            f"`python tools/train_predictors.py {bundle.path} --text FILE`"
        )
    spec, total = bundle.spec, model_bytes(bundle)
    all_records = bundle.num_layers * spec.intermediate_size * spec.record.nbytes  # what `loaded` is a share of
    curve, best = [], math.inf
    costed = sorted((point_bytes(bundle, p, reader), p.nll_increase, i) for i, p in enumerate(table.points))
    for cost, _, i in costed:
        p = table.points[i]
        if p.nll_increase < best and cost < total:
            curve.append(CurvePoint(cost, total, p, int(p.loaded * all_records)))
            best = p.nll_increase
    return [*curve, CurvePoint(total, total, None, 0)]


def interpolated(table: QualityTable, point: OperatingPoint, density: float) -> OperatingPoint:
    """`point` run at a higher `density`: its loss and reads interpolated linearly in density towards the
    next denser measured point of the same selector, bits and window (none: the point's own, a bound)."""
    same = [
        p
        for p in table.points
        if (p.selector, p.gate_bits, p.window) == (point.selector, point.gate_bits, point.window)
        and p.density > point.density
    ]
    if not same:
        return replace(point, density=density)
    upper = min(same, key=lambda p: p.density)
    t = min(1.0, (density - point.density) / (upper.density - point.density))
    mix = lambda a, b: a + t * (b - a)  # noqa: E731
    return replace(
        point,
        density=density,
        nll_increase=mix(point.nll_increase, upper.nll_increase),
        nll_increase_se=mix(point.nll_increase_se, upper.nll_increase_se),
        loaded=mix(point.loaded, upper.loaded),
    )


def parse_loss(text: str | float) -> float:
    """'2%' or 2 (percent of perplexity) -> 0.02."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%?\s*", text)
        if not m:
            raise UsageError(f"--max-loss {text!r}: expected a perplexity increase in percent, like 2%")
        value = float(m.group(1))
    if value <= 0:
        raise UsageError(f"--max-loss {text!r}: must be above 0%")
    return value / 100


def budget_for_loss(bundle: Bundle, budget: Budget, request: PlanRequest, reader: FlashReader) -> Budget:
    """The smallest budget (within the one given) whose measured point keeps the perplexity increase
    within `request.max_loss`; the whole model (resident: no loss) where no flash point does."""
    table, limit = bundle.spec.quality, request.max_loss
    if table is None:
        raise UsageError(
            f"{bundle.path}: --max-loss needs the bundle's quality table, and it has none; measure it with "
            f"`python tools/train_predictors.py {bundle.path} --text FILE`"
        )
    cost = {id(p): point_bytes(bundle, p, reader, budget.kv_bytes) for p in table.points}
    ok = [
        p
        for p in table.points
        if p.perplexity_increase <= limit and (budget.bytes is None or cost[id(p)] <= budget.bytes)
    ]
    if ok and request.mode != "resident":
        return replace(budget, bytes=min(cost[id(p)] for p in ok))
    whole = budget.model_bytes + budget.kv_bytes
    if request.mode != "flash" and (budget.bytes is None or budget.bytes >= whole):
        return replace(budget, bytes=None)  # only the whole model keeps it: resident mode
    best = min(table.points, key=lambda p: p.nll_increase)
    within = f" within --memory {_mb(budget.bytes)}" if budget.bytes is not None else ""
    raise UsageError(
        f"--max-loss {100 * limit:g}%: no budget{within} meets it; the best achievable is "
        f"{100 * best.perplexity_increase:+.1f}% perplexity ({best.describe()}, {_mb(cost[id(best)])})"
        + ("" if request.mode == "flash" else f", or no loss in resident mode with {_mb(whole)}")
    )


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
            "`python tools/train_predictors.py BUNDLE --text FILE`, or pass --selector gate or activation (gated FFNs) or all"
        )
    if choice not in SELECTORS:
        raise UsageError(f"selector {choice!r}: expected one of {', '.join(SELECTORS)}")
    if choice == "all":
        return AllSelector([b.neurons for b in bundle.spec.layers])
    if choice == "predictor":
        return predictor_selector(bundle, weights, density)
    if choice == "activation":
        density = density if density is not None else (record.gate_density if record else None)
        if density is None:
            raise UsageError(f"{bundle.path}: the activation selector needs a --density (none is calibrated)")
        return activation_selector(bundle, reader, density, gate_bits)
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
    n, layers = spec.intermediate_size, bundle.num_layers
    R = spec.record.field_bytes  # a cached record: its fields (a page-fitted record's padding stays on disk)
    prompt_buffer = io_buffer_bytes(bundle, reader)
    plan = Plan(
        "flash",
        budget.bytes,
        budget.model_bytes,
        flash_resident_bytes(bundle),
        selector.resident_bytes,
        prompt_buffer,
        neurons=n,
        record_bytes=R,
        read_bytes=spec.record.nbytes,
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
