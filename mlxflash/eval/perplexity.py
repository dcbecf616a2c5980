"""Perplexity of a token stream over windows of `context` tokens starting every `stride` tokens; each
token is scored once, in the first window that holds it and not as that window's first token (stride ==
context: non-overlapping windows, each scoring context - 1 tokens)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..errors import UsageError
from .scoring import prefill, reset_selections
from .stats import mean_se, progress_bar


def window_spans(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored) of each window over n tokens. No token is scored twice; a token is left
    out only where it starts a window without context (stride == context: each window's first)."""
    if context < 2 or not 1 <= stride <= context:
        raise UsageError(f"--context {context} --stride {stride}: need context >= 2 and 1 <= stride <= context")
    spans, scored_to, start = [], 1, 0
    while scored_to < n:
        end, first = min(start + context, n), max(scored_to, start + 1)
        if first >= end:  # a last window of one token scores nothing (its only token has no context)
            break
        spans.append((start, end, first))
        scored_to, start = end, start + stride
    return spans


def token_logprobs(model: nn.Module, tokens: list[int], first: int) -> np.ndarray:
    """log p(tokens[t] | tokens[:t]) for t >= first (first >= 1), one forward with a prefilled cache."""
    reset_selections(model)
    cache = make_prompt_cache(model)
    if first > 1:
        prefill(model, tokens[: first - 1], cache)
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
    with progress_bar(sum(end - first for _, end, first in spans), "tok", progress) as bar:
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
