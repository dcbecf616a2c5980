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

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, make_prompt_cache

from ..errors import UsageError
from ..loader import load
from ..options import add_model_options, model_options
from ..runtime.report import load_report

TASKS = ("hellaswag", "arc_easy", "piqa", "lambada")
DATA_FILES = {
    "hellaswag": "zeroshot/hellaswag_val.txt",
    "arc_easy": "zeroshot/arc_easy.jsonl",
    "piqa": "zeroshot/piqa.jsonl",
    "lambada": "zeroshot/lambada_openai.jsonl",
}
SHARED_DATA = Path("../shared/data")  # the project's convention, relative to the checkout


PER_ITEM = ("correct", "correct_norm", "token_nll")  # kept for paired differences, not written to JSON


class DataFormatError(UsageError):
    """An evaluation file is not in a format the parsers know; the message names the file and line."""


# --------------------------------------------------------------------------------------------- data


@dataclass
class ChoiceItem:
    """A multiple-choice item: the context, the choices (continuations) and the gold index."""

    context: str
    choices: list[str]
    gold: int


@dataclass
class ClozeItem:
    """A LAMBADA item: the context and the word that completes it."""

    context: str
    target: str


def _bad(path: Path, line: int, what: str) -> DataFormatError:
    return DataFormatError(f"{path}:{line}: {what}")


