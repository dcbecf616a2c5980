"""Mixture-of-experts bundles: conversion, the streaming experts against mlx-lm's own model, refusals,
the expert cache's bookkeeping and the routing generator."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes
from tiny import byte_tokenizer

import mlxflash
from mlxflash.errors import ConvertError
from mlxflash.format.convert import convert
from mlxflash.format.moe import MoEBundle, read_experts
from mlxflash.runtime.experts import ExpertIndex, replay
from mlxflash.runtime.moe import record_routes
from mlxflash.runtime.report import load_report
from mlxflash.runtime.routing import (
    PROFILES,
    QWEN3_TARGETS,
    RoutingProfile,
    generate_routing,
    profile_for,
    reuse_stats,
    reuse_within,
    share_any,
)
from mlxflash.runtime.traces import Trace

COMMON = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "eos_token_id": 0,
    "hidden_act": "silu",
}
QWEN3_MOE = {
    **COMMON,
    "model_type": "qwen3_moe",
    "num_hidden_layers": 3,
    "intermediate_size": 96,
    "head_dim": 16,
    "num_experts": 24,  # prompt slices of 3 experts
    "num_experts_per_tok": 4,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [1],  # a dense layer between MoE ones: resident
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
}
MIXTRAL = {
    **COMMON,
    "model_type": "mixtral",
    "num_hidden_layers": 2,
    "intermediate_size": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}
QWEN2_MOE = {
    **COMMON,
    "model_type": "qwen2_moe",
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
}
CONFIGS = {"qwen3_moe": QWEN3_MOE, "mixtral": MIXTRAL}
PROMPT = [5, 17, 42, 7, 99, 3, 250, 61, 12, 8, 77, 31]


def reference(config: dict, seed: int = 0, bits: int | None = None) -> nn.Module:
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    # Scale up the experts so the routed ones decide the logits.
    model.update_modules({})
    params = {k: (v * 6 if "switch_mlp" in k else v) for k, v in tree_flatten(model.parameters())}
    model.load_weights(list(params.items()))
    if bits:
        nn.quantize(model, group_size=32, bits=bits, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    mx.eval(model.parameters())
    return model


def hf_checkpoint(out: Path, config: dict, model: nn.Module, bits: int | None = None) -> Path:
    """The model saved as a Hugging Face checkpoint (per-expert tensors, as sanitize expects them), or
    quantized as mlx-lm saves it (experts stacked)."""
    weights = dict(tree_flatten(model.parameters()))
    unstacked = {}
    for name, w in weights.items():
        if ".switch_mlp." not in name or bits:
            unstacked[name] = w
            continue
        prefix, rest = name.split(".switch_mlp.")
        proj, kind = rest.split(".")
        for e in range(w.shape[0]):
            if config["model_type"] == "mixtral":
                hf = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
                unstacked[f"{prefix}.experts.{e}.{hf}.{kind}"] = w[e]
            else:
                unstacked[f"{prefix}.experts.{e}.{proj}.{kind}"] = w[e]
    out.mkdir(parents=True)
    cfg = dict(config)
    if bits:
        cfg["quantization"] = {"group_size": 32, "bits": bits}
    (out / "config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(out / "model.safetensors"), unstacked)
    byte_tokenizer(out, config["vocab_size"])
    return out


@pytest.fixture(scope="module", params=[("qwen3_moe", None), ("mixtral", None), ("qwen3_moe", 4)], ids=str)
def case(request, tmp_path_factory):
    arch, bits = request.param
    config = CONFIGS[arch]
    model = reference(config, bits=bits)
    tmp = tmp_path_factory.mktemp(f"{arch}-{bits}")
    bundle = convert(hf_checkpoint(tmp / "hf", config, model, bits), tmp / "bundle", progress=False)
    return config, model, bundle, bits


def test_bundle_holds_the_experts_exactly(case):
    config, model, path, bits = case
    bundle = MoEBundle.open(path)
    spec = bundle.spec
    moe_layers = [i for i in range(config["num_hidden_layers"]) if i not in config.get("mlp_only_layers", [])]
    assert [b.layer for b in spec.layers] == moe_layers
    assert spec.record.nbytes % 16384 == 0 and all(f.offset % 4096 == 0 for f in spec.record.fields)
    assert spec.quantization == ({p: {"bits": 4, "group_size": 32} for p in ("gate", "up", "down")} if bits else None)
    params = dict(tree_flatten(model.parameters()))
    module = "block_sparse_moe.switch_mlp" if config["model_type"] == "mixtral" else "mlp.switch_mlp"
    for i, b in enumerate(spec.layers):
        fields = read_experts(bundle, i)
        for name, stored in fields.items():
            proj, kind = name.split(".")
            source = np.asarray(params[f"model.layers.{b.layer}.{module}.{proj}_proj.{kind}"])
            np.testing.assert_array_equal(stored, source)
    resident = bundle.resident_weights()
    assert not any(".switch_mlp." in k for k in resident)
    assert any(k.endswith("gate.weight") and "switch" not in k for k in resident)  # the router is resident


def _slot_counts(config: dict) -> list[int]:
    experts = config.get("num_experts") or config["num_local_experts"]
    return [1, config["num_experts_per_tok"], 5, experts]


def test_flash_equals_mlx_lm_for_every_cache_size(case):
    config, model, path, _ = case
    prompt = mx.array([PROMPT])
    ref_cache = make_prompt_cache(model)
    ref = [model(prompt, cache=ref_cache)[:, -1]]
    for _ in range(6):  # decode steps fed the reference's own greedy tokens
        ref.append(model(mx.argmax(ref[-1], axis=-1)[:, None], cache=ref_cache)[:, -1])
    for slots in _slot_counts(config):
        flash, _ = mlxflash.load(path, mode="flash", slots=slots)
        cache = make_prompt_cache(flash)
        out = [flash(prompt, cache=cache)[:, -1]]
        for t in range(6):
            out.append(flash(mx.argmax(ref[t], axis=-1)[:, None], cache=cache)[:, -1])
        for t, (a, b) in enumerate(zip(ref, out)):
            np.testing.assert_allclose(
                np.array(b), np.array(a), atol=1e-5, rtol=1e-5, err_msg=f"slots {slots} step {t}"
            )
        rt = flash.flash
        assert rt.plan.slots == slots and rt.stats.loaded > 0
        assert rt.stats.loaded <= slots * len(rt.experts) or slots < _slot_counts(config)[-1]  # never read twice
        assert 1 - rt.stats.loaded / rt.stats.selected == pytest.approx(rt.hit_rate)
        rt.close()


def _greedy(model, steps: int = 32) -> list[int]:
    tokens = []
    for token, _ in generate_step(mx.array(PROMPT), model, max_tokens=steps):
        tokens.append(int(token))
    return tokens


@pytest.mark.parametrize("mode", ["flash", "naive", "resident"])
def test_greedy_tokens_identical_over_32_steps(case, mode):
    config, model, path, _ = case
    expected = _greedy(model)
    slot_choices = [1, _slot_counts(config)[-1]] if mode == "flash" else [None]
    for slots in slot_choices:
        flash, _ = mlxflash.load(path, mode=mode, slots=slots)
        assert _greedy(flash) == expected, (mode, slots)
        flash.flash.close()


def test_generate_and_the_load_report_run_on_an_moe_bundle(case):
    _, _, path, _ = case
    model, tokenizer = mlxflash.load(path, mode="flash", slots=2)
    report = load_report(model)
    assert "KV cache (outside the budget" in report and f"compute: {model.flash.bundle.spec.dtype}" in report
    out = list(mlxflash.stream_generate(model, tokenizer, PROMPT, max_tokens=4, temp=0))
    assert [r.token for r in out] == _greedy(model, 4)
    model.flash.close()


def test_naive_reads_every_routed_expert_each_token(case):
    config, _, path, _ = case
    model, _ = mlxflash.load(path, mode="naive")
    rt = model.flash
    list(generate_step(mx.array(PROMPT), model, max_tokens=5))
    assert rt.hit_rate == 0.0 and rt.stats.loaded > 0
    rt.close()


def test_unsupported_expert_layout_is_refused(tmp_path):
    phixtral = {
        "model_type": "phixtral",
        "num_vocab": 256,
        "model_dim": 64,
        "num_heads": 4,
        "num_layers": 2,
        "rotary_dim": 8,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    }
    src = tmp_path / "phixtral"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(phixtral))
    mx.save_safetensors(str(src / "model.safetensors"), {"x": mx.zeros((1,))})
    with pytest.raises(ConvertError, match="SwitchMLP, not SwitchGLU"):
        convert(src, tmp_path / "out", progress=False)
    bad = tmp_path / "topk"
    hf_checkpoint(bad, {**MIXTRAL, "num_experts_per_tok": 9}, reference(MIXTRAL))
    with pytest.raises(ConvertError, match="num_experts_per_tok=9, expected 1..8"):
        convert(bad, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_expert_index_policies():
    lru, lfu = ExpertIndex(6, 2, "lru"), ExpertIndex(6, 2, "lfu")
    for index in (lru, lfu):
        for ids in ([0, 1], [0, 2], [0, 3], [1, 0]):
            index.begin_token()
            for g in index.rounds(np.array(ids)):
                index.admit(g)
    # LRU after [0,3]: holds {0,3}; [1,0] evicts 3. LFU: 0 used 4 times stays; 3 goes too.
    assert set(lru.expert_in) == {0, 1} and set(lfu.expert_in) == {0, 1}
    assert (lru.hits, lru.misses) == (3, 5)
    none = ExpertIndex(6, 2, "none")
    assert replay([np.array([0, 1])] * 5, 6, 2, "none") == 0.0
    assert replay([np.array([0, 1])] * 5, 6, 2, "lru") == pytest.approx(0.8)
    none.begin_token()
    assert none.admit(np.array([4, 5])) == [(4, 0), (5, 1)]
    big = ExpertIndex(8, 3, "lru")
    assert [len(g) for g in big.rounds(np.arange(7))] == [3, 3, 1]


def test_routing_generator_matches_its_published_calibration():
    trace = generate_routing(8, 2, 4, 600, seed=1)
    stats = reuse_stats(trace, [2, 4, 8])
    assert stats["routed_share"] == pytest.approx(2 / 8)
    assert share_any(8, 2, 0.16) == pytest.approx(0.62, abs=0.005)  # Mixtral paper, Table 5, layer 15
    assert stats["share_any"] == pytest.approx(0.62, abs=0.04)
    assert stats["hit_rate"]["lru"][8] > 0.95  # all experts cached: only the first misses
    assert stats["hit_rate"]["lru"][2] < stats["hit_rate"]["lru"][4] < stats["hit_rate"]["lru"][8]
    independent = reuse_stats(generate_routing(8, 2, 4, 600, RoutingProfile("independent", 0.0, 0.0, ""), seed=1))
    assert independent["share_any"] == pytest.approx(0.464, abs=0.04)


def test_qwen3_profile_reproduces_the_published_qwen3_traces():
    """Fitted to imp #1359 (45% reused from the previous token, 80% within 8); checked against colibri
    #698 (LRU, 24 of 128 slots: 0.73), which it was not fitted to."""
    profile = profile_for("qwen3_moe")
    trace = generate_routing(128, 8, 4, 512, profile, seed=3)
    assert reuse_within(trace, 1) == pytest.approx(QWEN3_TARGETS["reuse_prev"], rel=0.1)
    assert reuse_within(trace, 8) == pytest.approx(QWEN3_TARGETS["reuse_within8"], rel=0.1)
    assert reuse_stats(trace, [24], ["lru"])["hit_rate"]["lru"][24] == pytest.approx(0.73, abs=0.05)
    assert profile_for("qwen2_moe") is PROFILES["mixtral"]  # no published statistics: the low-reuse one


