#!/usr/bin/env python3
"""Write a synthetic bundle: random weights at a real model's shapes, through the real writer.

    python tools/make_synthetic.py --shape opt-6.7b --layers 4 --dtype float32 --out /work/bench-data/opt-6.7b-L4

Shapes: opt-6.7b, opt-1.3b, opt-125m, llama-2-7b, smollm2-135m, tiny-opt, tiny-llama, and the MoE shapes
qwen3-30b-a3b (48 layers, 128 experts, 8 routed, d=2048, expert FFN 768) and tiny-qwen3-moe, written as
MoE bundles (mlxflash.format.moe: one record per expert; --bits quantizes the experts); override any
dimension with --hidden-size / --ffn-size / --heads / --vocab-size. --layers N keeps runs short
(the config records the full depth under "synthetic" so a benchmark can scale per layer).
--bits quantizes the FFN (MLX affine, --group-size); resident weights stay in --dtype.
--rank R (default 128; 0 = none) adds random low-rank predictors and their selector record
(mlxflash.format.selector_record.SelectorRecord, kind "predictor"). Weights are generated layer by layer with a fixed --seed; the
writer (mlxflash.format.convert.write_bundle) streams the FFN to disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from mlxflash.format.convert import write_bundle
from mlxflash.format.moe import MoEArch, write_moe_bundle
from mlxflash.format.selector_record import SelectionStats, SelectorRecord
from mlxflash.runtime import traces
from mlxflash.runtime.planner import MAX_WINDOW

SHAPES = {
    "opt-6.7b": {"family": "opt", "d": 4096, "ffn": 16384, "layers": 32, "heads": 32, "vocab": 50272, "max_pos": 2048},
    "opt-1.3b": {"family": "opt", "d": 2048, "ffn": 8192, "layers": 24, "heads": 32, "vocab": 50272, "max_pos": 2048},
    "opt-125m": {"family": "opt", "d": 768, "ffn": 3072, "layers": 12, "heads": 12, "vocab": 50272, "max_pos": 2048},
    "tiny-opt": {"family": "opt", "d": 64, "ffn": 256, "layers": 2, "heads": 4, "vocab": 256, "max_pos": 96},
    "llama-2-7b": {
        "family": "llama",
        "d": 4096,
        "ffn": 11008,
        "layers": 32,
        "heads": 32,
        "vocab": 32000,
        "max_pos": 4096,
    },
    "smollm2-135m": {
        "family": "llama",
        "d": 576,
        "ffn": 1536,
        "layers": 30,
        "heads": 9,
        "kv_heads": 3,
        "vocab": 49152,
        "max_pos": 8192,
    },
    "tiny-llama": {"family": "llama", "d": 64, "ffn": 128, "layers": 2, "heads": 4, "vocab": 256, "max_pos": 96},
    # Qwen3-30B-A3B's config.json: 48 layers, 128 experts, 8 routed, d=2048, expert FFN 768, GQA 32/4 x 128
    "qwen3-30b-a3b": {
        "family": "qwen3_moe",
        "d": 2048,
        "ffn": 768,
        "experts": 128,
        "top_k": 8,
        "layers": 48,
        "heads": 32,
        "kv_heads": 4,
        "head_dim": 128,
        "vocab": 151936,
        "max_pos": 40960,
    },
    "tiny-qwen3-moe": {
        "family": "qwen3_moe",
        "d": 64,
        "ffn": 32,
        "experts": 8,
        "top_k": 2,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "vocab": 256,
        "max_pos": 96,
    },
}


def opt_config(s: dict, layers: int) -> dict:
    return {
        "model_type": "opt",
        "hidden_size": s["d"],
        "ffn_dim": s["ffn"],
        "num_hidden_layers": layers,
        "num_attention_heads": s["heads"],
        "max_position_embeddings": s["max_pos"],
        "vocab_size": s["vocab"],
        "word_embed_proj_dim": s["d"],
        "do_layer_norm_before": True,
        "activation_function": "relu",
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def llama_config(s: dict, layers: int) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": s["d"],
        "intermediate_size": s["ffn"],
        "num_hidden_layers": layers,
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s.get("kv_heads", s["heads"]),
        "vocab_size": s["vocab"],
        "max_position_embeddings": s["max_pos"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def qwen3_moe_config(s: dict, layers: int) -> dict:
    return {
        "model_type": "qwen3_moe",
        "hidden_size": s["d"],
        "intermediate_size": 3 * s["d"],  # dense MLP width (no dense layers here: mlp_only_layers is empty)
        "moe_intermediate_size": s["ffn"],
        "num_experts": s["experts"],
        "num_experts_per_tok": s["top_k"],
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "num_hidden_layers": layers,
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": s["head_dim"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": s["max_pos"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


class Rand:
    """Deterministic random tensors: each name gets its own key from (seed, name)."""

    def __init__(self, seed: int, dtype: mx.Dtype):
        self.seed, self.dtype = seed, dtype

    def normal(self, name: str, shape: tuple, std: float = 0.02) -> mx.array:
        key = mx.random.key((self.seed * 1_000_003 + _stable_hash(name)) % (1 << 62))
        a = (mx.random.normal(shape, key=key) * std).astype(self.dtype)
        mx.eval(a)
        return a

    def ones(self, shape: tuple) -> mx.array:
        return mx.ones(shape, dtype=self.dtype)

    def zeros(self, shape: tuple) -> mx.array:
        return mx.zeros(shape, dtype=self.dtype)


def _stable_hash(text: str) -> int:
    h = 1469598103934665603  # FNV-1a: stable across runs (Python's hash() is salted)
    for b in text.encode():
        h = ((h ^ b) * 1099511628211) % (1 << 64)
    return h


def opt_resident(s: dict, layers: int, r: Rand) -> dict[str, mx.array]:
    d = s["d"]
    w = {
        "model.embed_tokens.weight": r.normal("embed", (s["vocab"], d)),
        "model.embed_positions.weight": r.normal("pos", (s["max_pos"] + 2, d)),
        "model.final_layer_norm.weight": r.ones((d,)),
        "model.final_layer_norm.bias": r.zeros((d,)),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[f"{p}.self_attn.{m}.weight"] = r.normal(f"{p}.{m}", (d, d))
            w[f"{p}.self_attn.{m}.bias"] = r.normal(f"{p}.{m}.b", (d,))
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            w[f"{p}.{norm}.weight"] = r.ones((d,))
            w[f"{p}.{norm}.bias"] = r.zeros((d,))
        w[f"{p}.mlp.down_bias"] = r.normal(f"{p}.down_bias", (d,))
    return w


def _embeddings_and_head(s: dict, r: Rand) -> dict[str, mx.array]:
    """The token embedding, final norm and (untied) LM head every Llama-layout shape has."""
    d = s["d"]
    return {
        "model.embed_tokens.weight": r.normal("embed", (s["vocab"], d)),
        "model.norm.weight": r.ones((d,)),
        "lm_head.weight": r.normal("lm_head", (s["vocab"], d)),
    }


def llama_resident(s: dict, layers: int, r: Rand) -> dict[str, mx.array]:
    d, hd = s["d"], s["d"] // s["heads"]
    kv = s.get("kv_heads", s["heads"]) * hd
    w = _embeddings_and_head(s, r)
    for i in range(layers):
        p = f"model.layers.{i}"
        for m, out in (("q_proj", d), ("k_proj", kv), ("v_proj", kv), ("o_proj", d)):
            w[f"{p}.self_attn.{m}.weight"] = r.normal(f"{p}.{m}", (out, d))
        w[f"{p}.input_layernorm.weight"] = r.ones((d,))
        w[f"{p}.post_attention_layernorm.weight"] = r.ones((d,))
    return w


def qwen3_moe_resident(s: dict, layers: int, r: Rand) -> dict[str, mx.array]:
    """Attention (with q/k norms), norms, the router; the routed experts go to ffn.bin."""
    d, hd = s["d"], s["head_dim"]
    w = _embeddings_and_head(s, r)
    for i in range(layers):
        p = f"model.layers.{i}"
        q, kv = s["heads"] * hd, s["kv_heads"] * hd
        for m, shape in (("q_proj", (q, d)), ("k_proj", (kv, d)), ("v_proj", (kv, d)), ("o_proj", (d, q))):
            w[f"{p}.self_attn.{m}.weight"] = r.normal(f"{p}.{m}", shape)
        w[f"{p}.self_attn.q_norm.weight"] = r.ones((hd,))
        w[f"{p}.self_attn.k_norm.weight"] = r.ones((hd,))
        w[f"{p}.input_layernorm.weight"] = r.ones((d,))
        w[f"{p}.post_attention_layernorm.weight"] = r.ones((d,))
        w[f"{p}.mlp.gate.weight"] = r.normal(f"{p}.router", (s["experts"], d))
    return w


def expert_layers(s: dict, layers: int, r: Rand, bits: int | None, group_size: int) -> Iterator[dict]:
    """One layer's stacked experts at a time, as mlxflash.format.moe.expert_tensors gives them."""
    d, n, e = s["d"], s["ffn"], s["experts"]
    for i in range(layers):
        t = {}
        for proj, shape in (("gate", (e, n, d)), ("up", (e, n, d)), ("down", (e, d, n))):
            w = r.normal(f"model.layers.{i}.experts.{proj}", shape)
            if bits:
                codes, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
                t.update({f"{proj}.weight": codes, f"{proj}.scales": scales, f"{proj}.biases": biases})
            else:
                t[f"{proj}.weight"] = w
        yield t


