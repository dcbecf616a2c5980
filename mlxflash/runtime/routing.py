"""Routing traces of mixture-of-experts models: per token and MoE layer, the ids of the routed experts.

A routing trace is a `traces.Trace` whose width is the number of experts and whose selections are the
router's top-k: the same storage, loader and window statistics as neuron traces. `tools/record_routing.py`
records one from a real MoE bundle on a text; `generate_routing` makes a synthetic one.

The synthetic generator reuses `traces.generate_layer`: each expert routed at token t-1 is routed again at
token t with probability `persistence`; the rest of the top-k is drawn by popularity (a power law of
exponent `alpha` over the experts, ranks assigned at random per layer). Its parameters are a
`RoutingProfile` fitted to published routing statistics of a model family (`PROFILES`, chosen from the
bundle's model_type by `profile_for`):

- qwen3_moe: persistence 0, alpha 1.5, fitted (`fit_profile`: persistence 0..0.3 x alpha 1.0..2.0,
  worst error 4%) to the decode traces of Qwen3-30B-A3B published in kekzl/imp PR #1359 (three prompts
  x 512 tokens): 45% of the routed experts had been routed at the previous token, 80% within the previous
  eight; the fit gives 0.46 and 0.77. Checked against figures it was not fitted to: LRU with 24 of 128
  slots hits 0.73 on the generator, against 0.73 measured on Qwen3-30B-A3B decode (JustVugg/colibri PR
  #698); with 40% of the experts 0.87, against 0.90-0.95 (imp #1359). The reuse here comes from a skewed
  popularity that is fixed for the whole trace: within one conversation that is what the traces show,
  but it flatters LFU, which real traces across prompts do not favour (llama.cpp PR #27861 found no
  static skew worth pinning). Judge policies on recorded traces.
- mixtral (the fallback for other families): persistence 0.16, alpha 0, from the Mixtral paper's
  routing analysis (Jiang et al. 2024, arXiv:2401.04088, Sec. 5, Table 5). At layer 15, consecutive
  tokens share at least one of their two experts (of 8) about 62% of the time, against 46% for
  independent routing. With independent draws otherwise, P(share >= 1) = 1 - (1 - p)^2 (1 - 0.464),
  so 0.62 gives p = 0.16. alpha 0 is equal popularity, the worst case for a cache.

A model's own routing beats any profile: record a trace with tools/record_routing.py and pass it to the
bench (--trace) or the planner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .experts import replay
from .traces import Trace, TraceParams, generate_layer, window_stats

MIXTRAL_SHARE_ANY = 0.62  # Jiang et al. 2024, Table 5, layer 15: consecutive tokens share >= 1 expert
MOE_PERSISTENCE = 0.16  # solves 1 - (1 - p)^2 (1 - 0.464) = 0.62 (see the module docstring)
MOE_ALPHA = 0.0


@dataclass(frozen=True)
class RoutingProfile:
    """The routing generator's parameters for a model family, and where they come from."""

    name: str
    persistence: float  # P(an expert of token t-1 is routed again at t), beyond chance
    alpha: float  # popularity power law over a layer's experts (0: all equally popular)
    source: str


QWEN3_TARGETS = {"reuse_prev": 0.45, "reuse_within8": 0.80}  # kekzl/imp PR #1359, Qwen3-30B-A3B decode
PROFILES = {
    "qwen3_moe": RoutingProfile(
        "qwen3_moe", 0.0, 1.5, "fitted to Qwen3-30B-A3B decode traces (kekzl/imp #1359: 45% next token, 80% within 8)"
    ),
    "mixtral": RoutingProfile(
        "mixtral", MOE_PERSISTENCE, MOE_ALPHA, "Mixtral paper, Table 5 (62% of consecutive tokens share an expert)"
    ),
}


def profile_for(model_type: str | None) -> RoutingProfile:
    """The profile of a bundle's family; families without published statistics get Mixtral's (the
    lowest reuse of the two, so the expected hit rate errs low)."""
    return PROFILES.get(model_type or "", PROFILES["mixtral"])


def moe_params(experts: int, top_k: int, persistence: float = MOE_PERSISTENCE, alpha: float = MOE_ALPHA):
    return TraceParams(density=top_k / experts, persistence=persistence, alpha=alpha)


