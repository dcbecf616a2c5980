"""The memory plan of an MoE bundle: from a DRAM budget, expert slots per layer, and what to expect.

Fixed in DRAM: the resident weights (embeddings, attention, router, shared experts, norms, LM head),
the prompt buffer (a slice of a layer's experts read sequentially; shared by all layers) and the
reader threads' scratch. The rest is the expert cache, the same number of slots in every MoE layer
(the router picks top-k in every layer alike). Expected hit rate: the eviction policy replayed on a
routing trace at that slot count (a recorded one when given, else the synthetic generator of
routing.py with the bundle family's profile, and the plan says which); bytes per token follow, and the cost model turns them into
seconds of I/O on the measured disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UsageError
from ..format.moe import MoEBundle
from .costmodel import DiskCurve, predict_io_seconds
from .reader import SPLIT_BYTES
from .routing import RoutingProfile, generate_routing, profile_for, reuse_stats
from .traces import Trace

PROMPT_SHARE = 8  # the prompt buffer holds an eighth of a layer's experts (as the dense prompt path)
PLAN_TOKENS = 256  # synthetic routing tokens replayed for the expected hit rate (past the cache's warm-up)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass
class MoEPlan:
    mode: str  # resident | naive | flash
    budget: int | None
    model_bytes: int
    resident_bytes: int
    prompt_buffer_bytes: int
    prompt_slots: int
    slots: int  # expert slots per MoE layer
    experts: int
    top_k: int
    record_bytes: int
    layers: int  # MoE layers
    policy: str
    expected_hit_rate: float = 0.0
    bytes_per_token: float = 0.0  # expected expert bytes read per decoded token
    io_seconds_per_token: float = 0.0  # the cost model's figure for those bytes
    hit_source: str = ""
    note: str = ""
    io: str = ""

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.record_bytes * self.layers

    @property
    def planned_bytes(self) -> int:
        return self.resident_bytes + self.prompt_buffer_bytes + self.cache_bytes

    def describe(self) -> str:
        budget = (
            f"budget {_mb(self.budget)} ({100 * self.budget / self.model_bytes:.0f}% of the model)"
            if self.budget
            else "no budget"
        )
        lines = [
            f"memory plan (MoE): {budget} -> {self.mode} mode, {_mb(self.planned_bytes)} planned",
            f"  resident {_mb(self.resident_bytes)}: embeddings, attention, router, shared experts, norms, LM head",
            f"  expert cache {_mb(self.cache_bytes)}: {self.slots} of {self.experts} experts per layer x {self.layers} "
            f"layers ({self.policy}), {self.top_k} routed per token; prompt buffer {_mb(self.prompt_buffer_bytes)} "
            f"({self.prompt_slots} experts)",
            f"  expected hit rate {self.expected_hit_rate:.2f} ({self.hit_source}): {_mb(self.bytes_per_token)} read "
            f"per token, about {1e3 * self.io_seconds_per_token:.0f} ms on this disk",
        ]
        return "\n".join(lines + [f"  {x}" for x in (self.io, self.note) if x])


def resident_weights_bytes(bundle: MoEBundle) -> int:
    return bundle.resident_bytes


def plan_moe(
    bundle: MoEBundle,
    mode: str,
    budget: int | None,
    policy: str = "lru",
    threads: int = 8,
    curve: DiskCurve | None = None,
    trace: Trace | None = None,
    read_scratch: Callable[[int], int] | None = None,
    slots: int | None = None,
) -> MoEPlan:
    """Slots per layer for `mode` within `budget` (None: every expert cached in flash mode)."""
    spec = bundle.spec
    E, k, R, layers = spec.num_experts, spec.top_k, spec.record.nbytes, len(spec.layers)
    resident = resident_weights_bytes(bundle)
    prompt_slots = max(1, -(-E // PROMPT_SHARE))
    scratch = read_scratch(min(R, SPLIT_BYTES)) if read_scratch else 0
    plan = MoEPlan(mode, budget, bundle.weights_bytes, resident, 0, prompt_slots, 0, E, k, R, layers, policy)
    if mode == "resident":
        plan.slots, plan.policy, plan.prompt_slots = E, "lru", 0
    elif mode == "naive":
        plan.slots, plan.policy = k, "none"
    elif slots is not None:
        plan.slots = max(1, min(E, slots))
    elif budget is None:
        plan.slots = E
    else:
        free = budget - resident - scratch
        prompt_slots = max(1, min(prompt_slots, free // (2 * R)))  # a tight budget shrinks the prompt slices
        plan.prompt_slots = prompt_slots
        plan.slots = min(E, max(0, (free - prompt_slots * R) // (layers * R)))
        if plan.slots < 1:
            raise UsageError(
                f"--memory {_mb(budget)} is too small for this MoE model: {_mb(resident)} stays resident and one "
                f"expert slot per layer needs {_mb(layers * R)} more (plus {_mb(R)} of prompt buffer); the "
                f"smallest workable budget is about {_mb(resident + scratch + (layers + 1) * R)}"
            )
        if plan.slots < k:
            plan.note = f"fewer slots ({plan.slots}) than routed experts ({k}): tokens compute their experts in rounds"
    plan.prompt_buffer_bytes = plan.prompt_slots * R + scratch
    profile = profile_for(bundle.config.get("model_type"))
    _expect(plan, trace, threads, curve or DiskCurve.load_or_default(), profile)
    return plan


def _expect(plan: MoEPlan, trace: Trace | None, threads: int, curve: DiskCurve, profile: RoutingProfile) -> None:
    """Expected hit rate (the policy replayed on a trace), bytes and I/O seconds per token."""
    if plan.mode == "resident":
        plan.expected_hit_rate, plan.hit_source = 1.0, "every expert resident"
    elif plan.policy == "none":
        plan.expected_hit_rate, plan.hit_source = 0.0, "no cache"
    else:
        if trace is None:
            trace = generate_routing(plan.experts, plan.top_k, min(plan.layers, 4), PLAN_TOKENS, profile)
            plan.hit_source = f"synthetic routing, {profile.name} profile"
        else:
            plan.hit_source = f"trace {trace.meta.get('source', '?')}"
        stats = reuse_stats(trace, [plan.slots], [plan.policy])
        plan.expected_hit_rate = stats["hit_rate"][plan.policy][plan.slots]
    plan.bytes_per_token = plan.layers * plan.top_k * (1 - plan.expected_hit_rate) * plan.record_bytes
    plan.io_seconds_per_token = predict_io_seconds(
        plan.bytes_per_token, min(plan.record_bytes, SPLIT_BYTES), threads, curve
    )
