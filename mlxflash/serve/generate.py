"""Text generation: mlx-lm's `stream_generate` with the flash runtime's per-token statistics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import stream_generate as mlx_lm_stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..errors import UsageError
from ..runtime.kv import prefill_step


@dataclass
class Response:
    """One step of generation, shaped like mlx-lm's GenerationResponse plus `stats`."""

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    generation_tokens: int
    finish_reason: str | None
    stats: dict


def encode_prompt(tokenizer: TokenizerWrapper, prompt: str | list[int]) -> list[int]:
    if not isinstance(prompt, str):
        return list(prompt)
    bos = tokenizer.bos_token
    add_special = bos is None or not prompt.startswith(bos)
    return tokenizer.encode(prompt, add_special_tokens=add_special)


def context_limit(model: nn.Module) -> tuple[int | None, str]:
    """(tokens a conversation may hold, what sets that limit): the model's context, or the KV cache's
    size where `--max-kv-size` bounds it below that."""
    runtime = model.flash
    context, kv = runtime.context_length, getattr(runtime, "max_kv_size", None)
    if kv and (context is None or kv < context):
        return kv, f"the KV cache's limit (--max-kv-size {kv})"
    return context, "the model's context"


def check_prompt(
    context: int | None,
    tokens: list[int],
    max_tokens: int | None,
    default: int = 256,
    limit: str = "the model's context",
) -> int:
    """The one prompt-against-context check (generate, chat, the session, the server): the max_tokens to run
    with. An asked `max_tokens` must fit as asked; none asked gets `default` cut to the room left. Raises
    UsageError naming the limit when the prompt leaves no room or the asked tokens do not fit."""
    if not tokens:
        raise UsageError("the prompt is empty")
    room = context - len(tokens) if context else None
    if max_tokens is None:
        max_tokens = default if room is None else min(default, room)
    if room is not None and (room < 1 or max_tokens > room):
        raise UsageError(
            f"the prompt is {len(tokens)} tokens and max_tokens is {max_tokens}, but {limit} is {context} tokens"
        )
    return max_tokens


def stream_generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | list[int],
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    **kwargs,
) -> Iterator[Response]:
    """Yield a Response per generated token; `stats` covers the decode steps so far."""
    runtime = model.flash
    tokens = encode_prompt(tokenizer, prompt)
    context, limit = context_limit(model)
    check_prompt(context, tokens, max_tokens, limit=limit)
    if seed is not None:
        mx.random.seed(seed)
    kwargs.setdefault("sampler", make_sampler(temp, top_p, top_k=top_k))
    # mlx-lm prefills 2048 tokens a step; its attention scores alone then outweigh a small budget's KV cache
    cache = kwargs.get("prompt_cache")
    context = (cache[0].offset if cache else 0) + len(tokens)
    kwargs.setdefault("prefill_step_size", prefill_step(runtime.bundle.config, context, runtime.kv.buffer_bytes))
    stats = runtime.token_stats()
    start = time.perf_counter()
    base = runtime.stats.snapshot()
    runtime.begin_prompt()
    for r in mlx_lm_stream_generate(model, tokenizer, tokens, max_tokens=max_tokens, **kwargs):
        now, snap = time.perf_counter(), runtime.stats.snapshot()
        if r.generation_tokens <= 1:  # the prompt and the first token: prefill
            stats.prompt_tokens, stats.prefill_s = len(tokens), now - start
            start, base = now, snap
        else:
            stats.tokens, stats.decode_s = r.generation_tokens - 1, now - start
            stats.totals = {k: snap[k] - base[k] for k in snap}
        stats.extra = runtime.live()
        yield Response(r.text, r.token, r.logprobs, len(tokens), r.generation_tokens, r.finish_reason, stats.as_dict())


def generate(
    model: nn.Module, tokenizer: TokenizerWrapper, prompt: str | list[int], verbose: bool = False, **kwargs
) -> str:
    """The whole completion as a string (kwargs as for `stream_generate`)."""
    text = ""
    for r in stream_generate(model, tokenizer, prompt, **kwargs):
        text += r.text
        if verbose:
            print(r.text, end="", flush=True)
    if verbose:
        print()
    return text
