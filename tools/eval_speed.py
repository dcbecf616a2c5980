#!/usr/bin/env python3
"""How fast flash evaluation is against dense: the same perplexity run (and, with --task, the same task
items) in resident mode and in flash mode with per-position selections, seconds and tokens per second.

    python tools/eval_speed.py [--model DIR] [--text FILE] [--tokens 1024] [--context 512]
                               [--task arc_easy --limit 10] [flash options: --memory 84% --selector ...]
                               [--json PATH]

Each mode is loaded once (load time not counted) and runs the same windows; the table gives flash's
speed as a share of dense's (the target of issue 11: at least a third). The perplexities are printed
beside, so a faster path that changed the numbers shows at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxflash.errors import MlxflashError  # noqa: E402
from mlxflash.eval.evaluate import EvalRequest, run_once  # noqa: E402
from mlxflash.fetch.default_model import default_model_path  # noqa: E402
from mlxflash.loader import load  # noqa: E402
from mlxflash.options import add_model_options, model_options  # noqa: E402
from mlxflash.runtime.cpu import reexec_with_openblas  # noqa: E402

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def blas_note() -> str:
    """Which BLAS the matrix products ran on (what a CPU figure means)."""
    if sys.platform == "darwin":
        return "Accelerate"
    preload = os.environ.get("LD_PRELOAD", "")
    return f"OpenBLAS preloaded ({preload.split()[0]})" if "openblas" in preload else "reference BLAS (MLX's CPU wheel)"


def measure(path, mode: str, requests: list[EvalRequest], **load_kwargs) -> dict:
    """Load once, run every request, time each (the load itself is not counted)."""
    if mode == "flash":
        load_kwargs["masked_prompts"] = True
    model, tokenizer = load(path, mode=mode, **load_kwargs)
    try:
        row = {"mode": model.flash.mode, "runs": []}
        if row["mode"] == "flash":
            row.update(density=round(model.flash.plan.density, 3), window=model.flash.options.window)
            row["selector"] = model.flash.plan.selector
        for request in requests:
            t0 = time.perf_counter()
            out = run_once(model, tokenizer, request)
            seconds = time.perf_counter() - t0
            run = {"what": request.task or "perplexity", "seconds": round(seconds, 2)}
            if request.task:
                run.update(items=out["items"], accuracy=out["accuracy"])
            else:
                run.update(tokens=out["tokens"], perplexity=round(out["perplexity"], 4))
            row["runs"].append(run)
    finally:
        model.flash.close()
    return row


def table(dense: dict, flash: dict) -> str:
    lines = [
        "| run | dense s | flash s | flash speed / dense | dense result | flash result |",
        "|---|---|---|---|---|---|",
    ]
    for d, f in zip(dense["runs"], flash["runs"]):
        result = (lambda r: f"ppl {r['perplexity']:.3f}") if "tokens" in d else (lambda r: f"acc {r['accuracy']:.3f}")
        what = f"{d['what']} ({d.get('tokens', d.get('items'))} {'tokens' if 'tokens' in d else 'items'})"
        lines.append(
            f"| {what} | {d['seconds']:.1f} | {f['seconds']:.1f} | {d['seconds'] / f['seconds']:.2f} "
            f"| {result(d)} | {result(f)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--text", type=Path, default=WIKITEXT, help="perplexity text (default: WikiText-2 test)")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--task", help="also time a zero-shot task (arc_easy, piqa, hellaswag, lambada)")
    p.add_argument("--limit", type=int, default=10, help="task items")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    reexec_with_openblas()
    kwargs = model_options(args)
    kwargs.pop("mode", None)
    if "memory" not in kwargs and "selector" not in kwargs:
        kwargs["memory"] = "84%"  # the default model's smallest correct budget
    path = args.model or default_model_path()
    requests = [EvalRequest(perplexity=str(args.text), context=args.context, tokens=args.tokens)]
    if args.task:
        requests.append(EvalRequest(task=args.task, limit=args.limit))
    try:
        dense = measure(path, "resident", requests, verify=kwargs["verify"])
        flash = measure(path, "flash", requests, **kwargs)
    except MlxflashError as e:
        print(f"eval_speed: error: {e}", file=sys.stderr)
        return 1
    conditions = {"blas": blas_note(), "load_average": os.getloadavg(), "model": str(path), "options": kwargs}
    flash_point = {k: flash.get(k) for k in ("selector", "density", "window")}
    print(f"{path}: flash {flash_point}; {conditions['blas']}; load average {conditions['load_average'][0]:.1f}")
    print(table(dense, flash))
    if args.json:
        args.json.write_text(json.dumps({"dense": dense, "flash": flash, "conditions": conditions}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
