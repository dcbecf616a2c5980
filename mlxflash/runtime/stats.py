"""Runtime counters (I/O, memory management, neuron cache) and the per-token statistics built from them."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field

import numpy as np

from .reader import IOCounters


def peak_rss_bytes() -> int:
    """This process's peak resident set. Linux: VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss carries over from a large parent that forked the process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # macOS: no /proc; the peak is the best cheap figure
        return peak_rss_bytes()


@dataclass(frozen=True)
class MaskedCounts:
    """One layer's replayed cache over one masked sequence: what calibration sizes a point's cache and
    reads from (eval/quality.py)."""

    layer: int
    neurons: int
    held: np.ndarray  # (T,) neurons the cache holds after each position
    loaded: np.ndarray  # (T - 1,) neurons it had to read at each position after the first


@dataclass
class RuntimeStats:
    """Counters the FFN modules add to while tokens are computed (decode steps only for the cache)."""

    io: IOCounters = field(default_factory=IOCounters)
    mem_seconds: float = 0.0
    selected: int = 0  # neurons selected, summed over layers and decode tokens
    loaded: int = 0  # of those, neurons not in the cache (read from flash)
    computed: int = 0  # neurons in the cache that the FFN multiplied with
    masked: list[MaskedCounts] = field(default_factory=list)  # masked evaluation's caches, when recorded
    record_masked: bool = False

    def snapshot(self) -> dict[str, float]:
        c = self.io
        return {
            "io_s": c.seconds,
            "mem_s": self.mem_seconds,
            "bytes_read": c.bytes_read,
            "bytes_transferred": c.bytes_transferred,
            "reads": c.reads,
            "selected": self.selected,
            "loaded": self.loaded,
            "computed": self.computed,
        }


@dataclass
class TokenStats:
    """Decode statistics over the tokens generated so far (the first token, which carries the prompt,
    is reported separately as prefill)."""

    mode: str
    ffn_bytes: int
    resident_bytes: int
    direct_io: bool
    io_note: str
    neurons: int = 0  # FFN neurons of the model, all layers
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    tokens: int = 0
    decode_s: float = 0.0
    totals: dict = field(default_factory=dict)  # RuntimeStats.snapshot differences over the decode steps
    extra: dict = field(default_factory=dict)
    compute_dtype: str = ""  # the dtype the math ran in (float32 on the CPU whatever the bundle stores)

    def as_dict(self) -> dict:
        n = self.tokens or 1
        t = self.totals
        io_s, mem_s = t.get("io_s", 0.0), t.get("mem_s", 0.0)
        out = {
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "prefill_s": self.prefill_s,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.decode_s if self.decode_s else 0.0,
            "ms_per_token": 1e3 * self.decode_s / n,
            "io_ms_per_token": 1e3 * io_s / n,
            "mem_ms_per_token": 1e3 * mem_s / n,
            "compute_ms_per_token": 1e3 * (self.decode_s - io_s - mem_s) / n,
            "bytes_read_per_token": t.get("bytes_read", 0) / n,
            "bytes_transferred_per_token": t.get("bytes_transferred", 0) / n,
            "reads_per_token": t.get("reads", 0) / n,
            "ffn_bytes": self.ffn_bytes,
            "resident_bytes": self.resident_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
            "direct_io": self.direct_io,
            "io_note": self.io_note,
            "compute_dtype": self.compute_dtype,
        }
        if self.mode == "flash" and self.neurons:
            selected = t.get("selected", 0)
            out.update(
                selected_density=selected / (n * self.neurons),
                computed_density=t.get("computed", 0) / (n * self.neurons),
                new_neurons_per_token=t.get("loaded", 0) / n,
                new_density=t.get("loaded", 0) / (n * self.neurons),
                cache_hit_rate=1 - t.get("loaded", 0) / selected if selected else 0.0,
            )
        out.update(self.extra)
        return out
