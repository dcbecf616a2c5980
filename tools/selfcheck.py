#!/usr/bin/env python3
"""What works on this machine, checked and printed: the Mac path made checkable by its user.

    python tools/selfcheck.py [--model BUNDLE] [--memory 88%] [--tokens 8] [--no-decode] [--json PATH]

1. The device MLX computes on (the GPU through Metal, or the CPU; without Metal the GPU checks are
   skipped and the report says so).
2. Direct I/O: the reader's mode on this file system (F_NOCACHE on macOS, O_DIRECT on Linux, or the
   buffered fallback and why), and that a direct read returns the file's bytes.
3. Reads land in MLX memory: a read through the reader into an aligned MLX array's memory (no copy),
   then the device computes on that array and gets the file's bytes (on the GPU too, where present).
4. Exactness on tiny random configs (a ReLU OPT and a SwiGLU Llama): naive and flash (every neuron
   selected, token by token) give resident's logits, on the CPU and, where present, the GPU against
   the CPU.
5. One timed flash decode of the default model (or --model) under --memory.
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_synthetic import make_synthetic  # noqa: E402

from mlxflash.fetch.default_model import default_model_path, ensure_default_predictors  # noqa: E402
from mlxflash.loader import load  # noqa: E402
from mlxflash.runtime.cpu import blas_in_use, reexec_with_openblas  # noqa: E402
from mlxflash.runtime.reader import FlashReader, aligned_buffer  # noqa: E402
from mlxflash.serve.generate import stream_generate  # noqa: E402

TINY_SHAPES = ("tiny-opt", "tiny-llama")
EXACT_ATOL = 1e-4  # float32 logits of a tiny model: only summation order differs
GPU_ATOL = 1e-3
PROMPT = "Once upon a time, in a small village by the sea, there lived"  # a plain continuation: no early end


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str


def gpu_available() -> bool:
    return bool(getattr(mx, "metal", None) and mx.metal.is_available())


def _name(device) -> str:
    return "gpu" if device == mx.gpu else "cpu"


def devices() -> list:
    return [mx.cpu, mx.gpu] if gpu_available() else [mx.cpu]


def check_device() -> Check:
    if gpu_available():
        info = mx.metal.device_info() if hasattr(mx.metal, "device_info") else {}
        return Check("device", "PASS", f"GPU (Metal) {info.get('architecture', '')}; CPU for the reference path")
    return Check("device", "PASS", f"CPU only (no Metal on this machine: GPU checks skipped); BLAS {blas_in_use()}")


def check_direct_io(ffn: Path) -> Check:
    reader = FlashReader(ffn, threads=2)
    try:
        n = min(reader.size, 1 << 20) // 4096 * 4096
        _, view = aligned_buffer(n)
        reader.read([(0, view)])
        with open(ffn, "rb") as f:
            same = np.array_equal(view, np.frombuffer(f.read(n), np.uint8))
    finally:
        reader.close()
    mode = reader.io_note if reader.direct_io else f"NOT in effect: {reader.io_note}"
    status = "PASS" if same and reader.direct_io else ("FAIL" if not same else "SKIP")
    return Check("direct I/O", status, f"{mode} on {ffn}; {n} bytes read {'match' if same else 'DIFFER from'} the file")


def check_reads_in_mlx_memory(ffn: Path) -> list[Check]:
    reader = FlashReader(ffn, threads=2)
    try:
        n = min(reader.size, 4 << 20) // 4096 * 4096
        arr, view = aligned_buffer(n)
        reader.read([(0, view)])
    finally:
        reader.close()
    with open(ffn, "rb") as f:
        truth = np.frombuffer(f.read(n), np.uint8)
    shared = np.asarray(arr).ctypes.data == view.ctypes.data
    want = int(truth.astype(np.uint64).sum())
    out = []
    for device in devices():
        got = int(mx.sum(arr.astype(mx.uint32), stream=device).item())
        ok = shared and got == want
        out.append(
            Check(
                f"reads land in MLX memory ({_name(device)})",
                "PASS" if ok else "FAIL",
                f"{n} bytes read into an MLX array's own memory ({'shared, no copy' if shared else 'NOT shared'}); "
                f"the {_name(device)} sums them to {got} (file: {want})",
            )
        )
    if not gpu_available():
        out.append(Check("reads land in MLX memory (gpu)", "SKIP", "no Metal on this machine"))
    return out


def decode_logits(bundle: Path, mode: str, tokens: list[int], device) -> np.ndarray:
    """Logits (T, vocab) of `tokens` fed one at a time (flash: every neuron selected, the sparse path)."""
    with mx.stream(device):
        extra = {"selector": "all"} if mode == "flash" else {}  # no budget: every neuron fits
        model, _ = load(bundle, mode=mode, **extra)
        cache = make_prompt_cache(model)
        out = []
        for t in tokens:
            logits = model(mx.array([[t]]), cache=cache)
            out.append(np.asarray(logits[0, -1].astype(mx.float32)))
        model.flash.close()
    return np.stack(out)


def check_exactness(workdir: Path) -> list[Check]:
    out = []
    tokens = [1, 7, 3, 12, 5, 9]
    for shape in TINY_SHAPES:
        bundle = make_synthetic(shape, workdir / shape, dtype="float32", rank=0, progress=False)
        reference = decode_logits(bundle, "resident", tokens, mx.cpu)
        for device in devices():
            for mode in ("resident", "naive", "flash"):
                if device == mx.cpu and mode == "resident":
                    continue
                got = decode_logits(bundle, mode, tokens, device)
                diff = float(np.abs(got - reference).max())
                tol = EXACT_ATOL if device == mx.cpu else GPU_ATOL
                name = f"exact {shape} {mode} ({_name(device)} vs resident on the cpu)"
                out.append(
                    Check(name, "PASS" if diff <= tol else "FAIL", f"max |logit diff| {diff:.2e} (tolerance {tol:g})")
                )
        if not gpu_available():
            out.append(Check(f"exact {shape} (gpu vs cpu)", "SKIP", "no Metal on this machine"))
    return out


def check_decode(bundle: Path, memory: str, tokens: int) -> Check:
    ensure_default_predictors(bundle) if bundle == default_model_path() else None
    model, tokenizer = load(bundle, memory=memory)
    try:
        last = None
        t0 = time.perf_counter()
        for r in stream_generate(model, tokenizer, PROMPT, max_tokens=tokens):
            last = r
        wall = time.perf_counter() - t0
    finally:
        model.flash.close()
    s = last.stats if last else {}
    ok = last is not None and s.get("mode") == "flash" and s.get("tokens", 0) > 0
    detail = (
        f"{bundle.name} at --memory {memory}: {s.get('mode')} mode, {s.get('tokens')} decode tokens at "
        f"{s.get('ms_per_token', 0):.1f} ms/token (I/O {s.get('io_ms_per_token', 0):.1f} ms, "
        f"{s.get('bytes_read_per_token', 0) / 1e6:.2f} MB read/token, {s.get('io_note')}); prefill "
        f"{1e3 * s.get('prefill_s', 0):.0f} ms; peak RSS {s.get('peak_rss_bytes', 0) / 1e6:.0f} MB; wall {wall:.1f} s"
    )
    return Check("timed flash decode", "PASS" if ok else "FAIL", detail)


def run(model: Path | None, memory: str, tokens: int, decode: bool) -> list[Check]:
    checks = [check_device()]
    with tempfile.TemporaryDirectory(prefix="mlxflash-selfcheck-") as tmp:
        tiny = make_synthetic("tiny-llama", Path(tmp) / "io", dtype="float32", rank=0, progress=False)
        checks.append(check_direct_io(tiny / "ffn.bin"))
        checks += check_reads_in_mlx_memory(tiny / "ffn.bin")
        checks += check_exactness(Path(tmp))
    if decode:
        checks.append(check_decode(model or default_model_path(), memory, tokens))
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="bundle for the timed decode (default: the default model)")
    p.add_argument("--memory", default="88%", help="budget of the timed flash decode")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--no-decode", action="store_true", help="skip the timed decode")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    checks = run(args.model, args.memory, args.tokens, not args.no_decode)
    width = max(len(c.name) for c in checks)
    print(f"mlxflash selfcheck on {sys.platform}, MLX {mx.__version__}, default device {mx.default_device()}")
    for c in checks:
        print(f"{c.status:4s}  {c.name:{width}s}  {c.detail}")
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in checks], indent=1) + "\n")
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    reexec_with_openblas()  # as the CLI does (MLXFLASH_BLAS=reference opts out)
    sys.exit(main())
