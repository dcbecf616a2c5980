"""GGUF sources: tensors, config and names from a llama.cpp GGUF file, read with llama.cpp's `gguf` package.

Every tensor comes out in MLX's layout under its GGUF name: float tensors as arrays, quantized ones
as `name.weight` (packed uint32 codes), `name.scales`, `name.biases` (affine, groups of 32), the
layout `mx.load` gives the types it knows. gguf_blocks.py does the block mapping; this module decides
each tensor's target, undoes llama.cpp's conversion-time changes (Gemma's norms, Phi-3's fused
gate/up) and names tensors for mlx-lm.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, ReaderTensor

from ..errors import ConvertError
from . import gguf_blocks as blocks

ARCHITECTURES = {
    "llama": "llama",  # "mixtral" when it has experts (llama.cpp writes Mixtral as llama)
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
}
_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per block; llama.cpp's ffn_norm is its pre-feedforward norm.
_GEMMA3_NAMES = {
    **_TENSOR_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _moe_names(moe: str) -> dict[str, str]:
    """Routed experts (stacked, as mlx-lm's SwitchGLU holds them), router and shared expert under `moe`
    (mlx-lm's name of the MoE block: "mlp", or Mixtral's "block_sparse_moe")."""
    return {
        "ffn_gate_inp": f"{moe}.gate",
        "ffn_gate_exps": f"{moe}.switch_mlp.gate_proj",
        "ffn_up_exps": f"{moe}.switch_mlp.up_proj",
        "ffn_down_exps": f"{moe}.switch_mlp.down_proj",
        "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
        "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
        "ffn_up_shexp": "mlp.shared_expert.up_proj",
        "ffn_down_shexp": "mlp.shared_expert.down_proj",
    }


_UNUSED = ("rope_freqs", "rope_factors_long", "rope_factors_short")  # read into the config, not weights
FFN_ROLES = ("ffn_gate", "ffn_up", "ffn_down")
EXPERT_ROLES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # one record format per role in an MoE bundle


@dataclass
class GGUFModel:
    """A GGUF read into MLX arrays: tensors under GGUF names, plain-Python metadata, what each type became."""

    path: Path
    tensors: dict[str, mx.array]
    metadata: dict
    report: dict[str, blocks.TypeReport] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return any(k.endswith(".scales") for k in self.tensors)


def open_reader(path: Path) -> GGUFReader:
    """llama.cpp's reader over the file (memory-mapped), refusing truncated or corrupt files."""
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on short or bad files
        raise ConvertError(f"{path}: not a readable GGUF file, truncated or corrupt ({size} bytes): {e}") from e
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ConvertError(
                f"{path}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, the file has {size}"
            )
    return reader


def metadata(reader: GGUFReader) -> dict:
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _rows_cols(t: ReaderTensor) -> tuple[tuple[int, ...], int]:
    dims = [int(d) for d in t.shape]  # GGUF order: ne0 (the row length) first
    return tuple(reversed(dims[1:])), dims[0]


def _natural_bits(t: ReaderTensor, bits: int | None) -> int | None:
    """The MLX bits a tensor maps to on its own (None: stays float)."""
    if t.tensor_type in blocks.EXACT_BITS:
        return blocks.EXACT_BITS[t.tensor_type]
    if t.tensor_type in blocks.REQUANT_BITS:
        return bits or blocks.REQUANT_BITS[t.tensor_type]
    if t.tensor_type in blocks.FLOAT_TYPES:
        return None
    raise ConvertError(
        f"tensor {t.name}: GGUF type {t.tensor_type.name} is not supported "
        f"(supported: {', '.join(q.name for q in blocks.SUPPORTED)})"
    )


def _targets(tensors: list[ReaderTensor], bits: int | None) -> dict[str, int | None]:
    """Target bits per tensor. An FFN matrix takes the most bits its role has in any layer: the bundle
    stores one format per role, and fewer-bit codes re-pack exactly at more bits."""
    target = {t.name: _natural_bits(t, bits) for t in tensors}
    per_role: dict[str, list[int | None]] = defaultdict(list)
    for t in tensors:
        if _role(t.name):
            per_role[_role(t.name)].append(target[t.name])
    for t in tensors:
        role = _role(t.name)
        quantized = [b for b in per_role.get(role, []) if b is not None]
        if role and quantized and len(_rows_cols(t)[0]) >= 1:  # matrices (and stacked experts), not biases
            target[t.name] = max(quantized)
    return target


def _role(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 and parts[2] in FFN_ROLES + EXPERT_ROLES else None


def _map_tensor(t: ReaderTensor, bits: int | None, scale_dtype, report: dict) -> dict[str, mx.array]:
    """One GGUF tensor -> {"weight"} (float) or {"weight", "scales", "biases"} (quantized)."""
    lead, cols = _rows_cols(t)
    rows = math.prod(lead)
    data = t.data
    if bits is None:
        if t.tensor_type == T.BF16:
            w = mx.array(np.asarray(data).view(np.uint16)).view(mx.bfloat16)
        else:
            w = mx.array(np.asarray(data))
        report.setdefault(t.tensor_type.name, blocks.TypeReport()).add(rows, cols, 0, 0.0, 0.0)
        return {"weight": w.reshape(*lead, cols) if lead else w.reshape(cols)}
    if cols % blocks.GROUP:
        raise ConvertError(f"tensor {t.name}: rows of {cols} weights do not split into groups of {blocks.GROUP}")
    raw = data.reshape(rows, -1)
    if t.tensor_type in blocks.EXACT_BITS:
        a, err, absmax = blocks.map_exact(t.tensor_type, raw, cols, bits, scale_dtype)
    else:
        a, err, absmax = blocks.requantize(t.tensor_type, raw, cols, bits, scale_dtype)
    entry = report.setdefault(t.tensor_type.name, blocks.TypeReport(exact=t.tensor_type in blocks.EXACT_BITS))
    entry.add(rows, cols, bits, err, absmax)
    return {
        "weight": mx.array(a.weight).reshape(*lead, -1),
        "scales": mx.array(a.scales).reshape(*lead, -1),
        "biases": mx.array(a.biases).reshape(*lead, -1),
    }


def load_gguf(path: Path, bits: int | None = None, scale_dtype=np.float16) -> GGUFModel:
    """Read every tensor of a GGUF into MLX's layout (`bits`: the target of the requantized types)."""
    reader = open_reader(path)
    md = metadata(reader)
    arch = md.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConvertError(
            f"{path}: unsupported architecture {arch!r} in general.architecture (supported: {', '.join(ARCHITECTURES)})"
        )
    try:
        target = _targets(reader.tensors, bits)
    except ConvertError as e:
        raise ConvertError(f"{path}: {e}") from e
    report: dict[str, blocks.TypeReport] = {}
    tensors: dict[str, mx.array] = {}
    for t in reader.tensors:
        base = t.name.removesuffix(".weight")
        for suffix, value in _map_tensor(t, target[t.name], scale_dtype, report).items():
            # a float tensor not named .weight (qwen2's attention biases) keeps its name
            plain = base == t.name and suffix == "weight"
            tensors[t.name if plain else f"{base}.{suffix}"] = value
            mx.eval(value)
    _undo_conversion(arch, tensors, md)
    return GGUFModel(path, tensors, md, report)


def _undo_conversion(arch: str, tensors: dict[str, mx.array], md: dict) -> None:
    """Undo what llama.cpp's convert_hf_to_gguf changed, so the tensors are mlx-lm's again."""
    if arch == "gemma3":  # llama.cpp stores Gemma's norm weights plus one; mlx-lm's RMSNorm adds it itself
        for name in [k for k in tensors if k.endswith("norm.weight")]:
            tensors[name] = tensors[name].astype(mx.float32) - 1.0
    if arch == "phi3":  # ffn_up is gate and up stacked (gate first): the bundle keeps them apart
        n = md["phi3.feed_forward_length"]
        for name in [k for k in tensors if ".ffn_up." in k]:
            fused = tensors.pop(name)  # (2n, ...) rows: each row's groups are independent
            tensors[name.replace(".ffn_up.", ".ffn_gate.")] = fused[:n]
            tensors[name] = fused[n:]


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict]:
    """(tensors under GGUF names, metadata): the contract `mx.load(path, return_metadata=True)` had."""
    model = load_gguf(Path(path))
    return model.tensors, model.metadata


def describe(report: dict[str, blocks.TypeReport]) -> list[str]:
    """One line per GGUF tensor type: kept exactly, or the largest error it took on."""
    lines = []
    for name, r in sorted(report.items()):
        head = f"{name}: {r.tensors} tensors, {r.weights / 1e6:.1f}M weights"
        bits = "/".join(str(b) for b in sorted(r.bits))
        if not r.bits:
            lines.append(f"{head}, kept as float (exact)")
        elif r.exact and r.max_error == 0:
            lines.append(f"{head} -> {bits}-bit groups of 32, exact")
        elif r.exact:
            lines.append(
                f"{head} -> {bits}-bit groups of 32, codes exact; scale/bias products rounded to the "
                f"stored float type: max error {r.max_error:.2e} (|w| up to {r.max_abs:.3g}; --dtype float32 keeps them exact)"
            )
        else:
            lines.append(
                f"{head} -> requantized to {bits}-bit groups of 32: max error {r.max_error:.2e} "
                f"(|w| up to {r.max_abs:.3g})"
            )
    return lines


def hf_config(md: dict, weights: dict[str, mx.array], path: Path) -> dict:
    """A Hugging Face style config.json for mlx-lm's model class."""
    arch = md.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConvertError(
            f"{path}: unsupported architecture {arch!r} in general.architecture (supported: {', '.join(ARCHITECTURES)})"
        )

    def key(name, default=None):
        v = md.get(f"{arch}.{name}", default)
        if v is None:
            raise ConvertError(f"{path}: metadata {arch}.{name} missing")
        return v

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    config = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": key("block_count"),
        "intermediate_size": md.get(f"{arch}.feed_forward_length") or key("expert_feed_forward_length"),
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
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
    }
    if arch in ("qwen2", "qwen2moe"):
        config["attention_bias"] = True
    if md.get(f"{arch}.expert_count"):
        config.update(_moe_config(arch, md, config, key))
    if arch == "gemma3":
        config.update(_gemma3_config(md, config))
    if arch == "phi3":
        config.update(_phi3_config(md, config, weights, path))
    return config


