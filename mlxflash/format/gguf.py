"""GGUF sources: config, tensor names and tokenizer from a llama.cpp GGUF file, read with `mx.load`.

`mx.load` turns Q4_0, Q4_1 and Q8_0 tensors into MLX affine quantization (uint32 codes plus scales
and biases, group size 32), so they are kept exactly as they come. It cannot read K-quants or Q5.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ConvertError

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp's pre-tokenizer regexes for the BPE ("gpt2") tokenizers we know.
_PRE_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_CONTROL = 3  # llama.cpp token type of special/control tokens


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict]:
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:  # mx.load raises plain RuntimeError/ValueError for what it cannot read
        raise ConvertError(
            f"{path}: cannot read this GGUF ({e}); supported tensor types are F32, F16, Q4_0, Q4_1 and "
            "Q8_0 (K-quants and Q5 are not: convert from a Q8_0/F16 GGUF or from safetensors)"
        ) from e


def _scalar(md: dict, key: str, default=None):
    v = md.get(key, default)
    return v.item() if isinstance(v, mx.array) else v


def hf_config(md: dict, weights: dict[str, mx.array], path: Path) -> dict:
    """A Hugging Face style config.json for mlx-lm's model class."""
    arch = _scalar(md, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConvertError(
            f"{path}: unsupported architecture {arch!r} in general.architecture (supported: {', '.join(ARCHITECTURES)})"
        )

    def key(name, default=None):
        v = _scalar(md, f"{arch}.{name}", default)
        if v is None:
            raise ConvertError(f"{path}: metadata {arch}.{name} missing")
        return v

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    config = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": key("block_count"),
        "intermediate_size": key("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", hidden // heads),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length"),
        "vocab_size": len(md["tokenizer.ggml.tokens"]),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in weights,
        # llama.cpp stores llama's Q and K rows permuted for its interleaved rotary embedding.
        "rope_traditional": arch == "llama",
        "bos_token_id": _scalar(md, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _scalar(md, "tokenizer.ggml.eos_token_id"),
    }
    if arch == "qwen2":
        config["attention_bias"] = True
    return config


def mlx_lm_name(name: str) -> str | None:
    """GGUF tensor name -> mlx-lm parameter name (None for tensors mlx-lm does not use)."""
    parts = name.split(".")
    if parts[0] == "blk" and parts[2] in _TENSOR_NAMES:
        return f"model.layers.{parts[1]}.{_TENSOR_NAMES[parts[2]]}.{'.'.join(parts[3:])}"
    if parts[0] == "token_embd":
        return "model.embed_tokens." + parts[1]
    if parts[0] == "output_norm":
        return "model.norm." + parts[1]
    if parts[0] == "output":
        return "lm_head." + parts[1]
    if parts[0] == "rope_freqs":
        return None
    raise ConvertError(f"GGUF tensor {name!r} has no place in the model")


def write_tokenizer(md: dict, out: Path, path: Path) -> None:
    """tokenizer.json (for the `tokenizers` library) and tokenizer_config.json from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _scalar(md, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConvertError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported (only BPE 'gpt2' tokenizers); "
            "convert from the Hugging Face checkpoint instead"
        )
    tokens = md["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = _scalar(md, "tokenizer.ggml.pre", "default")
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
    types = np.array(md["tokenizer.ggml.token_type"])
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in np.nonzero(types == _CONTROL)[0]]
    )

    def token(key):
        i = _scalar(md, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("tokenizer.ggml.bos_token_id")
    add_bos = bool(_scalar(md, "tokenizer.ggml.add_bos_token", False))
    if add_bos and bos:
        bos_id = _scalar(md, "tokenizer.ggml.bos_token_id")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
        )
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "model_max_length": int(_scalar(md, f"{_scalar(md, 'general.architecture')}.context_length", 2048)),
    }
    if "tokenizer.chat_template" in md:
        config["chat_template"] = md["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
