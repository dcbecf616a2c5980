#!/usr/bin/env python3
"""A real model under a budget, end to end: time to first token for a prompt and ms per generated token,
mode by mode, each in its own process, the modes interleaved over rounds (`tools/bench.py BUNDLE --decode`).

    python tools/bench.py BUNDLE --decode --memory 65% [--modes flash,naive,hybrid,mmap,resident,mlx-lm]
                          [--rounds 3] [--tokens 8] [--prompt-tokens 512] [--text FILE] [--json PATH]

Every mode runs the whole model (attention, KV cache, LM head, sampling) over the same prompt, the first
--prompt-tokens tokens of --text as raw text, then --tokens greedy tokens. Time to first token (TTFT)
covers the prompt and the first token; decode figures are per token after it.

Modes:
  flash     the runtime at --memory: the bundle's selector at the operating point the planner picks
            (printed: selector, density, window), the neuron cache, coalesced direct reads.
  flash-auto  flash reading through gaps of the cost model's size (fewer, larger reads; more bytes).
  naive     the runtime's naive mode: every layer's whole FFN block read at every token.
  hybrid    the runtime's model whose FFNs keep the first neurons the budget allows resident and stream
            the rest at every token (tools/benchlib's hybrid driver in place of each MLP).
  mmap      the runtime's model whose FFNs copy their block out of a memory map of ffn.bin, under a
            cgroup memory cap of the budget (skipped with the reason where no cgroup can be made).
  resident  the runtime with the whole model in DRAM (when it fits the budget; --memory 100% for all).
  mlx-lm    mlx-lm's own model class with nn.QuantizedLinear layers holding the same weights (the FFN
            records put back into gate_proj/up_proj/down_proj), decoded by mlx_lm.stream_generate:
            what the runtime adds over mlx-lm. Floats and group scales are cast to the runtime's compute
            dtype (float32 on the CPU, where MLX's float16 math is several times slower; as stored on Metal).

Peak RSS is the child's (ru_maxrss). Bytes per token are what the reader moved (direct I/O alignment
included) over the decode steps; for mmap what the kernel read (/proc/self/io).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from benchlib import isolation  # noqa: E402
from benchlib.budget import Budget, hybrid_keep, resolve_budget  # noqa: E402
from benchlib.drivers import BaselineDriver, MmapDriver  # noqa: E402
from benchlib.streams import Clock  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlxflash.errors import UsageError  # noqa: E402
from mlxflash.format.bundle import Bundle, dtype_name  # noqa: E402
from mlxflash.runtime.dtypes import compute_dtype  # noqa: E402
from mlxflash.runtime.planner import resident_weights_bytes  # noqa: E402

MODES = ("flash", "flash-auto", "naive", "hybrid", "mmap", "resident", "mlx-lm")
TAG = "DECODE-RESULT "
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@dataclass
class DecodeResult:
    mode: str
    skipped: str = ""
    note: str = ""
    ttft_s: float = 0.0
    decode_ms: float = 0.0  # median ms per token after the first
    decode_ms_range: tuple[float, float] = (0.0, 0.0)  # over rounds (aggregate) or tokens (one round)
    bytes_read_per_token: float = 0.0  # bytes the FFN needed
    transferred_per_token: float = 0.0  # bytes the device moved for them
    reads_per_token: float = 0.0
    io_ms_per_token: float = 0.0
    peak_rss_bytes: int = 0
    dram_bytes: float = 0.0  # what the mode plans to hold (flash: its plan; baselines: weights + buffers)
    operating_point: str = ""
    tokens: list[int] = field(default_factory=list)
    rounds: int = 1


# ---- the child: one mode, one process -------------------------------------------------------------


def prompt_ids(tokenizer, text: Path, n: int) -> list[int]:
    ids = tokenizer.encode(text.read_text(encoding="utf-8", errors="replace")[: n * 16])
    if len(ids) < n:
        raise SystemExit(f"{text}: only {len(ids)} tokens, --prompt-tokens asks {n}")
    return ids[:n]


def time_stream(stream) -> tuple[float, list[float], list[int]]:
    """(seconds to the first token, seconds of each later token, the tokens) of a generation stream."""
    t0 = time.perf_counter()
    stamps, tokens = [], []
    for r in stream:
        stamps.append(time.perf_counter())
        tokens.append(int(r.token))
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], tokens


class DriverMLP(nn.Module):
    """One block's MLP run by a bench driver (hybrid, mmap): x (..., d) -> (..., d)."""

    def __init__(self, driver, layer: int, clock: Clock):
        super().__init__()
        self._driver, self._layer, self._clock = driver, layer, clock

    def __call__(self, x: mx.array) -> mx.array:
        return self._driver.layer(self._layer, x, self._clock)