def generate_routing(
    experts: int,
    top_k: int,
    layers: int,
    tokens: int,
    profile: RoutingProfile = PROFILES["mixtral"],
    seed: int = 0,
    warmup: int = 16,
) -> Trace:
    """A synthetic routing trace: `layers` independent layers of `top_k` experts of `experts` per token."""
    params = moe_params(experts, top_k, profile.persistence, profile.alpha)
    per_layer = [
        generate_layer(experts, tokens + warmup, params, np.random.default_rng([seed, layer]))[warmup:]
        for layer in range(layers)
    ]
    selections = [[per_layer[layer][t] for layer in range(layers)] for t in range(tokens)]
    meta = {"source": f"routing generator ({profile.name} profile)", "params": params.__dict__, "top_k": top_k}
    return Trace.from_selections(selections, [experts] * layers, seed=seed, **meta)


def reuse_within(trace: Trace, window: int) -> float:
    """Share of the routed experts (from token `window` on) that were routed in one of the previous
    `window` tokens of the same layer: the statistic traces of real models report."""
    reused = total = 0
    for layer in range(trace.num_layers):
        last = np.full(trace.widths[layer], -(10**9))
        for t in range(trace.num_tokens):
            ids = trace.token(layer, t)
            if t >= window:
                reused += int((t - last[ids] <= window).sum())
                total += len(ids)
            last[ids] = t
    return reused / max(1, total)


def fit_profile(
    name: str,
    experts: int,
    top_k: int,
    targets: dict[str, float] = QWEN3_TARGETS,
    persistence: Sequence[float] = tuple(np.round(np.arange(0.0, 0.31, 0.05), 2)),
    alpha: Sequence[float] = tuple(np.round(np.arange(1.0, 2.01, 0.1), 2)),
    layers: int = 6,
    tokens: int = 512,
) -> tuple[RoutingProfile, float]:
    """The grid point whose reuse at the next token and within 8 tokens is closest to `targets`
    (worst relative error, returned beside it)."""
    best, best_err = None, float("inf")
    for p in persistence:
        for a in alpha:
            profile = RoutingProfile(name, float(p), float(a), "fit")
            trace = generate_routing(experts, top_k, layers, tokens, profile)
            got = {"reuse_prev": reuse_within(trace, 1), "reuse_within8": reuse_within(trace, 8)}
            err = max(abs(got[k] / v - 1) for k, v in targets.items())
            if err < best_err:
                best, best_err = profile, err
    return best, best_err


def share_any(experts: int, top_k: int, persistence: float) -> float:
    """P(two consecutive tokens share >= 1 expert) under the generator with alpha 0 (approximation that
    the fresh draws are independent of the previous token's set)."""
    independent = 1.0
    for i in range(top_k):  # P(a random top_k set misses a given top_k set)
        independent *= (experts - top_k - i) / (experts - i)
    return 1 - (1 - persistence) ** top_k * independent


def reuse_stats(trace: Trace, slots: Sequence[int] = (), policies: Sequence[str] = ("lru", "lfu")) -> dict:
    """What decides an expert cache: per token, the share of its experts routed at the previous token
    (`reuse_prev`) and within the previous 8 (`reuse_within8`), P(sharing at least one) (`share_any`), the union over windows of 1..8 tokens (as a
    share of the experts) and, per cache size in `slots`, each policy's hit rate (averaged over layers)."""
    prev, any_shared = [], []
    for layer in range(trace.num_layers):
        for t in range(1, trace.num_tokens):
            a, b = trace.token(layer, t - 1), trace.token(layer, t)
            common = np.intersect1d(a, b, assume_unique=True).size
            prev.append(common / max(1, len(b)))
            any_shared.append(common > 0)
    w = window_stats(trace, max_window=min(8, max(1, trace.num_tokens - 1)))
    hits = {
        policy: {
            int(s): float(
                np.mean(
                    [
                        replay((trace.token(layer, t) for t in range(trace.num_tokens)), trace.widths[layer], s, policy)
                        for layer in range(trace.num_layers)
                    ]
                )
            )
            for s in slots
        }
        for policy in policies
    }
    return {
        "tokens": trace.num_tokens,
        "layers": trace.num_layers,
        "experts": trace.widths[0],
        "routed_share": w["density"],
        "reuse_prev": float(np.mean(prev)) if prev else 0.0,
        "reuse_within8": reuse_within(trace, 8) if trace.num_tokens > 8 else 0.0,
        "share_any": float(np.mean(any_shared)) if any_shared else 0.0,
        "window_union": w["union_mean"],
        "hit_rate": hits,
    }
