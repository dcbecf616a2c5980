"""Quality evaluation: text perplexity and zero-shot accuracy, in any mode, dense against flash.

Conventions follow lm-evaluation-harness:
- multiple choice: each choice is scored by the summed log-likelihood of its tokens given the context
  (`acc`), and by that sum divided by the choice's length in characters (`acc_norm`);
- the continuation's tokens are those of encode(context + continuation) after encode(context), with any
  trailing whitespace of the context moved into the continuation; no BOS token is added;
- LAMBADA: exact greedy match of the whole last word (`acc`) and its perplexity exp(-mean log p(word));
- prompts: ARC and PIQA "Question: ...\\nAnswer:" + " choice"; HellaSwag (preprocessed text) and
  LAMBADA context + " " + continuation.

Perplexity: windows of `context` tokens starting every `stride` tokens; each token is scored once, in the
first window that holds it and not as that window's first token (stride == context: non-overlapping
windows, each scoring context - 1 tokens).

Flash mode computes a many-token forward densely unless asked otherwise; the evaluation loads it with
`masked_prompts=True` (every position uses its own selection, united over the window) and scores one
sequence at a time, so that the measured quality is the sparse one.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..loader import load
from ..runtime.report import load_report
from .data import default_data, read_task, read_text_tokens
from .perplexity import perplexity
from .stats import mean_se
from .tasks import evaluate_task

PER_ITEM = ("correct", "correct_norm", "token_nll")  # kept for paired differences, not written to JSON


@dataclass
class EvalRequest:
    """One evaluation: a perplexity file or a task, and its settings."""

    perplexity: str | None = None
    context: int = 512
    stride: int | None = None
    tokens: int | None = None
    task: str | None = None
    data: str | None = None
    limit: int | None = None


def run_once(model, tokenizer, request: EvalRequest, progress: bool = False) -> dict:
    """Evaluate a loaded model; the result dict carries "perplexity" or "accuracy"."""
    t0 = time.perf_counter()
    if request.perplexity:
        tokens = read_text_tokens(tokenizer, request.perplexity, request.tokens)
        out = perplexity(model, tokens, request.context, request.stride, progress)
        out["file"] = str(request.perplexity)
    else:
        items = read_task(request.task, request.data or default_data(request.task))
        items = items[: request.limit] if request.limit else items
        out = evaluate_task(model, tokenizer, request.task, items, progress)
        out["data"] = str(request.data or default_data(request.task))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def evaluate_mode(path, request: EvalRequest, mode: str | None, progress: bool = False, **load_kwargs) -> dict:
    """Load the bundle in a mode (flash: with per-position selections), evaluate, release."""
    if mode == "flash" or (mode is None and load_kwargs.get("memory")):
        load_kwargs["masked_prompts"] = True
    load_kwargs = {k: v for k, v in load_kwargs.items() if v is not None}
    model, tokenizer = load(path, mode=mode, **load_kwargs)
    if progress:  # where the bytes live and the flash plan, as generate prints them
        print(load_report(model), file=sys.stderr)
    try:
        out = {"mode": model.flash.mode, **_config(model, load_kwargs)}
        out.update(run_once(model, tokenizer, request, progress))
    finally:
        model.flash.close()
    return out


def _config(model, load_kwargs: dict) -> dict:
    """What identifies the operating point: memory, selector, density, window."""
    runtime = model.flash
    out = {"memory": load_kwargs.get("memory")}
    if runtime.mode == "flash":
        plan = runtime.plan
        density = getattr(plan, "density", None)
        out.update(
            selector=plan.selector, density=round(density, 3) if density else None, window=runtime.options.window
        )
    return {k: v for k, v in out.items() if v is not None}


def difference(base: dict, other: dict) -> dict:
    """other - base for each headline metric; for accuracies also the paired standard error."""
    diff = {}
    for key in ("perplexity", "nll", "accuracy", "accuracy_norm"):
        if key in base and key in other:
            diff[key] = other[key] - base[key]
    for key, per_item in (("accuracy", "correct"), ("accuracy_norm", "correct_norm"), ("nll", "token_nll")):
        if per_item in base and per_item in other:
            diff[key + "_se"] = mean_se(np.subtract(other[per_item], base[per_item]))[1]
    if "perplexity" in diff:
        diff["perplexity_rel"] = other["perplexity"] / base["perplexity"] - 1
    return diff


def format_run(run: dict) -> str:
    """One line per run."""
    where = f"{run['mode']:<9}" + "".join(
        f" {k}={run[k]}" for k in ("memory", "selector", "density", "window") if k in run
    )
    if "tokens" in run:
        lo, hi = run["ci95"]
        return (
            f"{where}: perplexity {run['perplexity']:.3f} (95% CI {lo:.3f}-{hi:.3f}), mean NLL {run['nll']:.4f} "
            f"over {run['tokens']} tokens (context {run['context']}, stride {run['stride']}) in {run['seconds']} s"
        )
    text = (
        f"{where}: {run['task']} {run['items']} items: acc {100 * run['accuracy']:.1f} ± {100 * run['accuracy_se']:.1f}"
    )
    if "accuracy_norm" in run:
        text += f", acc_norm {100 * run['accuracy_norm']:.1f} ± {100 * run['accuracy_norm_se']:.1f}"
    if run["task"] == "lambada":
        text += f", last-word perplexity {run['perplexity']:.2f}"
    return text + f" in {run['seconds']} s"


def format_difference(diff: dict) -> str:
    parts = []
    if "perplexity" in diff:
        parts.append(f"perplexity {diff['perplexity']:+.3f} ({100 * diff['perplexity_rel']:+.2f}%)")
    if "nll" in diff:  # text perplexity; LAMBADA's last-word perplexity comes without it
        parts.append(f"mean NLL {diff['nll']:+.4f} ± {diff.get('nll_se', math.nan):.4f}")
    for key, name in (("accuracy", "acc"), ("accuracy_norm", "acc_norm")):
        if key in diff:
            parts.append(f"{name} {100 * diff[key]:+.1f} ± {100 * diff.get(key + '_se', math.nan):.1f} points")
    return "difference: " + ", ".join(parts)


def public(run: dict) -> dict:
    """A run without its per-item vectors (for JSON)."""
    return {k: v for k, v in run.items() if k not in PER_ITEM}