def runtime_mode(mode: str, args, budget: Budget) -> DecodeResult:
    """The runtime's model in `mode` (hybrid/mmap: naive's model with each MLP swapped for the driver)."""
    import mlxflash

    flash = mode.startswith("flash")
    runtime_mode_ = "naive" if mode in ("hybrid", "mmap") else "flash" if flash else mode
    memory = int(budget.budget) if flash else None
    gap = {"gap": "auto"} if mode == "flash-auto" else {"gap": int(args.gap)} if flash and args.gap else {}
    model, tokenizer = mlxflash.load(args.bundle, mode=runtime_mode_, memory=memory, verify=False, **gap)
    runtime = model.flash
    r = DecodeResult(mode)
    clock = Clock()
    if mode in ("hybrid", "mmap"):
        bundle = runtime.bundle
        params = dict(tree_flatten(model.parameters()))
        if mode == "hybrid":
            keep = hybrid_keep(bundle, budget)
            driver = BaselineDriver(bundle, params, keep, args.threads)
            r.note = f"{keep[0]} of {bundle.spec.layers[0].neurons} neurons a layer resident"
        else:
            driver = MmapDriver(bundle, params)
        for i, block in enumerate(model.model.layers):
            block.mlp = DriverMLP(driver, i, clock)
        r.dram_bytes = resident_weights_bytes(bundle) + driver.dram_ffn
    else:
        r.dram_bytes = runtime.plan.planned_bytes if flash else runtime.resident_bytes
    if flash:
        p = runtime.plan
        r.operating_point = (
            f"{p.selector}, density {p.density:.2f}, window {runtime.options.window}, gap {runtime.options.gap}"
        )
    ids = prompt_ids(tokenizer, args.text, args.prompt_tokens)
    stream = mlxflash.stream_generate(model, tokenizer, ids, max_tokens=args.tokens + 1, temp=0.0)
    last = {}

    def keep_last(s):  # the last stats, and the driver's clock and the disk at the first token (decode starts)
        for resp in s:
            last["stats"] = resp.stats
            if "clock" not in last:
                last["clock"], last["disk"] = (clock.bytes, clock.io), isolation.disk_read_bytes()
            yield resp

    r.ttft_s, steps, r.tokens = time_stream(keep_last(stream))
    disk1 = isolation.disk_read_bytes()
    _per_token(r, steps)
    st = last["stats"]  # the runtime's per-token figures over the decode steps (TokenStats.as_dict)
    if mode in ("hybrid", "mmap"):  # the driver's clock after the first token: decode only
        n = max(1, len(steps))
        (bytes0, io0), disk0 = last["clock"], last["disk"]
        r.bytes_read_per_token = r.transferred_per_token = (clock.bytes - bytes0) / n
        if mode == "mmap" and disk0 is not None and disk1 is not None:  # what the kernel read
            r.transferred_per_token = (disk1 - disk0) / n
        r.io_ms_per_token = 1e3 * (clock.io - io0) / n
        r.note = "; ".join(x for x in (r.note, driver.io_note()) if x)
    elif flash:  # used: the new neurons' fields (reads through gaps and page padding are not)
        r.bytes_read_per_token = st["new_neurons_per_token"] * runtime.bundle.spec.record.field_bytes
        r.transferred_per_token = st["bytes_transferred_per_token"]
        r.reads_per_token = st["reads_per_token"]
        r.io_ms_per_token = st["io_ms_per_token"]
        hit, density = st.get("cache_hit_rate", 0), st.get("selected_density", 0)
        r.note = f"{runtime.reader.io_note}; cache hit rate {hit:.2f}, selected density {density:.2f}"
    else:  # naive: whole blocks, page padding included (it is read)
        r.bytes_read_per_token = st["bytes_read_per_token"]
        r.transferred_per_token = st["bytes_transferred_per_token"]
        r.reads_per_token = st["reads_per_token"]
        r.io_ms_per_token = st["io_ms_per_token"]
        r.note = "; ".join(x for x in (r.note, runtime.reader.io_note) if x)
    runtime.close()
    return r