def _moe_config(arch: str, md: dict, config: dict, key) -> dict:
    """mlx-lm's MoE arguments from llama.cpp's expert metadata (Mixtral is llama with experts)."""
    experts, used = key("expert_count"), key("expert_used_count")
    expert_ffn = md.get(f"{arch}.expert_feed_forward_length", config["intermediate_size"])
    if arch == "llama":
        return {
            "model_type": "mixtral",
            "num_local_experts": experts,
            "num_experts_per_tok": used,
            "intermediate_size": expert_ffn,
        }
    out = {"num_experts": experts, "num_experts_per_tok": used, "moe_intermediate_size": expert_ffn}
    if arch == "qwen3moe":  # llama.cpp's qwen3moe graph renormalizes the top-k weights (norm_w), as HF's config does
        out.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    if arch == "qwen2moe":
        out["shared_expert_intermediate_size"] = key("expert_shared_feed_forward_length")
    return out


def _gemma3_config(md: dict, config: dict) -> dict:
    """What llama.cpp's gemma3 graph takes as given (its llama-model.cpp), as mlx-lm's arguments."""
    # llama.cpp scales queries by 1/sqrt(head_dim), except Gemma 3 27B (62 blocks): hidden/heads.
    by_width = config["hidden_size"] // config["num_attention_heads"]
    out = {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_local_base_freq": 10000.0,
        "sliding_window": md.get("gemma3.attention.sliding_window", 512),
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": by_width if config["num_hidden_layers"] == 62 else config["head_dim"],
        "rope_traditional": False,
    }
    if md.get("gemma3.rope.scaling.type") == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": md["gemma3.rope.scaling.factor"]}
    return out


