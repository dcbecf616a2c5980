"""The FFN module that replaces an mlx-lm block's MLP, and the math on neuron records.

Records (n, R) uint8, one per neuron (see bundle.py), are read as views: nothing is copied to get
at gate, up or down. The dense math (all neurons, in order) is used by `resident` and `naive`;
the sparse math (any subset of neurons, in any row order) by `flash`. Both are exact for the
neurons they are given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..arch.activations import ACTIVATIONS, UP_ACTIVATED, activation_fn
from ..errors import BundleError
from ..format.bundle import FFNSpec, down_rows
from ..format.quant import transpose_packed, unpack_codes
from .cache import NeuronCache, cached_masks, timed_update
from .cpu import quantized_matmul, quantized_matmul_rows
from .dtypes import cast_floats, compute_dtype
from .reader import FlashReader
from .stats import MaskedCounts, RuntimeStats


def _qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, q: dict) -> mx.array:
    return quantized_matmul(x, w, scales, biases, q["group_size"], q["bits"])


class FFN(nn.Module):
    """One layer's FFN; subclasses decide where the records come from.

    Its parameters are the resident pieces only: the down projection's group scales (quantized
    bundles) and the biases (FFNs with biases). The records themselves never are parameters. Math runs
    in `compute_dtype` (float32 on the CPU): float fields of records are converted as they are used.
    """

    def __init__(self, layer: int, spec: FFNSpec, stats: RuntimeStats, biases: bool = False):
        super().__init__()
        self._layer = layer
        self._spec = spec
        self._stats = stats
        if spec.activation not in ACTIVATIONS:
            raise BundleError(f"flash.activation {spec.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        self._act = activation_fn(spec.activation, spec.activation_threshold)
        self._up_act = self._act if spec.activation in UP_ACTIVATED else None
        n, d = spec.layers[layer].neurons, spec.hidden_size
        self.compute_dtype = dtype = compute_dtype(spec.dtype)
        self._rows = down_rows(spec.quantization)  # down columns quantized per neuron: scales in the records
        if spec.quantization and not self._rows:
            groups = n // spec.quantization["down"]["group_size"]
            stored = getattr(mx, spec.dtype)  # as the bundle stores them (runtime/dtypes.py)
            self.down_scales = mx.zeros((d, groups), dtype=stored)
            self.down_biases = mx.zeros((d, groups), dtype=stored)
        if biases:
            self.up_bias = mx.zeros((n,), dtype=dtype)
            self.down_bias = mx.zeros((d,), dtype=dtype)

    def dense_weights(self, records: mx.array) -> dict[str, mx.array]:
        """All of a layer's records, in neuron order -> the weights `dense` multiplies with."""
        layout, q = self._spec.record, self._spec.quantization
        w = cast_floats({name: layout.view(records, name) for name in layout.names()}, self.compute_dtype)
        if q and not self._rows:
            w["down.weight"] = transpose_packed(w["down.weight"], q["down"]["bits"])
        return w

    def _gate(self, x: mx.array, w: dict[str, mx.array]) -> mx.array:
        q = self._spec.quantization
        if q:
            return _qmm(x, w["gate.weight"], w["gate.scales"], w["gate.biases"], q["gate"])
        return x @ w["gate.weight"].T

    def _hidden(
        self, x: mx.array, w: dict[str, mx.array], up_bias: mx.array | None, gate: mx.array | None = None
    ) -> mx.array:
        """The neurons' activations h (..., n) for the records in `w` (`gate`: x's gate products, if known)."""
        q = self._spec.quantization
        if q:
            up = _qmm(x, w["up.weight"], w["up.scales"], w["up.biases"], q["up"])
        else:
            up = x @ w["up.weight"].T
        if up_bias is not None:
            up = up + up_bias
        if not self._spec.gated:
            return self._act(up)
        if self._up_act is not None:  # dReLU
            up = self._up_act(up)
        return self._act(self._gate(x, w) if gate is None else gate) * up

    def activations(self, x: mx.array, w: dict[str, mx.array]) -> tuple[mx.array, mx.array | None]:
        """Every neuron's activation h and, for gated FFNs, |silu(gate . x)| (what selectors are trained on)."""
        gate = self._gate(x, w) if self._spec.gated else None
        h = self._hidden(x, w, self.up_bias if "up_bias" in self else None, gate)
        return h, (mx.abs(nn.silu(gate)) if gate is not None else None)

    def _output(self, y: mx.array) -> mx.array:
        return y + self.down_bias if "down_bias" in self else y

    def dense(self, x: mx.array, w: dict[str, mx.array], mask: mx.array | None = None) -> mx.array:
        """x: (..., d) -> (..., d) through every neuron (those in `mask` only, if given). mlx-lm's math."""
        h = self._hidden(x, w, self.up_bias if "up_bias" in self else None)
        if mask is not None:
            h = h * mask.astype(h.dtype)
        return self.down(h, w)

    def down(self, h: mx.array, w: dict[str, mx.array]) -> mx.array:
        """h (..., n) of every neuron, in order -> the FFN's output (..., d)."""
        return self._output(self._partial_down(h, w, 0))

    def partial(self, x: mx.array, w: dict[str, mx.array], first: int) -> mx.array:
        """x (..., d) through neurons first..first+m only (dense weights `w` of those, in order): their
        share of the output, without the output bias (`finish` adds it once). Hybrid layouts use it."""
        m = w["up.weight"].shape[0]
        up_bias = self.up_bias[first : first + m] if "up_bias" in self else None
        return self._partial_down(self._hidden(x, w, up_bias), w, first)

    def finish(self, y: mx.array) -> mx.array:
        """The sum of `partial` shares -> the FFN's output (the output bias added)."""
        return self._output(y)

    def _partial_down(self, h: mx.array, w: dict[str, mx.array], first: int) -> mx.array:
        """h (..., m) of neurons first..first+m (dense weights `w` of those, in order) -> their share of
        the output, without the bias. Quantized: the slice starts and ends on down-projection groups."""
        q = self._spec.quantization
        if not q:
            return h @ w["down.weight"]
        if self._rows:
            return self._down_rows(h, w)
        g = q["down"]["group_size"]
        lo, hi = first // g, (first + h.shape[-1]) // g
        return _qmm(h, w["down.weight"], self.down_scales[:, lo:hi], self.down_biases[:, lo:hi], q["down"])

    def _down_rows(self, h: mx.array, w: dict[str, mx.array]) -> mx.array:
        """h (..., m) @ the m neurons' down rows (m, d), quantized along d: (..., d)."""
        q = self._spec.quantization["down"]
        return quantized_matmul_rows(
            h, w["down.weight"], w["down.scales"], w["down.biases"], q["group_size"], q["bits"]
        )

    def sparse(self, x: mx.array, w: dict[str, mx.array], ids: mx.array) -> mx.array:
        """x: (..., d) through the neurons `ids` whose record fields are `w` ({name: (n, count)}), in any order."""
        return self._output(self.sparse_share(x, w, ids))

    def sparse_share(self, x: mx.array, w: dict[str, mx.array], ids: mx.array) -> mx.array:
        """The neurons `ids`' share of the output (..., d), without the output bias: shares of disjoint
        sets of neurons add up to `sparse` of their union."""
        q = self._spec.quantization
        w = cast_floats(w, self.compute_dtype)  # the selected rows only (weights, or group scales)
        h = self._hidden(x, w, self.up_bias[ids] if "up_bias" in self else None)  # (..., n)
        if self._rows:  # one quantized product over the cached rows, in any order
            return self._down_rows(h, w)
        if q:  # down columns: codes here, group scales resident (neuron i is in group i // group_size)
            group = ids // q["down"]["group_size"]
            codes = unpack_codes(w["down.weight"], q["down"]["bits"]).astype(h.dtype)  # (n, d)
            down = codes * self.down_scales.T[group].astype(h.dtype) + self.down_biases.T[group].astype(h.dtype)
        else:
            down = w["down.weight"]
        return h @ down.astype(h.dtype)


