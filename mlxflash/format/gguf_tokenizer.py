"""Tokenizers from GGUF metadata, built with the `tokenizers` library.

BPE ("gpt2": Qwen, Llama 3, SmolLM) is built here from tokens and merges; SentencePiece ("llama":
Llama 2, Mistral, Gemma, Phi-3: tokens, scores and token types, byte fallback) by transformers'
GGUF tokenizer builders, which need no torch (its GGUF weight path does, and is not used).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConvertError

KINDS = ("gpt2", "llama")
# llama.cpp's pre-tokenizer regexes for the BPE ("gpt2") tokenizers we know.
_PRE_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_CONTROL = 3  # llama.cpp token type of special/control tokens


def _bpe(md: dict):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = md["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre in _PRE_REGEX:
        split = pre_tokenizers.Split(_PRE_REGEX[pre], behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:  # gpt2's own regex; SmolLM ("smollm") also splits digits one by one
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre == "smollm":
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    types = np.array(md.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in np.nonzero(types == _CONTROL)[0]]
    )
    return tok


def _sentencepiece(md: dict):
    from tokenizers import decoders, normalizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    fields = GGUF_TOKENIZER_MAPPING["tokenizer"]
    spec = {name: md[f"tokenizer.{key}"] for key, name in fields.items() if f"tokenizer.{key}" in md}
    arch = md["general.architecture"]
    tok, _ = convert_gguf_tokenizer(arch, spec)
    if md.get("tokenizer.ggml.add_space_prefix") is False and not arch.startswith(("gemma", "phi3")):
        # transformers' Llama builder always prepends a space; this vocabulary says not to (as Gemma's)
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def write_tokenizer(md: dict, out: Path, path: Path) -> None:
    """tokenizer.json (for the `tokenizers` library) and tokenizer_config.json from GGUF metadata."""
    from tokenizers import processors

    kind = md.get("tokenizer.ggml.model")
    if kind not in KINDS:
        raise ConvertError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2' BPE and 'llama' "
            "SentencePiece); convert from the Hugging Face checkpoint instead"
        )
    tok = _bpe(md) if kind == "gpt2" else _sentencepiece(md)
    tokens = md["tokenizer.ggml.tokens"]

    def token(key):
        i = md.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("tokenizer.ggml.bos_token_id")
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    if add_bos and bos:
        bos_id = md["tokenizer.ggml.bos_token_id"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = None
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "model_max_length": int(md.get(f"{md.get('general.architecture')}.context_length", 2048)),
    }
    if "tokenizer.chat_template" in md:
        config["chat_template"] = md["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
