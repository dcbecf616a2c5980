"""One process per mode and round: the page cache of ffn.bin evicted before each, the mmap baseline
under a cgroup memory cap of the budget, the result passed back as one tagged JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from mlxflash.runtime.costmodel import evict

from .measure import ModeResult

RESULT_TAG = "BENCH-RESULT "
GB = 1e9


def cgroup_cap(limit: int) -> tuple[Path | None, str]:
    """A fresh memory cgroup limited to `limit` bytes: (its cgroup.procs, how) or (None, why not)."""
    name = f"mlxflash-bench-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists() and os.access(v1, os.W_OK):
        try:
            group = v1 / name
            group.mkdir(exist_ok=True)
            (group / "memory.limit_in_bytes").write_text(str(limit))
            return group / "cgroup.procs", f"cgroup v1 memory.limit_in_bytes = {limit / GB:.2f} GB"
        except OSError as e:
            return None, f"cgroup v1 memory controller refused ({e.strerror})"
    v2 = Path("/sys/fs/cgroup")
    if "memory" in _read(v2 / "cgroup.controllers").split() and os.access(v2, os.W_OK):
        try:
            group = v2 / name
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(str(limit))
            return group / "cgroup.procs", f"cgroup v2 memory.max = {limit / GB:.2f} GB"
        except OSError as e:
            return None, f"cgroup v2 memory.max refused ({e.strerror})"
    return None, "no writable cgroup memory controller (needs root and cgroup v1 memory or v2 memory.max)"


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


def remove_cgroup(procs: Path | None) -> None:
    if procs is not None:
        try:
            procs.parent.rmdir()
        except OSError:
            pass


def disk_read_bytes() -> int | None:
    """Bytes this process made the kernel read from the device (/proc/self/io); None where unknown."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_child(
    command: Sequence[str], mode: str, ffn_path: Path, cap_bytes: int | None, result=ModeResult, tag: str = RESULT_TAG
):
    """Run one mode's measurement in a fresh process (under a memory cap of `cap_bytes` if given); its
    `result` dataclass is read from the line behind `tag`."""
    evict(ffn_path)
    procs, how = None, ""
    if cap_bytes is not None:
        procs, how = cgroup_cap(cap_bytes)
        if procs is None:
            return result(mode, skipped=how)
    try:
        preexec = (lambda: procs.write_text(str(os.getpid()))) if procs else None
        p = subprocess.run(list(command), capture_output=True, text=True, preexec_fn=preexec)
    finally:
        remove_cgroup(procs)
    return parse_child(mode, p, how, result, tag)


def report_to_parent(r: ModeResult) -> None:
    print(RESULT_TAG + json.dumps(asdict(r)), flush=True)


def parse_child(mode: str, p: subprocess.CompletedProcess, how: str, result=ModeResult, tag: str = RESULT_TAG):
    """The `result` (a ModeResult dataclass: dense's, or bench_moe's) a child printed behind `tag`, or why none."""
    for line in p.stdout.splitlines():
        if line.startswith(tag):
            r = result(**json.loads(line[len(tag) :]))
            r.note = "; ".join(x for x in (r.note, how) if x)
            return r
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    why = (
        "killed (exit 137: over the memory cap)"
        if p.returncode in (137, -9)
        else f"failed (exit {p.returncode}): {tail}"
    )
    return result(mode, skipped=why)


def parse_modes(text: str, known) -> list[str]:
    """A --modes comma list, every mode one of `known` (else SystemExit naming the unknown ones)."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in known]
    if unknown:
        raise SystemExit(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    return modes


def python() -> str:
    return sys.executable
