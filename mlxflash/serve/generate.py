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


def check_prompt(context: int | None, tokens: list[int], max_tokens: int) -> None:
    if not tokens:
        raise UsageError("the prompt is empty")
    if context and len(tokens) + max_tokens > context:
        raise UsageError(
            f"the prompt is {len(tokens)} tokens and {max_tokens} more were asked for, "
            f"but the model's context is {context} tokens"
        )


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
    check_prompt(runtime.context_length, tokens, max_tokens)
    if seed is not None:
        mx.random.seed(seed)
    kwargs.setdefault("sampler", make_sampler(temp, top_p, top_k=top_k))
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