def make_moe_synthetic(s: dict, out, layers: int, r: Rand, bits, group_size: int, meta: dict, progress: bool) -> Path:
    config = {**qwen3_moe_config(s, layers), "synthetic": meta}
    arch = MoEArch("mlp.switch_mlp", tuple(range(layers)), s["experts"], s["top_k"], s["d"], s["ffn"])
    resident = qwen3_moe_resident(s, layers, r)
    if bits:  # as mlx-lm's quantized MoE models: embeddings, attention and head quantized too, router float
        config["quantization"] = {"group_size": group_size, "bits": bits}
        for name in [k for k, v in resident.items() if v.ndim == 2 and not k.endswith("mlp.gate.weight")]:
            module = name.removesuffix(".weight")
            resident[name], resident[f"{module}.scales"], resident[f"{module}.biases"] = mx.quantize(
                resident[name], group_size=group_size, bits=bits
            )
    with tempfile.TemporaryDirectory(prefix="mlxflash-synth-tok-") as tok:
        byte_tokenizer(Path(tok), s["vocab"])
        layers_iter = expert_layers(s, layers, r, bits, group_size)
        return write_moe_bundle(
            out, config, arch, resident, tqdm(layers_iter, total=layers, disable=not progress), Path(tok)
        )


def predictors(s: dict, layers: int, rank: int, r: Rand) -> dict[str, mx.array]:
    d, n = s["d"], s["ffn"]
    w = {}
    for i in range(layers):
        p = f"model.layers.{i}.mlp.predictor"
        w[f"{p}.a.weight"] = r.normal(f"{p}.a", (rank, d), std=d**-0.5)
        w[f"{p}.b.weight"] = r.normal(f"{p}.b", (n, rank), std=rank**-0.5)
        w[f"{p}.b.bias"] = r.zeros((n,))
    return w


