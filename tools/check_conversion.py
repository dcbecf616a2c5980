"""Check a converted bundle against the GGUF it came from: perplexity of the bundle (resident) and of
mlx-lm's own model built from the same GGUF dequantized to float32 by llama.cpp's `gguf` package, on the
same tokens in the same windows, and the largest logit difference between them.

    python tools/check_conversion.py model.gguf models/BUNDLE --text wiki.test.raw --tokens 2048 --context 512

The reference holds every weight in float32 (about 4 bytes per parameter: ~6 GB for a 1.5B model); run
it with `nice` on a shared machine. Architectures whose GGUF tensors llama.cpp stores as mlx-lm has them
(llama, qwen2, qwen3) are supported; gemma3 and phi3 GGUFs are changed at conversion and are refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers.utils import logging as hf_logging

import mlxflash
from mlxflash.arch.registry import model_classes
from mlxflash.format.gguf import hf_config, metadata, mlx_lm_name
from mlxflash.runtime.cpu import blas_in_use

AS_STORED = ("llama", "qwen2", "qwen3")  # llama.cpp keeps these tensors as mlx-lm names them (up to names)


@dataclass
class Check:
    tokens: int  # tokens scored (each window predicts context - 1)
    windows: int
    context: int
    bundle_ppl: float
    reference_ppl: float
    ppl_ratio: float  # bundle / reference
    max_logit_diff: float
    mean_logit_diff: float
    top1_agreement: float  # share of positions whose argmax agrees
    seconds: float
    blas: str
    load_average: float


def reference_model(path: Path):
    """mlx-lm's model for the GGUF, every weight dequantized to float32 by `gguf.quants.dequantize`."""
    reader = GGUFReader(path)
    md = metadata(reader)
    arch = md.get("general.architecture")
    if arch not in AS_STORED:
        sys.exit(f"check_conversion: {path}: architecture {arch!r} is not supported here ({', '.join(AS_STORED)})")
    weights = {}
    for t in reader.tensors:
        name = mlx_lm_name(t.name, arch)
        if name is None:
            continue
        shape = tuple(reversed([int(d) for d in t.shape]))  # GGUF lists ne0 (the row length) first
        weights[name] = mx.array(dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))
        mx.eval(weights[name])
    config = hf_config(md, {t.name: None for t in reader.tensors}, path)
    model_cls, args_cls = model_classes(config)
    model = model_cls(args_cls.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def window_scores(model, window: mx.array) -> tuple[mx.array, mx.array]:
    """(logits (L-1, V) float32, negative log-likelihood of each next token (L-1,)) for one window."""
    logits = model(window[None, :-1])[0].astype(mx.float32)
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, window[1:, None], axis=-1)[:, 0]
    return logits, nll


def check(gguf_path: Path, bundle: Path, text: str, tokens: int, context: int) -> Check:
    start = time.perf_counter()
    flash_model, tokenizer = mlxflash.load(bundle, mode="resident")
    ids = tokenizer.encode(text[: tokens * 16])[:tokens]
    windows = len(ids) // context
    if windows == 0:
        sys.exit(f"check_conversion: the text gives {len(ids)} tokens, fewer than one window of {context}")
    ids = mx.array(ids[: windows * context]).reshape(windows, context)  # (windows, context)
    reference = reference_model(gguf_path)
    nll_b, nll_r, max_diff, sum_diff, agree, count = [], [], 0.0, 0.0, 0, 0
    for w in range(windows):
        logits_b, nb = window_scores(flash_model, ids[w])
        logits_r, nr = window_scores(reference, ids[w])
        diff = mx.abs(logits_b - logits_r)
        same = mx.argmax(logits_b, axis=-1) == mx.argmax(logits_r, axis=-1)
        mx.eval(nb, nr, diff, same)
        nll_b.append(nb)
        nll_r.append(nr)
        max_diff = max(max_diff, diff.max().item())
        sum_diff += diff.mean().item() * diff.shape[0]
        agree += same.sum().item()
        count += diff.shape[0]
        ppl_b, ppl_r = (float(np.exp(mx.concatenate(n).mean().item())) for n in (nll_b, nll_r))
        print(
            f"window {w + 1}/{windows}: perplexity so far bundle {ppl_b:.4f} reference {ppl_r:.4f}, "
            f"max |logit diff| {max_diff:.4f} ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    flash_model.flash.close()
    ppl_b = float(np.exp(mx.concatenate(nll_b).mean().item()))
    ppl_r = float(np.exp(mx.concatenate(nll_r).mean().item()))
    return Check(
        tokens=count,
        windows=windows,
        context=context,
        bundle_ppl=ppl_b,
        reference_ppl=ppl_r,
        ppl_ratio=ppl_b / ppl_r,
        max_logit_diff=max_diff,
        mean_logit_diff=sum_diff / count,
        top1_agreement=agree / count,
        seconds=time.perf_counter() - start,
        blas=blas_in_use(),
        load_average=os.getloadavg()[0],
    )


def table(c: Check) -> str:
    return "\n".join(
        [
            f"{'':<26}{'perplexity':>12}",
            f"{'bundle (resident)':<26}{c.bundle_ppl:>12.4f}",
            f"{'reference (float32)':<26}{c.reference_ppl:>12.4f}",
            f"ratio bundle/reference {c.ppl_ratio:.4f} ({(c.ppl_ratio - 1) * 100:+.2f}%) on {c.tokens} scored tokens "
            f"({c.windows} windows of {c.context})",
            f"logits: max |diff| {c.max_logit_diff:.4f}, mean |diff| {c.mean_logit_diff:.4f}, "
            f"top-1 agreement {c.top1_agreement * 100:.1f}%",
            f"{c.seconds:.0f} s; BLAS: {c.blas}; load average {c.load_average:.1f}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", type=Path, help="the GGUF the bundle was converted from")
    p.add_argument("bundle", type=Path, help="the converted bundle directory")
    p.add_argument("--text", type=Path, required=True, help="plain text to score (e.g. WikiText-2's wiki.test.raw)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens to score, cut into windows of --context")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = p.parse_args(argv)
    hf_logging.set_verbosity_error()  # the tokenizer's "longer than the maximum length" note: we cut windows
    result = check(args.gguf, args.bundle, args.text.read_text(encoding="utf-8"), args.tokens, args.context)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
