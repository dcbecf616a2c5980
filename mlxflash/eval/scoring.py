"""Log-likelihood of continuations given contexts: the shared prefix run once into a KV cache, the
rest as one padded batch."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache


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
    """Whether rows of a batch may share one forward: always, except in flash mode without per-position
    selections (its prompt selections would come from row 0)."""
    runtime = getattr(model, "flash", None)
    if getattr(runtime, "mode", "resident") != "flash":
        return True
    return bool(getattr(runtime.options, "masked_prompts", False))


def reset_selections(model: nn.Module) -> None:
    """A new sequence: flash mode forgets the neurons the last one left cached (as a new KV cache does)."""
    runtime = getattr(model, "flash", None)
    if getattr(runtime, "mode", None) == "flash":
        runtime.reset()


def prefill(model: nn.Module, tokens: list[int], cache: list) -> None:
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
    if batch is None:
        batch = batchable(model)
    flash = getattr(getattr(model, "flash", None), "mode", None) == "flash"
    if flash and not batch and len(pairs) > 1:  # each sequence from a fresh cache: rows would leave neurons behind
        return [score_continuations(model, [pair], batch=False)[0] for pair in pairs]
    seqs = [ctx + cont for ctx, cont in pairs]
    reset_selections(model)
    cache = make_prompt_cache(model)
    shared = _common_prefix(seqs)
    prefix = min(shared, *(len(ctx) - 1 for ctx, _ in pairs))
    if not all(isinstance(c, KVCache) for c in cache):
        prefix = 0
    if prefix:
        prefill(model, seqs[0][:prefix], cache)
    rows = [s[prefix:] for s in seqs]  # inputs rows[i][:-1] predict rows[i][1:]
    firsts = [len(ctx) - 1 - prefix for ctx, _ in pairs]
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
