"""`mlxflash plan MODEL`: what each gigabyte buys, from the bundle's quality table, before anything runs.

Prints the planner's curve (runtime/planner.py `quality_curve`): per budget the operating point it would
run, the expected perplexity increase measured at calibration and the bytes read from flash per token;
`--plot FILE.png` draws it (matplotlib: `pip install -e ".[bench]"`), `--json FILE` writes it.
"""

from __future__ import annotations

import json
import sys

from .errors import UsageError
from .format.bundle import Bundle
from .runtime.planner import CurvePoint, quality_curve
from .runtime.reader import FlashReader


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="the budget -> expected loss -> bytes per token curve of a bundle")
    p.add_argument("model", help="a bundle directory or a fetchable name")
    p.add_argument("--plot", metavar="PNG", help="also draw the curve into this PNG file")
    p.add_argument("--json", metavar="FILE", help="write the curve as JSON")
    p.set_defaults(run=run_plan)


def run_plan(args) -> None:
    from .loader import resolve_model

    bundle = Bundle.open(resolve_model(args.model), verify=False)
    reader = FlashReader(bundle.ffn_path)
    try:
        curve = quality_curve(bundle, reader)
    finally:
        reader.close()
    print(format_curve(bundle, curve))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([curve_json(c) for c in curve], f, indent=2)
    if args.plot:
        plot_curve(bundle, curve, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def format_curve(bundle: Bundle, curve: list[CurvePoint]) -> str:
    table = bundle.spec.quality
    on = table.measured_on
    head = (
        f"{bundle.path}: the planner's choice per budget, from the quality table measured on {on.get('tokens')} "
        f"held-out tokens of {on.get('text') or 'calibration text'} (context {on.get('context')}; dense NLL "
        f"{table.dense_nll:.3f})"
    )
    rows = [
        "| budget (MB) | share of model | operating point | expected perplexity | NLL increase (% of dense NLL) "
        "| MB read per token |"
    ]
    rows.append("|---|---|---|---|---|---|")
    for c in curve:
        what = c.point.describe() if c.point else "resident (the whole model)"
        loss = f"{100 * c.perplexity_increase:+.1f}%" + (f" ± {_se_pct(c)}" if c.point else "")
        relative = 100 * (c.point.nll_increase if c.point else 0.0) / table.dense_nll
        rows.append(
            f"| {c.budget_bytes / 1e6:.0f} | {100 * c.budget_bytes / c.model_bytes:.0f}% | {what} | {loss} | "
            f"{relative:+.1f}% | {c.bytes_per_token / 1e6:.1f} |"
        )
    return "\n".join([head, *rows])


def _se_pct(c: CurvePoint) -> str:
    return f"{100 * c.point.nll_increase_se * (1 + c.point.perplexity_increase):.1f}"


def curve_json(c: CurvePoint) -> dict:
    point = c.point
    return {
        "budget_bytes": c.budget_bytes,
        "share_of_model": c.budget_bytes / c.model_bytes,
        "mode": "flash" if point else "resident",
        "selector": point.selector if point else None,
        "gate_bits": point.gate_bits if point else None,
        "density": point.density if point else 1.0,
        "window": point.window if point else None,
        "expected_nll_increase": point.nll_increase if point else 0.0,
        "expected_nll_increase_se": point.nll_increase_se if point else 0.0,
        "expected_perplexity_increase": c.perplexity_increase,
        "bytes_per_token": c.bytes_per_token,
    }


def plot_curve(bundle: Bundle, curve: list[CurvePoint], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError('--plot needs matplotlib: pip install -e ".[bench]"') from e
    shares = [100 * c.budget_bytes / c.model_bytes for c in curve]
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_ax.plot(shares, [100 * c.perplexity_increase for c in curve], "o-", color="tab:red")
    loss_ax.set_xlabel("DRAM budget (% of the model)")
    loss_ax.set_ylabel("expected perplexity increase (%)", color="tab:red")
    loss_ax.set_yscale("symlog", linthresh=1)
    io_ax = loss_ax.twinx()
    io_ax.plot(shares, [c.bytes_per_token / 1e6 for c in curve], "s--", color="tab:blue")
    io_ax.set_ylabel("MB read per token", color="tab:blue")
    loss_ax.set_title(f"{bundle.path.name}: what each budget buys")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