def test_reuse_within_counts_the_window():
    # layer 0 routes 0,1 | 1,2 | 3,4 | 0,5: token 1 reuses 1 (of 2), token 2 none, token 3 reuses 0 (3 back)
    trace = Trace.from_selections([[np.array(s)] for s in ([0, 1], [1, 2], [3, 4], [0, 5])], [6])
    assert reuse_within(trace, 1) == pytest.approx(1 / 6)
    assert reuse_within(trace, 3) == pytest.approx(1 / 2)  # from token 3 on: 0 was routed at token 0


def test_recorded_routing_is_the_routers_choice(case):
    config, model, path, _ = case
    flash, _ = mlxflash.load(path, mode="flash", slots=2)
    trace = record_routes(flash, PROMPT, chunk=5)
    flash.flash.close()
    k = config["num_experts_per_tok"]
    layer = model.layers[trace.meta["layers"][0]]
    h = model.model.embed_tokens(mx.array([PROMPT]))
    h = h + layer.self_attn(layer.input_layernorm(h), mask="causal")
    moe = layer.block_sparse_moe if config["model_type"] == "mixtral" else layer.mlp
    gates = np.array(moe.gate(layer.post_attention_layernorm(h)))[0]  # (tokens, experts)
    for t in range(len(PROMPT)):
        assert set(trace.token(0, t).tolist()) == set(np.argsort(-gates[t])[:k].tolist())


def test_qwen2_moe_with_shared_experts(tmp_path):
    config = QWEN2_MOE
    model = reference(config)
    path = convert(hf_checkpoint(tmp_path / "hf", config, model), tmp_path / "bundle", progress=False)
    assert any(".mlp.shared_expert." in k for k in MoEBundle.open(path).resident_weights())
    expected = _greedy(model, 8)
    for slots in (1, 8):
        flash, _ = mlxflash.load(path, mode="flash", slots=slots)
        np.testing.assert_allclose(np.array(flash(mx.array([PROMPT]))), np.array(model(mx.array([PROMPT]))), atol=1e-5)
        assert _greedy(flash, 8) == expected
        flash.flash.close()