def _json_lines(path: Path):
    """(line number, object) for each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _bad(path, n, f"not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict):
                raise _bad(path, n, f"expected a JSON object, found {type(obj).__name__}")
            yield n, obj


def _choice_item(path: Path, n: int, obj: dict) -> ChoiceItem:
    query, choices, gold = obj.get("query"), obj.get("choices"), obj.get("gold")
    if not isinstance(query, str):
        raise _bad(path, n, 'expected {"query": str, "choices": [str, ...], "gold": int}; "query" missing or not text')
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
        raise _bad(path, n, '"choices" must be a list of at least two strings')
    if not (isinstance(gold, int) and 0 <= gold < len(choices)):
        raise _bad(path, n, f'"gold" must be an index into the {len(choices)} choices, found {gold!r}')
    return ChoiceItem(query, choices, gold)


def read_choice_jsonl(path: str | Path) -> list[ChoiceItem]:
    """ARC/PIQA JSON lines: {"query", "choices", "gold"} (mosaicml/llm-foundry local eval format)."""
    path = Path(path)
    return [_choice_item(path, n, obj) for n, obj in _json_lines(path)]


def read_hellaswag_text(path: str | Path) -> list[ChoiceItem]:
    """HellaSwag text: 6 lines per item, context / gold label 0-3 / four endings (llama.cpp's format)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    items = []
    for start in range(0, len(lines), 6):
        block = lines[start : start + 6]
        label = block[1].strip() if len(block) > 1 else ""
        if len(block) > 1 and label not in ("0", "1", "2", "3"):
            raise _bad(path, start + 2, f"expected the gold label 0-3, found {label[:40]!r}")
        if len(block) < 6:
            raise _bad(path, start + 1, f"an item needs 6 lines (context, label, 4 endings), found {len(block)}")
        for k, line in enumerate(block[2:]):
            if not line.strip():
                raise _bad(path, start + 3 + k, "empty ending")
        items.append(ChoiceItem(block[0], block[2:], int(label)))
    return items


def read_lambada(path: str | Path) -> list[ClozeItem]:
    """LAMBADA JSON lines: {"context", "continuation"}."""
    path = Path(path)
    items = []
    for n, obj in _json_lines(path):
        context, target = obj.get("context"), obj.get("continuation")
        if not (isinstance(context, str) and isinstance(target, str) and target.strip()):
            raise _bad(path, n, 'expected {"context": str, "continuation": str}')
        items.append(ClozeItem(context, target.strip()))
    return items


def read_task(task: str, path: str | Path) -> list[ChoiceItem] | list[ClozeItem]:
    """The items of a task's file; the format is recognised from the first line."""
    path = Path(path)
    if task not in TASKS:
        raise UsageError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    is_json = first.lstrip().startswith("{")
    if task == "lambada":
        if not is_json:
            raise _bad(path, 1, 'LAMBADA expects JSON lines {"context", "continuation"}')
        return read_lambada(path)
    if is_json:
        return read_choice_jsonl(path)
    if task == "hellaswag":
        return read_hellaswag_text(path)
    raise _bad(path, 1, f'{task} expects JSON lines {{"query", "choices", "gold"}}')


def default_data(task: str) -> Path:
    """The task's file under ../shared/data, from the working directory or else from the checkout."""
    here = SHARED_DATA / DATA_FILES[task]
    checkout = Path(__file__).resolve().parents[2] / SHARED_DATA / DATA_FILES[task]
    return here if here.exists() or not checkout.exists() else checkout.resolve()


def choice_prompts(task: str, item: ChoiceItem) -> list[tuple[str, str]]:
    """(context, continuation) per choice, as lm-evaluation-harness writes them."""
    if task in ("arc_easy", "piqa"):
        query = item.context.strip()
        if not query.startswith("Question:"):
            query = "Question: " + query
        return [(query + "\nAnswer:", " " + c.strip()) for c in item.choices]
    return [(item.context.rstrip(), " " + c.strip()) for c in item.choices]


# ------------------------------------------------------------------------------------------ scoring


@dataclass
class Score:
    """A continuation's summed log-likelihood, whether greedy decoding gives it, and its token count."""

    logprob: float
    greedy: bool
    tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens, the continuation's being those of the whole after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = list(tokenizer.encode(context, add_special_tokens=False))
    whole = list(tokenizer.encode(context + continuation, add_special_tokens=False))
    if whole[: len(ctx)] != ctx or len(whole) <= len(ctx):  # the boundary merged: encode apart
        whole = ctx + list(tokenizer.encode(continuation, add_special_tokens=False))
    if not ctx:  # nothing to condition on: start from the end-of-text token, as the harness does
        ctx = [tokenizer.eos_token_id]
        whole = ctx + whole
    return ctx, whole[len(ctx) :]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def batchable(model: nn.Module) -> bool:
    """Whether rows of a batch may share one forward: not in flash mode (selections come from row 0)."""
    runtime = getattr(model, "flash", None)
    return getattr(runtime, "mode", "resident") != "flash"


def _prefill(model: nn.Module, tokens: list[int], cache: list) -> None:
    """Run tokens into the cache; the inner model skips the LM head, whose logits nobody reads."""
    x = mx.array(tokens)[None]
    inner = getattr(model, "model", None)
    h = inner(x, cache=cache) if inner is not None else model(x, cache=cache)
    mx.eval(h, [c.state for c in cache])


def _fork(cache: list, rows: int) -> list:
    """A copy of a filled KV cache for `rows` sequences that continue from it."""
    out = []
    for c in cache:
        new = KVCache()
        new.keys = mx.repeat(c.keys[..., : c.offset, :], rows, axis=0)
        new.values = mx.repeat(c.values[..., : c.offset, :], rows, axis=0)
        new.offset = c.offset
        out.append(new)
    return out


def _row_scores(logits: mx.array, targets: list[int], first: int) -> Score:
    """Score targets[first:] with logits (T, V) whose row t predicts targets[t]."""
    logits = logits[first : len(targets)].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    tgt = mx.array(targets[first:])
    picked = mx.take_along_axis(logprobs, tgt[:, None], axis=-1).sum()
    greedy = mx.all(mx.argmax(logits, axis=-1) == tgt)
    mx.eval(picked, greedy)
    return Score(picked.item(), bool(greedy.item()), len(targets) - first)


def score_continuations(
    model: nn.Module, pairs: list[tuple[list[int], list[int]]], batch: bool | None = None
) -> list[Score]:
    """Log-likelihood of each continuation given its context: (context tokens, continuation tokens) pairs.

    The prefix the sequences share is run once into a KV cache; the rest is one padded batch (or one
    forward per sequence where `batch` is False, the default in flash mode).
    """
    if any(not ctx or not cont for ctx, cont in pairs):
        raise ValueError("every pair needs at least one context and one continuation token")
    seqs = [ctx + cont for ctx, cont in pairs]
    cache = make_prompt_cache(model)
    shared = _common_prefix(seqs)
    prefix = min(shared, *(len(ctx) - 1 for ctx, _ in pairs))
    if not all(isinstance(c, KVCache) for c in cache):
        prefix = 0
    if prefix:
        _prefill(model, seqs[0][:prefix], cache)
    rows = [s[prefix:] for s in seqs]  # inputs rows[i][:-1] predict rows[i][1:]
    firsts = [len(ctx) - 1 - prefix for ctx, _ in pairs]
    if batch is None:
        batch = batchable(model)
    if batch and len(rows) > 1:
        return _score_batch(model, rows, firsts, cache, prefix)
    return [_score_one(model, r, f, cache, prefix) for r, f in zip(rows, firsts)]


def _score_batch(model, rows: list[list[int]], firsts: list[int], cache: list, prefix: int) -> list[Score]:
    width = max(len(r) for r in rows) - 1
    x = mx.array([r[:-1] + [0] * (width - len(r) + 1) for r in rows])  # right padding: causal, harmless
    logits = model(x, cache=_fork(cache, len(rows)) if prefix else None)
    return [_row_scores(logits[i], r[1:], f) for i, (r, f) in enumerate(zip(rows, firsts))]


def _score_one(model, row: list[int], first: int, cache: list, prefix: int) -> Score:
    logits = model(mx.array(row[:-1])[None], cache=_fork(cache, 1) if prefix else None)
    return _row_scores(logits[0], row[1:], first)


# --------------------------------------------------------------------------------------- statistics


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation, as the harness reports)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return float(v.mean()), se


