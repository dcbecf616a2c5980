"""A loaded model with a kept KV cache: the next prompt reuses the longest prefix it shares with what
the cache holds (a chat's history is not recomputed). Also the context manager that releases the model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..errors import UsageError
from ..loader import load
from .generate import Response, encode_prompt, stream_generate


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Session:
    """`model`, `tokenizer` and one KV cache kept across calls to `stream`; `close()` releases them."""

    def __init__(self, model: nn.Module, tokenizer: TokenizerWrapper):
        self.model, self.tokenizer = model, tokenizer
        self.cache: list | None = None
        self.cache_tokens: list[int] = []  # the tokens whose keys and values the cache holds
        self.reused_tokens = 0  # prompt tokens the last call took from the cache

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the kept KV cache."""
        self.cache, self.cache_tokens, self.reused_tokens = None, [], 0

    def close(self) -> None:
        """Release the bundle's file handles, the KV cache and MLX's buffer cache."""
        self.reset()
        if self.model is not None:
            self.model.flash.close()
        self.model = None
        mx.clear_cache()

    def _prepare(self, tokens: list[int]) -> list[int]:
        """Trim the cache to the prefix it shares with `tokens`; return the tokens still to compute."""
        if self.cache is None:
            self.cache, self.cache_tokens = make_prompt_cache(self.model), []
        keep = min(common_prefix(self.cache_tokens, tokens), len(tokens) - 1)
        drop = len(self.cache_tokens) - keep
        if drop and not can_trim_prompt_cache(self.cache):
            self.cache, self.cache_tokens, keep = make_prompt_cache(self.model), [], 0
        elif drop:
            trim_prompt_cache(self.cache, drop)
        self.cache_tokens, self.reused_tokens = tokens[:keep], keep
        return tokens[keep:]

    def _settle(self, seen: list[int]) -> None:
        """After generation: the cache holds a prefix of prompt + generated tokens; record which."""
        offset = self.cache[0].offset if self.cache else 0
        if offset > len(seen):
            trim_prompt_cache(self.cache, offset - len(seen))
            offset = len(seen)
        self.cache_tokens = seen[:offset]

    def chat(self, messages: list[dict], max_tokens: int = 256, **kwargs) -> Iterator[Response]:
        """Stream the reply to a conversation (OpenAI-style messages) through the chat template."""
        tokens = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.stream(tokens, max_tokens, **kwargs)

    def stream(self, prompt: str | list[int], max_tokens: int = 256, **kwargs) -> Iterator[Response]:
        """`mlxflash.stream_generate` on `prompt`, computing only what the cache does not hold."""
        tokens = encode_prompt(self.tokenizer, prompt)
        if not tokens:
            raise UsageError("the prompt is empty")
        context = self.model.flash.context_length
        if context and len(tokens) + max_tokens > context:
            raise UsageError(
                f"the prompt is {len(tokens)} tokens and {max_tokens} more were asked for, "
                f"but the model's context is {context} tokens"
            )
        rest = self._prepare(list(tokens))
        generated: list[int] = []
        try:
            for r in stream_generate(
                self.model, self.tokenizer, rest, max_tokens=max_tokens, prompt_cache=self.cache, **kwargs
            ):
                generated.append(r.token)
                yield r
        except BaseException as e:
            if isinstance(e, GeneratorExit):
                self._settle(list(tokens) + generated)
            else:
                self.reset()
            raise
        else:
            self._settle(list(tokens) + generated)


def session(path: str | Path | None = None, **load_kw) -> Session:
    """`mlxflash.load(path, **load_kw)` as a Session; `with mlxflash.session() as s:` closes it."""
    return Session(*load(path, **load_kw))
