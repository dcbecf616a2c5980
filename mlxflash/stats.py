"""Runtime counters (I/O, memory management) and the per-token statistics built from them."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field

from .reader import IOCounters


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@dataclass
class RuntimeStats:
    """Counters the FFN modules add to while a token is computed."""

    io: IOCounters = field(default_factory=IOCounters)
    mem_seconds: float = 0.0

    def snapshot(self) -> tuple[float, float, int, int]:
        c = self.io
        return c.seconds, self.mem_seconds, c.bytes_read, c.bytes_transferred


@dataclass
class TokenStats:
    """Decode statistics over the tokens generated so far (the first token, which carries the prompt,
    is reported separately as prefill)."""

    mode: str
    ffn_bytes: int
    resident_bytes: int
    direct_io: bool
    io_note: str
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    tokens: int = 0
    decode_s: float = 0.0
    io_s: float = 0.0
    mem_s: float = 0.0
    bytes_read: int = 0
    bytes_transferred: int = 0
    extra: dict = field(default_factory=dict)

    def _per_token(self, total: float) -> float:
        return total / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict:
        per = self._per_token
        return {
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "prefill_s": self.prefill_s,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.decode_s if self.decode_s else 0.0,
            "ms_per_token": 1e3 * per(self.decode_s),
            "io_ms_per_token": 1e3 * per(self.io_s),
            "mem_ms_per_token": 1e3 * per(self.mem_s),
            "compute_ms_per_token": 1e3 * per(self.decode_s - self.io_s - self.mem_s),
            "bytes_read_per_token": per(self.bytes_read),
            "bytes_transferred_per_token": per(self.bytes_transferred),
            "ffn_bytes": self.ffn_bytes,
            "resident_bytes": self.resident_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
            "direct_io": self.direct_io,
            "io_note": self.io_note,
            **self.extra,
        }
