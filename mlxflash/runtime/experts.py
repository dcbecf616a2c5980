"""Expert slots and the expert cache of one layer (the MoE counterpart of cache.py).

`ExpertSlots`: per record field one preallocated, aligned matrix of `slots` experts, shaped like
mlx-lm's stacked SwitchLinear weights, so `switch_glu` runs mlx-lm's own gather_mm / gather_qmm on
slot indices. Experts are read straight from the bundle into their slot (one direct read per field
and expert, all of them in flight at once through the FlashReader): no staging copy.

`ExpertIndex`: which expert is in which slot, and the eviction policy:
  lru   evict the expert used longest ago;
  lfu   evict the expert used least often so far (ties: the one used longest ago);
  none  forget everything before each token: the routed experts are read afresh (the naive baseline).
`admit(group)` pins a group of experts (at most `slots`), returns the (expert, slot) pairs to read;
the victims are never in the group. Hits and misses are counted. The bookkeeping alone replays a
routing trace (`replay`) for hit rates without any data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.activations import swiglu

from ..format.bundle import mx_dtype
from ..format.moe import ExpertSpec
from .reader import FlashReader, aligned_buffer

POLICIES = ("lru", "lfu", "none")


class ExpertIndex:
    """Slot bookkeeping for one layer's experts."""

    def __init__(self, experts: int, slots: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy {policy!r}: expected one of {', '.join(POLICIES)}")
        if slots < 1:
            raise ValueError(f"expert cache slots {slots}: must be >= 1")
        self.experts, self.slots, self.policy = experts, min(slots, experts), policy
        self.expert_in = np.full(self.slots, -1, dtype=np.int64)  # slot -> expert
        self.slot_of = np.full(experts, -1, dtype=np.int64)  # expert -> slot
        self.last_used = np.zeros(experts, dtype=np.int64)
        self.uses = np.zeros(experts, dtype=np.int64)
        self.tick = 0
        self.hits = self.misses = 0

    def clear(self) -> None:
        self.expert_in[:] = -1
        self.slot_of[:] = -1

    def begin_token(self) -> None:
        self.tick += 1
        if self.policy == "none":
            self.clear()

    def rounds(self, needed: np.ndarray) -> list[np.ndarray]:
        """Split the token's experts into groups that fit the slots, cached ones first (no read for them)."""
        cached = needed[self.slot_of[needed] >= 0]
        order = np.concatenate([cached, needed[self.slot_of[needed] < 0]])
        return [order[i : i + self.slots] for i in range(0, len(order), self.slots)]

    def admit(self, group: np.ndarray) -> list[tuple[int, int]]:
        """Make every expert of `group` (unique, at most `slots`) cached; returns [(expert, slot)] to read."""
        missing = group[self.slot_of[group] < 0]
        self.hits += len(group) - len(missing)
        self.misses += len(missing)
        self.last_used[group] = self.tick
        self.uses[group] += 1
        loads = []
        if len(missing):
            for expert, slot in zip(missing.tolist(), self._victims(group, len(missing)).tolist()):
                old = self.expert_in[slot]
                if old >= 0:
                    self.slot_of[old] = -1
                self.expert_in[slot], self.slot_of[expert] = expert, slot
                loads.append((expert, slot))
        return loads

    def _victims(self, group: np.ndarray, count: int) -> np.ndarray:
        """`count` slots for new experts: free ones first, then by policy, never one of `group`'s."""
        held = self.expert_in
        pinned = np.zeros(self.slots, dtype=bool)
        pinned[self.slot_of[group][self.slot_of[group] >= 0]] = True
        free = np.flatnonzero((held < 0) & ~pinned)
        if len(free) >= count:
            return free[:count]
        candidates = np.flatnonzero((held >= 0) & ~pinned)
        e = held[candidates]
        keys = (self.uses[e], self.last_used[e]) if self.policy == "lfu" else (self.last_used[e],)
        order = np.lexsort(keys[::-1])  # lexsort's last key is the primary one
        return np.concatenate([free, candidates[order[: count - len(free)]]])

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def replay(tokens: Iterable[np.ndarray], experts: int, slots: int, policy: str) -> float:
    """Hit rate of a cache of `slots` experts on one layer's routing (per token: the routed expert ids)."""
    index = ExpertIndex(experts, slots, policy)
    for ids in tokens:
        index.begin_token()
        for group in index.rounds(np.unique(ids)):
            index.admit(group)
    return index.hit_rate


class ExpertSlots:
    """`slots` experts' weights in memory: per field a (slots, rows, cols) MLX matrix (aligned, touched)."""

    def __init__(self, spec: ExpertSpec, slots: int):
        self.spec, self.slots = spec, slots
        self.fields: dict[str, mx.array] = {}
        self.fields_np: dict[str, np.ndarray] = {}  # the same memory as (slots, nbytes) uint8
        for f in spec.record.fields:
            flat, flat_np = aligned_buffer(slots * f.nbytes)
            flat_np[:] = 0  # touch: memory the VM handed back is slow the first time
            self.fields[f.name] = flat.view(mx_dtype(f.dtype)).reshape(slots, *spec.field_shape(f.name))
            self.fields_np[f.name] = flat_np.reshape(slots, f.nbytes)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.fields_np.values())

    def read(self, reader: FlashReader, block_offset: int, loads: Sequence[tuple[int, int]]) -> None:
        """Read expert e into slot s for each (e, s): every field of every expert in flight at once."""
        R = self.spec.record.nbytes
        runs = [
            (block_offset + e * R + f.offset, self.fields_np[f.name][s])
            for e, s in loads
            for f in self.spec.record.fields
        ]
        reader.read(runs)

    def read_run(self, reader: FlashReader, block_offset: int, first: int, count: int) -> None:
        """Experts first..first+count into slots 0..count: one sequential read per field (prompts)."""
        R, runs = self.spec.record.nbytes, []
        for f in self.spec.record.fields:
            dest = self.fields_np[f.name][:count]
            if f.nbytes == R:  # the field is the whole record: one read of the run
                runs.append((block_offset + first * R, dest.reshape(-1)))
            else:
                runs += [(block_offset + (first + j) * R + f.offset, dest[j]) for j in range(count)]
        reader.read(runs)

    def copy_slot(self, src: ExpertSlots, src_slot: int, slot: int) -> None:
        for name, rows in self.fields_np.items():
            rows[slot] = src.fields_np[name][src_slot]


def _linear(x: mx.array, w: dict[str, mx.array], proj: str, idx: mx.array, q: dict | None, sort: bool) -> mx.array:
    """mlx-lm's SwitchLinear / QuantizedSwitchLinear on the slot matrices (bias-free experts)."""
    if q is None:
        return mx.gather_mm(x, w[f"{proj}.weight"].swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sort)
    p = q[proj]
    return mx.gather_qmm(
        x,
        w[f"{proj}.weight"],
        w[f"{proj}.scales"],
        w[f"{proj}.biases"],
        rhs_indices=idx,
        transpose=True,
        group_size=p["group_size"],
        bits=p["bits"],
        sorted_indices=sort,
    )


def switch_glu(x: mx.array, w: dict[str, mx.array], idx: mx.array, q: dict | None, sort: bool = False) -> mx.array:
    """SwitchGLU's expert math: x (..., 1, 1, d) or sorted rows (P, 1, d), idx the slots -> (..., k, 1, d)."""
    up = _linear(x, w, "up", idx, q, sort)
    gate = _linear(x, w, "gate", idx, q, sort)
    return _linear(swiglu(gate, up), w, "down", idx, q, sort)