# --------------------------------------------------------------------------------------- perplexity


def window_spans(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored) of each window over n tokens. No token is scored twice; a token is left
    out only where it starts a window without context (stride == context: each window's first)."""
    if context < 2 or not 1 <= stride <= context:
        raise UsageError(f"--context {context} --stride {stride}: need context >= 2 and 1 <= stride <= context")
    spans, scored_to, start = [], 1, 0
    while scored_to < n:
        end = min(start + context, n)
        spans.append((start, end, max(scored_to, start + 1)))
        scored_to, start = end, start + stride
    return spans


def token_logprobs(model: nn.Module, tokens: list[int], first: int) -> np.ndarray:
    """log p(tokens[t] | tokens[:t]) for t >= first (first >= 1), one forward with a prefilled cache."""
    cache = make_prompt_cache(model)
    if first > 1:
        _prefill(model, tokens[: first - 1], cache)
    logits = model(mx.array(tokens[first - 1 : -1])[None], cache=cache)[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logprobs, mx.array(tokens[first:])[:, None], axis=-1)[:, 0]
    return np.array(picked)


def perplexity(
    model: nn.Module, tokens: list[int], context: int, stride: int | None = None, progress: bool = False
) -> dict:
    """Perplexity of a token stream: tokens scored, mean NLL, perplexity and its 95% interval."""
    stride = stride or context
    spans = window_spans(len(tokens), context, stride)
    nll = []
    with _bar(sum(end - first for _, end, first in spans), "tok", progress) as bar:
        for start, end, first in spans:
            nll.extend((-token_logprobs(model, tokens[start:end], first - start)).tolist())
            bar.update(end - first)
    mean, se = mean_se(nll)
    return {
        "tokens": len(nll),
        "nll": mean,
        "nll_se": se,
        "perplexity": math.exp(mean),
        "ci95": [math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)],
        "context": context,
        "stride": stride,
        "windows": len(spans),
        "token_nll": nll,
    }


def _bar(total: int, unit: str, enabled: bool, desc: str = ""):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# -------------------------------------------------------------------------------------------- tasks


def evaluate_choices(model, tokenizer, task: str, items: list[ChoiceItem], progress: bool = False) -> dict:
    """acc (summed log-likelihood) and acc_norm (per character) over multiple-choice items."""
    correct, correct_norm = [], []
    with _bar(len(items), "item", progress, task) as bar:
        for item in items:
            prompts = choice_prompts(task, item)
            scores = score_continuations(model, [encode_pair(tokenizer, c, x) for c, x in prompts])
            ll = np.array([s.logprob for s in scores])
            lengths = np.array([len(c.strip()) for c in item.choices], dtype=np.float64)
            correct.append(float(np.argmax(ll) == item.gold))
            correct_norm.append(float(np.argmax(ll / np.maximum(lengths, 1)) == item.gold))
            bar.update(1)
    return _accuracy(task, correct, correct_norm)