def _phi3_config(md: dict, config: dict, weights: dict, path: Path) -> dict:
    rot = md.get("phi3.rope.dimension_count", config["head_dim"])
    out = {
        "partial_rotary_factor": rot / config["head_dim"],
        "original_max_position_embeddings": md.get(
            "phi3.rope.scaling.original_context_length", config["max_position_embeddings"]
        ),
    }
    if "rope_factors_long.weight" in weights:  # LongRoPE (the 128k models)
        out["rope_scaling"] = {
            "type": "longrope",
            "long_factor": np.array(weights["rope_factors_long.weight"]).tolist(),
            "short_factor": np.array(weights["rope_factors_short.weight"]).tolist(),
        }
    if "blk.0.attn_q.weight" in weights:
        raise ConvertError(f"{path}: phi3 GGUF with separate attn_q/attn_k/attn_v; mlx-lm's phi3 needs attn_qkv")
    return out


def mlx_lm_name(name: str, arch: str = "llama") -> str | None:
    """GGUF tensor name -> mlx-lm parameter name (None for tensors mlx-lm does not use)."""
    parts = name.split(".")
    names = _GEMMA3_NAMES if arch == "gemma3" else _TENSOR_NAMES
    names = {**names, **_moe_names("block_sparse_moe" if arch == "llama" else "mlp")}
    if parts[0] == "blk" and len(parts) > 4 and parts[3].isdigit():  # blk.N.ffn_gate.E.weight
        raise ConvertError(
            f"GGUF tensor {name!r}: experts stored one tensor each (llama.cpp before mid-2024); "
            "convert the model again with a current llama.cpp, which stacks them (ffn_gate_exps)"
        )
    if parts[0] == "blk" and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{'.'.join(parts[3:])}"
    if parts[0] == "token_embd":
        return "model.embed_tokens." + parts[1]
    if parts[0] == "output_norm":
        return "model.norm." + parts[1]
    if parts[0] == "output":
        return "lm_head." + parts[1]
    if parts[0] in _UNUSED:
        return None
    raise ConvertError(f"GGUF tensor {name!r} has no place in a {arch} model")
