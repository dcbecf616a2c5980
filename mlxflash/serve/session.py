"""A loaded model with its conversations' KV caches kept: mlx-lm's LRU prompt cache holds the last
conversations (several clients alternating keep their prefixes), bounded in bytes by the KV reservation
`--max-kv-size` makes in the memory budget; the next prompt starts from the longest cached prefix it
shares and only computes the rest. Also the context manager that releases the model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..loader import load
from ..runtime.kv import make_kv_cache
from .generate import Response, check_prompt, context_limit, encode_prompt, stream_generate

PROMPT_CACHE_ENTRIES = 8  # conversations kept (fewer when their bytes would pass the KV reservation)


class Session:
    """`model`, `tokenizer` and the conversations' KV caches kept across calls to `stream`; `close()`
    releases them. `cache`/`cache_tokens` are the last conversation's; `reused_tokens` what its prompt
    took from a kept cache."""

    def __init__(self, model: nn.Module, tokenizer: TokenizerWrapper, entries: int = PROMPT_CACHE_ENTRIES):
        self.model, self.tokenizer, self.entries = model, tokenizer, entries
        self.kv = model.flash.kv
        self.reset()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Forget every kept KV cache."""
        self.cache: list | None = None
        self.cache_tokens: list[int] = []  # the tokens whose keys and values `cache` holds
        self.reused_tokens = 0  # prompt tokens the last call took from a kept cache
        self.prompt_cache = LRUPromptCache(self.entries, self.kv.reserved_bytes or 1 << 62)

    @property
    def kept_bytes(self) -> int:
        return self.prompt_cache.nbytes

    def close(self) -> None:
        """Release the bundle's file handles, the KV caches and MLX's buffer cache."""
        self.reset()
        if self.model is not None:
            self.model.flash.close()
        self.model = None
        mx.clear_cache()

    def _prepare(self, tokens: list[int], max_tokens: int) -> list[int]:
        """The working cache: the kept one with the longest prefix of `tokens` (a copy), else a fresh one;
        returns the tokens still to compute. Then the kept caches shrink to leave this request's room (after
        the copy: evicting first would drop the very conversation that continues once it passes half the room)."""
        cache, rest = self.prompt_cache.fetch_nearest_cache(self.model_key, tokens)
        if self.kv.reserved_bytes:
            self.prompt_cache.trim_to(n_bytes=self.kv.reserved_bytes - self.kv.bytes_for(len(tokens) + max_tokens))
        if cache is not None and not rest:  # an exact hit: recompute the last token for its logits
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = tokens[-1:]
            else:
                cache = None
        if cache is None:
            cache, rest = make_kv_cache(self.model, self.kv), tokens
        self.cache, self.cache_tokens = cache, tokens[: len(tokens) - len(rest)]
        self.reused_tokens = len(self.cache_tokens)
        return rest

    @property
    def model_key(self) -> str:
        return str(self.model.flash.bundle.path)

    def _settle(self, seen: list[int]) -> None:
        """After generation: the cache holds a prefix of prompt + generated tokens; record which, and keep it."""
        offset = self.cache[0].offset if self.cache else 0
        if offset > len(seen):
            trim_prompt_cache(self.cache, offset - len(seen))
            offset = len(seen)
        self.cache_tokens = seen[:offset]
        if offset:
            self.prompt_cache.insert_cache(self.model_key, list(self.cache_tokens), self.cache)

    def chat(self, messages: list[dict], max_tokens: int = 256, **kwargs) -> Iterator[Response]:
        """Stream the reply to a conversation (OpenAI-style messages) through the chat template."""
        tokens = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.stream(tokens, max_tokens, **kwargs)

    def stream(self, prompt: str | list[int], max_tokens: int = 256, **kwargs) -> Iterator[Response]:
        """`mlxflash.stream_generate` on `prompt`, computing only what the cache does not hold."""
        tokens = encode_prompt(self.tokenizer, prompt)
        context, limit = context_limit(self.model)
        check_prompt(context, tokens, max_tokens, limit=limit)
        rest = self._prepare(list(tokens), max_tokens)
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
            else:  # the working cache may be half-updated: drop it, keep the others
                self.cache, self.cache_tokens = None, []
            raise
        else:
            self._settle(list(tokens) + generated)


def session(path: str | Path | None = None, **load_kw) -> Session:
    """`mlxflash.load(path, **load_kw)` as a Session; `with mlxflash.session() as s:` closes it."""
    return Session(*load(path, **load_kw))