class ResidentFFN(FFN):
    """The whole FFN in memory: the reference every other mode is checked against."""

    def set_records(self, records: mx.array) -> None:
        """Copies of the fields (contiguous, no padding): the records' buffer is not kept."""
        self._w = {k: mx.contiguous(v) for k, v in self.dense_weights(records).items()}
        mx.eval(self._w)

    def __call__(self, x: mx.array) -> mx.array:
        return self.dense(x, self._w)


class NaiveFFN(FFN):
    """Reads the layer's whole block from the bundle at every call: the paper's naive baseline."""

    def __init__(self, layer: int, spec: FFNSpec, stats: RuntimeStats, blocks, biases: bool = False):
        super().__init__(layer, spec, stats, biases)
        self._blocks = blocks

    def __call__(self, x: mx.array) -> mx.array:
        records = self._blocks.read_block(self._layer)
        y = self.dense(x, self._timed_weights(records))
        mx.eval(y)  # the block buffer is reused by the next layer: finish with it first
        return y

    def _blocks_weights(self) -> dict[str, mx.array]:
        return self._timed_weights(self._blocks.read_block(self._layer))

    def _timed_weights(self, records: mx.array) -> dict[str, mx.array]:
        t0 = time.perf_counter()
        w = self.dense_weights(records)
        mx.eval(w)
        self._stats.mem_seconds += time.perf_counter() - t0
        return w