def ffn_layers(s: dict, layers: int, r: Rand, bits: int | None, group_size: int) -> Iterator[dict]:
    """One layer at a time (only one layer's FFN is ever in memory)."""
    d, n = s["d"], s["ffn"]
    for i in range(layers):
        p = f"model.layers.{i}.mlp"
        shapes = {"up_proj": (n, d), "down_proj": (d, n)}
        if s["family"] == "llama":
            shapes = {"gate_proj": (n, d), **shapes}
        layer = {}
        for m, shape in shapes.items():
            w = r.normal(f"{p}.{m}", shape)
            layer[m] = mx.quantize(w, group_size=group_size, bits=bits) if bits else (w,)
        if s["family"] == "opt":
            layer["up_bias"] = r.normal(f"{p}.up_bias", (n,))
        yield layer


def predictor_section(s: dict, layers: int, rank: int) -> SelectorRecord:
    """The bundle's selector record. Random predictors select nothing meaningful, so the statistics the
    planner sizes the cache from (density, expected window union for k = 1..8) are those of the
    paper-calibrated trace (mlxflash.runtime.traces.PAPER_PARAMS) that benchmarks replay."""
    stats = traces.window_stats(traces.generate_trace([s["ffn"]], tokens=48), max_window=MAX_WINDOW)
    return SelectorRecord(
        kind="predictor",
        rank=[rank] * layers,
        predictor_threshold=[0.5] * layers,
        stats={"predictor": SelectionStats(stats["density"], tuple(stats["union_mean"]))},
        trained_on={"source": "synthetic: random predictors; statistics of the paper-calibrated trace"},
    )


