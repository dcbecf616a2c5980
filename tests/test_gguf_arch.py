"""GGUF architectures and tokenizers: gemma3 and phi3 tensors back in mlx-lm's form, SentencePiece vocabularies."""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest
from test_gguf import _byte_vocab, _logits
from tiny import _GGUF_NAMES

from mlxflash.format.convert import open_source

# --- gemma3 and phi3: what llama.cpp changed at conversion is undone ---------------------------------

_GEMMA3_TO_GGUF = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
_PHI3_TO_GGUF = {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


def _to_gguf_name(name: str, arch: str) -> str:
    table = {**_GGUF_NAMES, **(_GEMMA3_TO_GGUF if arch == "gemma3" else _PHI3_TO_GGUF)}
    if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)
        module, leaf = rest.rsplit(".", 1)
        return f"blk.{layer}.{table[module]}.{leaf}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}.get(
        name, "output.weight"
    )


def _spm_vocab(tmp_path, space_prefix: bool = True):
    """A small SentencePiece BPE model with byte fallback, trained here as Llama 2's and Gemma's were
    (no normalization, spaces kept: a GGUF carries no normalizer)."""
    import sentencepiece as spm

    text = [
        "The quick brown fox jumps over the lazy dog.",
        "def square(x):\n    return x * x",
        "Gemma and Llama tokenizers are SentencePiece models with byte fallback.",
        "numbers 12345 and symbols #@! (parentheses) [brackets]",
    ] * 20
    prefix = tmp_path / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_prefix=str(prefix),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        add_dummy_prefix=space_prefix,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(prefix) + ".model")


def _add_spm(w: gguf.GGUFWriter, sp, add_space_prefix: bool = True) -> None:
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_space_prefix(add_space_prefix)


def _write(w: gguf.GGUFWriter, tensors: dict[str, np.ndarray]) -> None:
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _random_model(module, config: dict, seed: int):
    from mlx.utils import tree_flatten

    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    # norms away from their init, so a missed +1 shows
    weights = {
        k: v + 0.3 * mx.random.normal(v.shape) if "norm" in k else v for k, v in tree_flatten(model.parameters())
    }
    model.load_weights(list(weights.items()))
    return model, weights


def test_gemma3_gguf_maps_to_mlx_lm(tmp_path):
    from mlx_lm.models import gemma3_text

    config = {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 6,  # mlx-lm needs one global layer (every 6th)
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "vocab_size": 400,
        "query_pre_attn_scalar": 32,
        "sliding_window": 512,
        "max_position_embeddings": 128,
    }
    model, weights = _random_model(gemma3_text, config, seed=2)
    w = gguf.GGUFWriter(str(tmp_path / "gemma3.gguf"), "gemma3")
    w.add_block_count(6)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(32)
    w.add_value_length(32)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(512)
    _add_spm(w, _spm_vocab(tmp_path, space_prefix=False), add_space_prefix=False)
    # llama.cpp's Gemma3Model: every norm weight stored plus one; tied embedding, no output.weight
    _write(
        w, {_to_gguf_name(k, "gemma3"): np.array(v + 1 if k.endswith("norm.weight") else v) for k, v in weights.items()}
    )
    src = open_source(tmp_path / "gemma3.gguf", tmp_path)
    assert src.config["hidden_act"] == "gelu_pytorch_tanh" and src.config["query_pre_attn_scalar"] == 32
    ours = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(src.config))
    ours.load_weights(list(ours.sanitize(dict(src.weights)).items()))
    np.testing.assert_allclose(_logits(ours), _logits(model), atol=1e-5, rtol=0)


def test_phi3_gguf_splits_fused_gate_up(tmp_path):
    from mlx_lm.models import phi3

    config = {
        "model_type": "phi3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
    }
    model, weights = _random_model(phi3, config, seed=3)
    w = gguf.GGUFWriter(str(tmp_path / "phi3.gguf"), "phi3")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(16)
    _byte_vocab(w)
    _write(w, {_to_gguf_name(k, "phi3"): np.array(v) for k, v in weights.items()})
    src = open_source(tmp_path / "phi3.gguf", tmp_path)
    gate, up = src.weights["model.layers.1.mlp.gate_proj.weight"], src.weights["model.layers.1.mlp.up_proj.weight"]
    fused = weights["model.layers.1.mlp.gate_up_proj.weight"]
    assert mx.array_equal(gate, fused[:96]).item() and mx.array_equal(up, fused[96:]).item()
    # mlx-lm's phi3 keeps them fused: stack them back to run its model on what the source gives
    loaded = dict(src.weights)
    for i in range(2):
        p = f"model.layers.{i}.mlp."
        loaded[p + "gate_up_proj.weight"] = mx.concatenate(
            [loaded.pop(p + "gate_proj.weight"), loaded.pop(p + "up_proj.weight")]
        )
    ours = phi3.Model(phi3.ModelArgs.from_dict(src.config))
    ours.load_weights(list(loaded.items()))
    np.testing.assert_allclose(_logits(ours), _logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, space_prefix", [("llama", True), ("llama", False), ("gemma3", False)])
def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path, arch, space_prefix):
    """tokenizer.ggml.model 'llama': tokens, scores and types give sentencepiece's own ids (byte fallback too)."""
    from tokenizers import Tokenizer

    from mlxflash.format import gguf as gguf_source
    from mlxflash.format.gguf_tokenizer import write_tokenizer

    sp = _spm_vocab(tmp_path, space_prefix)
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), arch)
    _add_spm(w, sp, space_prefix)
    _write(w, {"token_embd.weight": np.zeros((4, 32), np.float32)})
    md = gguf_source.metadata(gguf_source.open_reader(tmp_path / "spm.gguf"))
    write_tokenizer(md, tmp_path, tmp_path / "spm.gguf")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["The quick brown fox", "def square(x):\n    return x * x", "naïve € 🙂 unseen ✓", "12345 #@!"]:
        want = [sp.bos_id(), *sp.encode(text)]
        assert tok.encode(text).ids == want, text
        assert tok.decode(want, skip_special_tokens=True) == text