@dataclass
class FlashOptions:
    """Run-time knobs of flash mode (the bench's ablations turn them off one by one)."""

    window: int = 4  # tokens whose selections stay cached; 0: no reuse at all (the predictor-only ablation)
    gap: int = 0  # read through gaps of up to this many records; -1: no coalescing at all
    bundled: bool = True  # one read per run of records; False: gate, up, down read separately
    masked_prompts: bool = False  # evaluate prompts with per-token selections instead of dense
    retain: bool = False  # keep neurons past the window while the cache has room (least recently used go first)
    overlap: bool = False  # compute the cached neurons while the missing ones are read (lost at full depth here)
    parts: list = field(default_factory=list)  # (offset, bytes) of gate/up/down inside a record


class FlashFFN(NaiveFFN):
    """The paper's method: selected neurons only, a windowed DRAM cache, reads of missing records."""

    def __init__(
        self,
        layer,
        spec,
        stats,
        blocks,
        reader: FlashReader,
        selector,
        capacity: int,
        options: FlashOptions,
        biases=False,
    ):
        super().__init__(layer, spec, stats, blocks, biases)
        self._reader, self._selector, self._options = reader, selector, options
        self._cache = NeuronCache(  # the overlap computes rows [0, start) while [start, used) are read
            spec.layers[layer].neurons, capacity, spec.record, max(1, options.window), options.retain, options.overlap
        )
        self._pending: mx.array | None = None  # the last output computed from the cache rows
        self.prompt_tail = False  # the next one-token call is a prompt's last token (see begin_prompt)

    def __call__(self, x: mx.array) -> mx.array:
        if x.shape[-2] > 1:
            return self._prompt(x)
        if self.prompt_tail:  # mlx-lm feeds a prompt's last token alone: it is still prompt, computed dense
            self.prompt_tail = False
            return self._prompt(x)
        mask = self._selector.select(self._layer, x.reshape(-1, x.shape[-1])[-1:])
        selected = _selected_ids(mask)
        if self._pending is not None:  # rows are about to move: finish what still reads them
            mx.eval(self._pending)
        if self._options.window == 0:  # every token loads all of its neurons afresh
            self._cache.clear()
        missing, fresh_rows = timed_update(self._cache, selected, self._stats)
        rows, ids = self._cache.views()
        start = self._cache.used - len(missing)  # with overlap (contiguous rows): [start, used) are read now
        cached = None
        if len(missing) and start and self._options.overlap:  # the cached rows compute during the reads
            cached = self.sparse_share(x, {k: v[:start] for k, v in rows.items()}, ids[:start])
            mx.async_eval(cached)
        o = self._options
        self._cache.fill_from_disk(
            self._reader,
            self._spec.layers[self._layer].offset,
            missing,
            fresh_rows,
            o.gap,
            None if o.bundled else o.parts,
        )
        self._stats.selected += len(selected)
        self._stats.loaded += len(missing)
        self._stats.computed += len(ids)
        if cached is None:
            self._pending = self.sparse(x, rows, ids)  # lazy: usually the next layer's selection evaluates it
        else:
            fresh = self.sparse_share(x, {k: v[start:] for k, v in rows.items()}, ids[start:])
            self._pending = self._output(cached + fresh)
        return self._pending

    def _prompt(self, x: mx.array) -> mx.array:
        """Many tokens: read the block sequentially in slices and compute densely (or, masked, each
        position with the neurons its cache would hold); seed the window from the last tokens' selections,
        copying their records out of the slices as they pass."""
        o, cache, n = self._options, self._cache, self._spec.layers[self._layer].neurons
        k = min(max(1, o.window), x.shape[-2])
        held = None
        if o.masked_prompts:  # x (B, L, d)
            masks = np.asarray(self._selector.select(self._layer, x))  # (B, L, n)
            retain = o.retain and o.window > 0
            held_np = cached_masks(masks, cache.capacity, max(1, o.window), retain, start=cache)
            if self._stats.record_masked:
                self._record_masked(held_np)
            held = mx.array(held_np)
            seeds = masks[0, -k:]
        else:
            seeds = np.asarray(self._selector.select(self._layer, x[0, -k:]))  # (k, n)
        if self._pending is not None:
            mx.eval(self._pending)
        t0 = time.perf_counter()
        incoming = [cache.update(np.flatnonzero(m).astype(np.int32))[0] for m in seeds]
        incoming = np.unique(np.concatenate(incoming))
        incoming = incoming[cache.row_of[incoming] >= 0]  # rows reserved for them (and still cached)
        self._stats.mem_seconds += time.perf_counter() - t0
        y, rows = 0, self._blocks.rows
        up_bias = self.up_bias if "up_bias" in self else None
        for first in range(0, n, rows):
            count = min(rows, n - first)
            records = self._blocks.read_rows(self._layer, first, count)
            w = self._timed_weights(records)
            h = self._hidden(x, w, None if up_bias is None else up_bias[first : first + count])
            if held is not None:
                h = h * held[..., first : first + count].astype(h.dtype)
            y = y + self._partial_down(h, w, first)
            mx.eval(y)  # the slice's buffer is read again by the next slice
            t0 = time.perf_counter()
            here = incoming[(incoming >= first) & (incoming < first + count)]
            cache.write_rows(cache.row_of[here], np.asarray(records)[here - first])
            self._stats.mem_seconds += time.perf_counter() - t0
        return self._output(y)

    def _record_masked(self, held: np.ndarray) -> None:
        """held (B, T, n) -> per sequence the neurons held and newly read at each position."""
        n = held.shape[-1]
        for row in held:
            loaded = (row[1:] & ~row[:-1]).sum(axis=-1)
            self._stats.masked.append(MaskedCounts(self._layer, n, row.sum(axis=-1), loaded))


def _selected_ids(selection) -> np.ndarray:
    """A selector's answer for one token: a mask (1, n) or ids -> sorted int32 ids."""
    if isinstance(selection, np.ndarray) and selection.dtype != np.bool_:
        return np.sort(selection.astype(np.int32))
    return np.flatnonzero(np.asarray(selection).reshape(-1)).astype(np.int32)
