"""Routing traces of mixture-of-experts models: per token and MoE layer, the ids of the routed experts.

A routing trace is a `traces.Trace` whose width is the number of experts and whose selections are the
router's top-k: the same storage, loader and window statistics as neuron traces. `tools/record_routing.py`
records one from a real MoE bundle on a text; `generate_routing` makes a synthetic one.

The synthetic generator reuses `traces.generate_layer`: each expert routed at token t-1 is routed again at
token t with probability `persistence`; the rest of the top-k is drawn by popularity (a power law of
exponent `alpha` over the experts, ranks assigned at random per layer). Parameters (`MOE_PARAMS`):

- persistence 0.16, from the Mixtral paper's routing analysis (Jiang et al. 2024, "Mixtral of
  Experts", arXiv:2401.04088, Sec. 5, Table 5): at layer 15 consecutive tokens share at least one of
  their two experts (of 8) about 62% of the time, against 46% for independent routing. With
  independent draws otherwise, P(share >= 1) = 1 - (1 - p)^2 (1 - 0.464), so 0.62 gives p = 0.16.
  The same per-expert persistence is assumed for other models (Qwen3-30B-A3B: 8 of 128); no published
  figure for Qwen3 is used.
- alpha 0 (equal popularity): training with a load-balancing loss spreads tokens evenly over experts
  (the same paper's Fig. 7 shows no domain-specific experts). This is the conservative case for a
  cache: real texts skew popularity, which only raises hit rates. Record a trace of your model with
  tools/record_routing.py to measure it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .experts import replay
from .traces import Trace, TraceParams, generate_layer, window_stats

MIXTRAL_SHARE_ANY = 0.62  # Jiang et al. 2024, Table 5, layer 15: consecutive tokens share >= 1 expert
MOE_PERSISTENCE = 0.16  # solves 1 - (1 - p)^2 (1 - 0.464) = 0.62 (see the module docstring)
MOE_ALPHA = 0.0


def moe_params(experts: int, top_k: int, persistence: float = MOE_PERSISTENCE, alpha: float = MOE_ALPHA):
    return TraceParams(density=top_k / experts, persistence=persistence, alpha=alpha)


def generate_routing(
    experts: int,
    top_k: int,
    layers: int,
    tokens: int,
    persistence: float = MOE_PERSISTENCE,
    alpha: float = MOE_ALPHA,
    seed: int = 0,
    warmup: int = 16,
) -> Trace:
    """A synthetic routing trace: `layers` independent layers of `top_k` experts of `experts` per token."""
    params = moe_params(experts, top_k, persistence, alpha)
    per_layer = [
        generate_layer(experts, tokens + warmup, params, np.random.default_rng([seed, layer]))[warmup:]
        for layer in range(layers)
    ]
    selections = [[per_layer[layer][t] for layer in range(layers)] for t in range(tokens)]
    meta = {"source": "routing generator", "params": params.__dict__, "top_k": top_k, "seed": seed}
    return Trace.from_selections(selections, [experts] * layers, **meta)


def share_any(experts: int, top_k: int, persistence: float) -> float:
    """P(two consecutive tokens share >= 1 expert) under the generator with alpha 0 (approximation that
    the fresh draws are independent of the previous token's set)."""
    independent = 1.0
    for i in range(top_k):  # P(a random top_k set misses a given top_k set)
        independent *= (experts - top_k - i) / (experts - i)
    return 1 - (1 - persistence) ** top_k * independent


def reuse_stats(trace: Trace, slots: Sequence[int] = (), policies: Sequence[str] = ("lru", "lfu")) -> dict:
    """What decides an expert cache: per token, the share of its experts routed at the previous token
    (`reuse_prev`), P(sharing at least one) (`share_any`), the union over windows of 1..8 tokens (as a
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
        "share_any": float(np.mean(any_shared)) if any_shared else 0.0,
        "window_union": w["union_mean"],
        "hit_rate": hits,
    }
