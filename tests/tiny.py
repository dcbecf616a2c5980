"""Tiny random source checkpoints the tests convert: a Hugging Face llama directory and a GGUF file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_synthetic import byte_tokenizer  # noqa: E402  (one byte-level tokenizer for tests and synthetic bundles)

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 96,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "eos_token_id": 0,
}


def tiny_weights(config: dict, seed: int = 0) -> dict[str, mx.array]:
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Scale up the default init so the tiny FFNs matter to the logits.
    return {k: (v * 4 if "mlp" in k else v) for k, v in tree_flatten(model.parameters())}


def make_hf_dir(out: Path, config: dict | None = None, dtype=mx.float32, seed: int = 0) -> Path:
    config = {**TINY, **(config or {})}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    weights = {k: v.astype(dtype) for k, v in tiny_weights(config, seed).items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    byte_tokenizer(out, config["vocab_size"])
    return out


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = name.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{leaf}"


def make_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny llama GGUF: Q8_0 embedding, Q4_0 attention, Q4_1 FFN, F32 norms and output."""
    import gguf

    config = TINY
    weights = tiny_weights(config, seed)
    w = llama_gguf_writer(path, config)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|end|>"] + alphabet[1:]
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    qtype = gguf.GGMLQuantizationType

    def kind_of(name: str):
        if name.endswith("norm.weight") or name == "lm_head.weight":
            return qtype.F32
        return qtype.Q8_0 if "embed" in name else qtype.Q4_1 if "mlp" in name else qtype.Q4_0

    write_gguf_tensors(w, weights, _gguf_name, kind_of)
    return path


def write_gguf_tensors(w, weights: dict, name_of, kind_of) -> None:
    """Add each weight as GGUF tensor `name_of(name)` quantized to `kind_of(name)`, then write the file."""
    import gguf

    for name, value in weights.items():
        data = np.asarray(value.astype(mx.float32))
        kind = kind_of(name)
        raw = data if kind == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(data, kind)
        w.add_tensor(name_of(name), raw, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_gguf_writer(path, config: dict, arch: str = "llama"):
    """A gguf.GGUFWriter for a llama-like GGUF (`arch`) with `config`'s shape metadata written (tensors and
    vocab to add)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    return w
