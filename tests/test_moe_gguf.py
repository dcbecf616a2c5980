"""MoE GGUFs as llama.cpp writes them (qwen3moe, qwen2moe, and Mixtral as llama with experts): read into
mlx-lm's MoE models, converted to MoE bundles, streamed from flash."""

from __future__ import annotations

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes
from test_gguf import _byte_vocab
from test_moe import MIXTRAL, PROMPT, QWEN2_MOE, QWEN3_MOE, _greedy, reference
from tiny import llama_gguf_writer, write_gguf_tensors

import mlxflash
from mlxflash.errors import ConvertError
from mlxflash.format.convert import convert, open_source
from mlxflash.format.moe import MoEBundle

T = gguf.GGMLQuantizationType
CONFIGS = {
    "qwen3_moe": {**QWEN3_MOE, "mlp_only_layers": []},  # llama.cpp's qwen3moe has experts in every layer
    "qwen2_moe": QWEN2_MOE,
    "mixtral": {**MIXTRAL, "rope_traditional": True},  # llama.cpp stores llama's Q/K permuted for it
}
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}
_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "gate": "ffn_gate_inp",
    "switch_mlp.gate_proj": "ffn_gate_exps",
    "switch_mlp.up_proj": "ffn_up_exps",
    "switch_mlp.down_proj": "ffn_down_exps",
    "shared_expert.gate_proj": "ffn_gate_shexp",
    "shared_expert.up_proj": "ffn_up_shexp",
    "shared_expert.down_proj": "ffn_down_shexp",
    "shared_expert_gate": "ffn_gate_inp_shexp",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def gguf_name(name: str) -> str:
    if not name.startswith("model.layers."):
        return _TOP.get(name, "output.weight")
    _, _, layer, rest = name.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    module = module.removeprefix("mlp.").removeprefix("block_sparse_moe.")
    return f"blk.{layer}.{_BLOCK[module]}.{leaf}"


def write_moe_gguf(path, config: dict, weights: dict[str, mx.array], expert_type=T.F32) -> None:
    """A GGUF as llama.cpp's converter writes the model: experts stacked (E, rows, cols) in `expert_type`."""
    w = llama_gguf_writer(path, config, GGUF_ARCH[config["model_type"]])
    w.add_expert_count(config.get("num_experts") or config["num_local_experts"])
    w.add_expert_used_count(config["num_experts_per_tok"])
    if "moe_intermediate_size" in config:
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
    if "shared_expert_intermediate_size" in config:
        w.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    _byte_vocab(w)
    write_gguf_tensors(w, weights, gguf_name, lambda name: expert_type if ".switch_mlp." in name else T.F32)


def _model_from(config: dict, weights: dict):
    """mlx-lm's model of a converted source, quantized where the source is (as mlx-lm's loader does)."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    q = config.get("quantization")
    if q:
        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            class_predicate=lambda path, m: q.get(path, True) if f"{path}.scales" in weights else False,
        )
    model.load_weights(list(model.sanitize(dict(weights)).items()))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_moe_gguf_reads_as_mlx_lm_model(tmp_path, arch):
    config = CONFIGS[arch]
    model = reference(config)
    write_moe_gguf(tmp_path / "m.gguf", config, dict(tree_flatten(model.parameters())))
    src = open_source(tmp_path / "m.gguf", tmp_path)
    assert src.config["model_type"] == arch
    assert src.config["num_experts_per_tok"] == config["num_experts_per_tok"]
    ours = _model_from(src.config, src.weights)
    prompt = mx.array([PROMPT])
    np.testing.assert_allclose(np.array(ours(prompt)), np.array(model(prompt)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_quantized_moe_gguf_streams_from_flash(tmp_path, arch):
    """Q8_0 experts become 8-bit expert records; flash at one slot and at every expert equals mlx-lm's
    model of the same GGUF, greedy tokens included."""
    config = CONFIGS[arch]
    write_moe_gguf(tmp_path / "m.gguf", config, dict(tree_flatten(reference(config).parameters())), T.Q8_0)
    (tmp_path / "src").mkdir()
    src = open_source(tmp_path / "m.gguf", tmp_path / "src")
    expected_model = _model_from(src.config, src.weights)
    path = convert(tmp_path / "m.gguf", tmp_path / "bundle", progress=False)
    spec = MoEBundle.open(path).spec
    assert spec.quantization == {p: {"bits": 8, "group_size": 32} for p in ("gate", "up", "down")}
    expected = _greedy(expected_model, 12)
    experts = config.get("num_experts") or config["num_local_experts"]
    for slots in (1, experts):
        flash, _ = mlxflash.load(path, mode="flash", slots=slots)
        got, want = flash(mx.array([PROMPT])), expected_model(mx.array([PROMPT]))
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, rtol=0)
        assert _greedy(flash, 12) == expected
        flash.flash.close()


def test_per_expert_gguf_tensors_are_refused(tmp_path):
    config = CONFIGS["mixtral"]
    weights = dict(tree_flatten(reference(config).parameters()))
    write_moe_gguf(tmp_path / "m.gguf", config, weights)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "old.gguf"), "llama")
    for field in reader.fields.values():  # copy the metadata as is
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            w.add_key_value(
                field.name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None
            )
    for t in reader.tensors:
        if "_exps" in t.name:  # the old layout: blk.N.ffn_gate.E.weight, one tensor per expert
            role = t.name.split(".")[2].removesuffix("_exps")
            for e, rows in enumerate(np.asarray(t.data)):
                w.add_tensor(f"blk.{t.name.split('.')[1]}.{role}.{e}.weight", rows)
        else:
            w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConvertError, match=r"blk\.0\.ffn_gate\.0\.weight.*one tensor each.*ffn_gate_exps"):
        open_source(tmp_path / "old.gguf", tmp_path / "src")