def mlx_lm_mode(args) -> DecodeResult:
    """mlx-lm's model class, its QuantizedLinear layers holding the bundle's weights, fully resident."""
    from mlx_lm import stream_generate
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlxflash.arch.registry import model_classes
    from mlxflash.format.quant import quant_params

    bundle = Bundle.open(args.bundle, verify=False)
    config = bundle.config
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = mlx_lm_weights(bundle)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    qcfg, ffn_q = config.get("quantization"), bundle.spec.quantization
    quantized = {k.removesuffix(".scales") for k in weights if k.endswith(".scales")}

    def bits_of(path: str, module: nn.Module):  # as stored: the FFN's from its records, the rest from the config
        if path not in quantized or not hasattr(module, "to_quantized"):
            return False
        proj = path.rsplit(".", 1)[-1].removesuffix("_proj")
        q = ffn_q[proj] if ".mlp." in path and ffn_q else quant_params(qcfg, path)
        return {"group_size": q["group_size"], "bits": q["bits"]}

    if quantized:  # the modules the bundle stores quantized, at their own bits (mlx-lm's loader does the same)
        nn.quantize(model, class_predicate=bits_of)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    del weights
    eos = config.get("eos_token_id")
    tokenizer = load_tokenizer(bundle.path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    ids = prompt_ids(tokenizer, args.text, args.prompt_tokens)
    r = DecodeResult("mlx-lm", dram_bytes=float(sum(v.nbytes for _, v in tree_flatten(model.parameters()))))
    stream = stream_generate(model, tokenizer, ids, max_tokens=args.tokens + 1, prefill_step_size=512)
    r.ttft_s, steps, r.tokens = time_stream(stream)
    _per_token(r, steps)
    r.note = f"mlx-lm {_version()}, floats and group scales in {dtype_name(compute_dtype(bundle.spec.dtype))}"
    return r


def mlx_lm_weights(bundle: Bundle) -> dict[str, mx.array]:
    """The bundle as mlx-lm names its weights: the FFN records back in mlp.{gate,up,down}_proj (a down
    quantized per neuron is re-quantized along the neuron axis, as mlx-lm's down_proj holds it), floats
    and group scales in the runtime's compute dtype."""
    from mlxflash.format.convert import read_ffn_layer

    dtype = compute_dtype(bundle.spec.dtype)
    cast = lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a  # noqa: E731
    weights = {k: cast(v) for k, v in bundle.resident_weights().items() if ".mlp." not in k}
    for i in range(bundle.num_layers):
        mlp = f"model.layers.{i}.mlp."
        for proj, arrays in read_ffn_layer(bundle, i).items():
            if proj.endswith("_bias"):  # FFNs with biases (OPT-like): mlx-lm's proj biases
                weights[f"{mlp}{proj.split('_')[0]}_proj.bias"] = cast(arrays)
                continue
            for kind, a in zip(("weight", "scales", "biases"), arrays):
                weights[f"{mlp}{proj}.{kind}"] = cast(mx.contiguous(a))
        mx.eval([v for k, v in weights.items() if k.startswith(mlp)])
    return weights


def _version() -> str:
    import mlx_lm

    return getattr(mlx_lm, "__version__", "?")


def _per_token(r: DecodeResult, steps: list[float]) -> None:
    ms = [1e3 * s for s in steps] or [0.0]
    r.decode_ms = statistics.median(ms)
    r.decode_ms_range = (min(ms), max(ms))


def run_child(mode: str, args) -> DecodeResult:
    bundle = Bundle.open(args.bundle, verify=False)
    budget = resolve_budget(bundle, args.memory)
    try:
        r = mlx_lm_mode(args) if mode == "mlx-lm" else runtime_mode(mode, args, budget)
    except UsageError as e:
        return DecodeResult(mode, skipped=str(e))
    r.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return r


# ---- the parent: rounds, aggregate, table ---------------------------------------------------------


def child_command(mode: str, args) -> list[str]:
    cmd = [isolation.python(), __file__, str(args.bundle), "--memory", args.memory, "--child", mode]
    cmd += ["--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens), "--text", str(args.text)]
    return cmd + ["--threads", str(args.threads)] + (["--gap", args.gap] if args.gap else [])


def skip_reason(mode: str, budget: Budget) -> str | None:
    if mode in ("resident", "mlx-lm") and budget.model_bytes > budget.budget:
        return f"does not fit the budget ({budget.model_bytes / 1e9:.2f} GB > {budget.budget / 1e9:.2f} GB); shown for reference"
    return None


def aggregate(rs: list[DecodeResult]) -> DecodeResult:
    ok = [r for r in rs if not r.skipped]
    if not ok:
        return rs[0]
    med = lambda key: statistics.median(getattr(r, key) for r in ok)  # noqa: E731
    out = DecodeResult(ok[0].mode, note=ok[0].note, operating_point=ok[0].operating_point, tokens=ok[0].tokens)
    for key in (
        "ttft_s",
        "decode_ms",
        "bytes_read_per_token",
        "transferred_per_token",
        "reads_per_token",
        "io_ms_per_token",
        "dram_bytes",
    ):
        setattr(out, key, med(key))
    out.decode_ms_range = (min(r.decode_ms for r in ok), max(r.decode_ms for r in ok))
    out.peak_rss_bytes = max(r.peak_rss_bytes for r in ok)
    out.rounds = len(ok)
    return out


def table(results: list[DecodeResult]) -> str:
    by = {r.mode: r for r in results if not r.skipped}
    base = by.get("resident") or by.get("mlx-lm")
    rows = [
        "| mode | TTFT (s) | decode ms/token (rounds' min-max) | x resident | x naive | MB used/token | MB moved/token | moved/used | reads/token | I/O ms/token | peak RSS (MB) | planned DRAM (MB) | greedy tokens = resident's |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.skipped:
            rows.append(f"| {r.mode} | skipped: {r.skipped} |" + " |" * 11)
            continue
        vs_res = f"{r.decode_ms / base.decode_ms:.2f}" if base else "-"
        vs_naive = f"{by['naive'].decode_ms / r.decode_ms:.2f}x faster" if "naive" in by else "-"
        ratio = f"{r.transferred_per_token / r.bytes_read_per_token:.2f}" if r.bytes_read_per_token else "-"
        agree = "-"
        if "resident" in by:
            ref = by["resident"].tokens
            agree = f"{sum(a == b for a, b in zip(r.tokens, ref))}/{len(ref)}"
        rows.append(
            f"| {r.mode} | {r.ttft_s:.2f} | {r.decode_ms:.0f} ({r.decode_ms_range[0]:.0f}-{r.decode_ms_range[1]:.0f}) "
            f"| {vs_res} | {vs_naive} | {r.bytes_read_per_token / 1e6:.2f} | {r.transferred_per_token / 1e6:.2f} | {ratio} "
            f"| {r.reads_per_token:.0f} | {r.io_ms_per_token:.0f} | {r.peak_rss_bytes / 1e6:.0f} | {r.dram_bytes / 1e6:.0f} | {agree} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--decode", action="store_true", help="(how tools/bench.py sends a run here)")
    p.add_argument("--memory", default="65%")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=8, help="decode tokens after the first")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="the prompt's text (raw, no chat template)")
    p.add_argument("--gap", help="flash: records read through between needed ones (flash-auto: the cost model's)")
    p.add_argument("--threads", type=int, default=8, help="reads in flight for hybrid (the runtime plans its own)")
    p.add_argument("--mmap-overhead", type=float, default=256 * 2**20, help="bytes added to the mmap cap")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.tokens < 1 or args.prompt_tokens < 1:
        p.error("--rounds, --tokens and --prompt-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(TAG + json.dumps(asdict(run_child(args.child, args))), flush=True)
        return 0
    modes = isolation.parse_modes(args.modes, MODES)
    if not args.text.is_file():
        raise SystemExit(f"--text {args.text}: no such file")
    bundle = Bundle.open(args.bundle, verify=False)
    try:
        budget = resolve_budget(bundle, args.memory)
    except UsageError as e:
        raise SystemExit(f"bench: {e}") from e
    per_mode: dict[str, list[DecodeResult]] = {m: [] for m in modes}
    for round_ in range(args.rounds):
        for mode in modes:
            print(f"round {round_ + 1}/{args.rounds}: {mode}", file=sys.stderr, flush=True)
            cap = int(budget.budget + args.mmap_overhead) if mode == "mmap" else None
            r = isolation.run_child(child_command(mode, args), mode, bundle.ffn_path, cap, DecodeResult, TAG)
            if not r.skipped and (why := skip_reason(mode, budget)):
                r.note = "; ".join(x for x in (r.note, why) if x)
            per_mode[mode].append(r)
            print(f"  {r.skipped or f'{r.decode_ms:.0f} ms/token, TTFT {r.ttft_s:.1f} s'}", file=sys.stderr, flush=True)
    results = [aggregate(rs) for rs in per_mode.values()]
    flash = next((r for r in results if r.mode.startswith("flash") and not r.skipped), None)
    print(
        f"# {bundle.path.name}: {args.memory} = {budget.budget / 1e6:.0f} MB of {budget.model_bytes / 1e6:.0f} MB; "
        f"prompt {args.prompt_tokens} tokens of {args.text.name}, then {args.tokens} greedy tokens; "
        f"{args.rounds} rounds, modes interleaved; medians" + (f"; flash at {flash.operating_point}" if flash else "")
    )
    print(table(results))
    for r in results:
        if r.note:
            print(f"- {r.mode}: {r.note}")
    if args.json:
        out = {"bundle": str(bundle.path), "budget": asdict(budget), "args": {k: str(v) for k, v in vars(args).items()}}
        out["modes"] = [asdict(r) for r in results]
        out["rounds"] = {m: [asdict(r) for r in rs] for m, rs in per_mode.items()}
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from mlxflash.runtime.cpu import reexec_with_openblas

    reexec_with_openblas()
    sys.exit(main())
