"""Records that read well: each layer's neurons reordered on disk so that neurons selected together sit
together (PowerInfer-2's neuron clusters), by selection frequency over a recorded trace: the hottest
first, so a token's selection, mostly hot neurons, falls into few long runs that coalesce into few reads.

The permutation is applied consistently to everything indexed by neuron: the records (gate, up and
down rows move together: one record per neuron), the up bias, the predictors' output rows and biases,
and (quantized bundles) the down projection's group scales and biases, so the model computes exactly
what it computed before. A quantized down projection shares scales over `group_size` consecutive
neurons, so quantized bundles are reordered by whole groups (float bundles neuron by neuron).
`read_stats` replays a trace through the cache's bookkeeping to count reads and bytes either way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..format.bundle import Bundle, BundleWriter, RecordLayout, down_rows
from .cache import CacheIndex, runs
from .reader import DIRECT_ALIGN
from .traces import Trace

NEURON_KEYS = ("up_bias", "predictor.b.weight", "predictor.b.bias")  # indexed by neuron on axis 0
GROUP_KEYS = ("down_scales", "down_biases")  # (d, groups): indexed by down group on axis 1


def group_size(bundle: Bundle) -> int:
    """Neurons that move together: a grouped quantized down shares scales over its groups; float
    bundles and the rows layout move neuron by neuron."""
    q = bundle.spec.quantization
    return q["down"]["group_size"] if q and not down_rows(q) else 1


def frequency_order(trace: Trace, layer: int, width: int, group: int = 1) -> np.ndarray:
    """perm (width,): perm[new] = old. Groups of `group` neurons ordered by how often the trace selects
    their neurons, the most selected first (ties keep the original order)."""
    counts = np.bincount(trace.ids[layer], minlength=width)[:width]
    per_group = counts.reshape(-1, group).sum(axis=1)
    order = np.argsort(-per_group, kind="stable")
    return (order[:, None] * group + np.arange(group)[None, :]).reshape(-1)


def permute_trace(trace: Trace, perms: list[np.ndarray]) -> Trace:
    """The same selections in the reordered numbering (old id i is new id inverse[i])."""
    ids = []
    for layer, perm in enumerate(perms):
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(len(perm))
        new = inverse[trace.ids[layer]].astype(np.int32)
        for a, b in zip(trace.indptr[layer][:-1], trace.indptr[layer][1:]):
            new[a:b].sort()
        ids.append(new)
    return Trace(list(trace.widths), [p.copy() for p in trace.indptr], ids, dict(trace.meta)).validated()


def page_fitted(layout: RecordLayout) -> RecordLayout:
    """The same fields in a record padded to fit direct-I/O pages (bundle.page_stride)."""
    return RecordLayout.build(layout.parts(), page_fit=True)


def reorder_bundle(
    bundle: Bundle, perms: list[np.ndarray], out: str | Path, how: dict, record: RecordLayout | None = None
) -> Path:
    """Write a copy of `bundle` at `out` with layer l's neurons in the order perms[l] (perm[new] = old),
    its records laid out as `record` (the same fields, e.g. `page_fitted`; default: as they are)."""
    spec, g = bundle.spec, group_size(bundle)
    if record is not None and record.parts() != spec.record.parts():
        raise ValueError("the new record layout must hold the same fields")
    for layer, perm in enumerate(perms):
        n = spec.layers[layer].neurons
        if sorted(perm.tolist()) != list(range(n)):
            raise ValueError(f"layer {layer}: not a permutation of its {n} neurons")
        if g > 1 and np.any(perm.reshape(-1, g) != perm.reshape(-1, g)[:, :1] + np.arange(g)):
            raise ValueError(f"layer {layer}: a quantized bundle moves whole groups of {g} neurons")
    R = spec.record.nbytes
    new_spec = replace(spec, layers=[], files={}, record=record or spec.record)
    with BundleWriter(out, new_spec) as writer:
        for layer, perm in enumerate(perms):
            block = spec.layers[layer]
            records = np.fromfile(bundle.ffn_path, np.uint8, block.neurons * R, offset=block.offset)
            records = records.reshape(block.neurons, R)[perm]
            parts = {
                f.name: np.ascontiguousarray(records[:, f.offset : f.offset + f.nbytes]) for f in spec.record.fields
            }
            writer.add_layer({f.name: _typed(parts[f.name], f) for f in spec.record.fields})
        resident = _permuted_resident(bundle.resident_weights(), perms, g)
        config = {**bundle.config, "neuron_order": how}
        return writer.finish(config, resident, bundle.path)


def _typed(raw: np.ndarray, f) -> np.ndarray:
    """(n, nbytes) uint8 of one field -> (n, count) words of the field's item size (the writer packs bytes)."""
    return raw.view(np.dtype(f"u{f.nbytes // f.count}")).reshape(len(raw), f.count)


def _permuted_resident(weights: dict[str, mx.array], perms: list[np.ndarray], g: int) -> dict[str, mx.array]:
    out = dict(weights)
    for layer, perm in enumerate(perms):
        prefix = f"model.layers.{layer}.mlp."
        idx = mx.array(perm)
        groups = mx.array(perm[::g] // g)
        for key in NEURON_KEYS:
            if prefix + key in out:
                out[prefix + key] = out[prefix + key][idx]
        for key in GROUP_KEYS:
            if prefix + key in out:
                out[prefix + key] = out[prefix + key][:, groups]
    mx.eval(out)
    return out


@dataclass
class ReadStats:
    """Per decode token, summed over layers: reads issued and bytes moved vs bytes of records needed."""

    reads_per_token: float
    bytes_used_per_token: float
    bytes_transferred_per_token: float

    @property
    def transferred_over_used(self) -> float:
        return self.bytes_transferred_per_token / max(self.bytes_used_per_token, 1)


def read_stats(
    trace: Trace,
    record_bytes: int,
    capacity: list[int],
    window: int,
    gap: int = 0,
    skip: int = 2,
    used_bytes: int | None = None,
) -> ReadStats:
    """Replay `trace` through each layer's cache bookkeeping (window, capacity): per token the missing
    records, their runs (adjacent, or within `gap` records) and each run's page-aligned extent, as the
    direct reader moves it (records `record_bytes` apart on disk, `used_bytes` of fields each: default
    the same). The first `skip` tokens (the cache filling) are left out."""
    used_bytes = used_bytes or record_bytes
    reads = used = moved = 0
    tokens = trace.num_tokens - skip
    for layer, width in enumerate(trace.widths):
        index = CacheIndex(width, capacity[layer], window)
        for t in range(trace.num_tokens):
            missing, _ = index.update(trace.token(layer, t))
            if t < skip or len(missing) == 0:
                continue
            for lo, hi in runs(missing, gap):
                start, end = int(missing[lo]) * record_bytes, (int(missing[hi - 1]) + 1) * record_bytes
                moved += -(-end // DIRECT_ALIGN) * DIRECT_ALIGN - start // DIRECT_ALIGN * DIRECT_ALIGN
                reads += 1
            used += len(missing) * used_bytes
    return ReadStats(reads / tokens, used / tokens, moved / tokens)