def byte_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE with one token per byte: enough for `mlxflash.load` to run the bundle."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[: min(vocab_size, 256)]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": alphabet[2], "model_max_length": 2048}
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def make_synthetic(
    shape: str | dict,
    out: str | Path,
    layers: int | None = None,
    dtype: str = "float16",
    bits: int | None = None,
    group_size: int = 64,
    rank: int = 128,
    seed: int = 0,
    progress: bool = True,
    layout: str = "auto",
) -> Path:
    """Write the bundle; `shape` is a SHAPES key or a dict like SHAPES' values (`layout`: the quantized
    down projection's, mlxflash.format.convert.down_layout)."""
    s = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    layers = layers or s["layers"]
    r = Rand(seed, getattr(mx, dtype))
    meta = {"shape": shape if isinstance(shape, str) else "custom", "full_layers": s["layers"], "seed": seed}
    if s["family"] == "qwen3_moe":  # routed experts: an MoE bundle (no predictors: the router selects)
        return make_moe_synthetic(s, out, layers, r, bits, group_size, meta, progress)
    if s["family"] == "opt":
        config, resident = opt_config(s, layers), opt_resident(s, layers, r)
    else:
        config, resident = llama_config(s, layers), llama_resident(s, layers, r)
    config["synthetic"] = meta
    selector = None
    rank = min(rank, s["d"])
    if rank > 0:
        resident.update(predictors(s, layers, rank, r))
        selector = predictor_section(s, layers, rank)
    with tempfile.TemporaryDirectory(prefix="mlxflash-synth-tok-") as tok:
        byte_tokenizer(Path(tok), s["vocab"])
        return write_bundle(
            out,
            config,
            resident,
            ffn_layers(s, layers, r, bits, group_size),
            selector=selector,
            tokenizer_dir=Path(tok),
            progress=progress,
            layout=layout,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, help="number of layers to write (default: the shape's)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--bits", type=int, choices=[4, 8], help="quantize the FFN")
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    p.add_argument(
        "--down-layout", default="auto", choices=["auto", "rows", "groups"], help="quantized down projection"
    )
    p.add_argument("--rank", type=int, default=128, help="predictor rank (0: no predictors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--ffn-size", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    s = dict(SHAPES[args.shape])
    for key, value in (
        ("d", args.hidden_size),
        ("ffn", args.ffn_size),
        ("heads", args.heads),
        ("vocab", args.vocab_size),
    ):
        if value:
            s[key] = value
    shape = args.shape if s == SHAPES[args.shape] else s
    path = make_synthetic(
        shape,
        args.out,
        args.layers,
        args.dtype,
        args.bits,
        args.group_size,
        args.rank,
        args.seed,
        layout=args.down_layout,
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
