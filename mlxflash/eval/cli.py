"""`mlxflash eval`: its options, their checks, and the printed and JSON report."""

from __future__ import annotations

import json

from ..errors import UsageError
from ..options import add_model_options, model_options
from .data import TASKS
from .evaluate import EvalRequest, difference, evaluate_mode, format_difference, format_run, public


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
