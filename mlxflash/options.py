"""The command-line options every front end (generate, chat, serve, eval) shares: which bundle, and how
to run it. One definition, so the four commands accept the same flags with the same meaning."""

from __future__ import annotations

import argparse

from .runtime.kv import KV_BITS
from .runtime.planner import MODES, SELECTORS

_LOAD_KEYS = (
    "mode",
    "memory",
    "selector",
    "window",
    "density",
    "gate_bits",
    "threads",
    "gap",
    "max_kv_size",
    "kv_bits",
    "max_loss",
)


def _gap(value: str) -> int | str:
    return value if value == "auto" else int(value)


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="bundle directory, fetchable name (`mlxflash fetch` lists them) or Hugging Face org/name "
        "(default: SmolLM2-135M-Instruct, fetched on first use)",
    )
    p.add_argument(
        "--mode", choices=MODES, help="default: flash when --memory is below the model's size, else resident"
    )
    p.add_argument("--memory", help="DRAM budget: a size (4GB, 512MiB) or a share of the model (50%%)")
    p.add_argument("--selector", choices=SELECTORS, help="flash: how neurons are picked (default: the bundle's)")
    p.add_argument("--window", type=int, help="flash: tokens whose neurons stay cached (default: planned; 0: no reuse)")
    p.add_argument(
        "--density", type=float, help="flash: share of neurons to select (default: as trained, or what fits)"
    )
    p.add_argument(
        "--gate-bits", type=int, choices=(1, 2, 3, 4), help="flash, gate selector: select from a low-bit gate copy"
    )
    p.add_argument(
        "--max-loss",
        help="flash: run at the smallest budget (within --memory) whose measured perplexity increase is at most this (2%%)",
    )
    p.add_argument("--threads", type=int, help="reads in flight (default: from the disk cost model)")
    p.add_argument("--gap", type=_gap, help="flash: records read through between needed ones (auto: the cost model's)")
    p.add_argument(
        "--max-kv-size",
        type=int,
        help="tokens a conversation may hold; their KV cache is reserved inside --memory (longer ones are refused)",
    )
    p.add_argument("--kv-bits", type=int, choices=KV_BITS, help="store the KV cache quantized to this many bits")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification at load")


def model_options(args: argparse.Namespace) -> dict:
    """`mlxflash.load` keyword arguments from those options: only what the user gave, plus verify."""
    kw = {k: getattr(args, k) for k in _LOAD_KEYS if getattr(args, k, None) is not None}
    kw["verify"] = not args.no_verify
    return kw