def _accuracy(task: str, correct: list[float], correct_norm: list[float] | None) -> dict:
    acc, se = mean_se(correct)
    out = {"task": task, "items": len(correct), "accuracy": acc, "accuracy_se": se, "correct": correct}
    if correct_norm is not None:
        out["accuracy_norm"], out["accuracy_norm_se"] = mean_se(correct_norm)
        out["correct_norm"] = correct_norm
    return out


def evaluate_lambada(model, tokenizer, items: list[ClozeItem], progress: bool = False) -> dict:
    """Exact greedy match of the last word, and the perplexity of the last word."""
    correct, logprobs = [], []
    with _bar(len(items), "item", progress, "lambada") as bar:
        for item in items:
            (score,) = score_continuations(model, [encode_pair(tokenizer, item.context.rstrip(), " " + item.target)])
            correct.append(float(score.greedy))
            logprobs.append(score.logprob)
            bar.update(1)
    out = _accuracy("lambada", correct, None)
    mean, se = mean_se(logprobs)
    out.update(perplexity=math.exp(-mean), ci95=[math.exp(-mean - 1.96 * se), math.exp(-mean + 1.96 * se)])
    return out


def evaluate_task(model, tokenizer, task: str, items: list, progress: bool = False) -> dict:
    if task == "lambada":
        return evaluate_lambada(model, tokenizer, items, progress)
    return evaluate_choices(model, tokenizer, task, items, progress)


def read_text_tokens(tokenizer, path: str | Path, limit: int | None) -> list[int]:
    """A text file's tokens (no BOS), the first `limit` of them if given."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if limit:  # tokenize a generous prefix only: whole files can be long
        text = text[: max(limit * 16, 4096)]
    tokens = list(tokenizer.encode(text, add_special_tokens=False))
    tokens = tokens[:limit] if limit else tokens
    if len(tokens) < 2:
        raise UsageError(f"{path}: fewer than 2 tokens to score")
    return tokens


# ------------------------------------------------------------------------------------------- runner


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


# ---------------------------------------------------------------------------------------------- CLI


def add_eval_parser(sub) -> None:
    """Register `mlxflash eval` on an argparse subparsers object."""
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy, optionally dense against flash")
    add_model_options(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--perplexity", metavar="FILE", help="perplexity of a text file")
    what.add_argument("--task", choices=TASKS, help="zero-shot task")
    p.add_argument("--context", type=int, default=512, help="perplexity window in tokens (default 512)")
    p.add_argument("--stride", type=int, help="perplexity: tokens between window starts (default: --context)")
    p.add_argument("--tokens", type=int, help="perplexity: score the file's first N tokens only")
    p.add_argument("--data", help="task data file (default: ../shared/data/zeroshot/...)")
    p.add_argument("--limit", type=int, help="task: the first N items only")
    p.add_argument("--compare", action="store_true", help="evaluate resident and --compare-mode, print both")
    p.add_argument("--compare-mode", choices=("naive", "flash"), default="flash", help="default flash")
    p.add_argument("--json", help="write {'runs': [...]} to this path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_cli)


def _check(args) -> None:
    for name in ("context", "stride", "tokens", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} {value}: must be at least 1")
    if args.stride and args.stride > args.context:
        raise UsageError(f"--stride {args.stride}: must not exceed --context {args.context}")
    if args.perplexity and (args.data or args.limit):
        raise UsageError("--data and --limit go with --task; --perplexity takes --context, --stride, --tokens")


def run_cli(args) -> None:
    _check(args)
    request = EvalRequest(args.perplexity, args.context, args.stride, args.tokens, args.task, args.data, args.limit)
    progress = not args.no_progress
    flash_kwargs = model_options(args)
    flash_kwargs.pop("mode", None)
    common = {"verify": flash_kwargs.pop("verify")}
    if args.compare:  # the compared configuration first: a budget that does not fit fails at once
        other = evaluate_mode(args.model, request, args.compare_mode, progress, **common, **flash_kwargs)
        runs = [evaluate_mode(args.model, request, "resident", progress, **common), other]
    else:
        runs = [evaluate_mode(args.model, request, args.mode, progress, **common, **flash_kwargs)]
    for run in runs:
        print(format_run(run))
    report = {"runs": [public(r) for r in runs]}
    if args.compare:
        report["difference"] = difference(runs[0], runs[1])
        print(format_difference(report["difference"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
