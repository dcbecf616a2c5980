"""GGUF sources: every common block type against gguf's own dequantizer, tiny GGUFs end to end, bad input.

The GGUFs here are written with gguf's GGUFWriter; blocks come from gguf.quants.quantize where it can
quantize the type, otherwise from random bytes with sane float fields (every bit pattern of the codes
and 6-bit scales is a valid block).
"""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models import llama
from tiny import _GGUF_NAMES, llama_gguf_writer

import mlxflash
from mlxflash.errors import ConvertError
from mlxflash.format import gguf_blocks as quants
from mlxflash.format.bundle import Bundle
from mlxflash.format.convert import open_source

EXACT = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q8_K]
REQUANT = [T.Q2_K, T.Q3_K, T.Q6_K]
FLOATS = [T.F32, T.F16, T.BF16]
# Byte offsets of the float16 super-block scales in the types gguf-py cannot quantize.
_F16_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.Q2_K: (80, 82), T.Q3_K: (108,)}


def blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """Valid raw GGUF rows (rows, bytes) of `qtype` whose weights are about `scale` in size."""
    if qtype in FLOATS or qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        w = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        return gguf.quants.quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    n = raw.shape[0]
    if qtype == T.Q8_K:
        raw[:, :4] = (rng.uniform(0.2, 1, (n, 1)) * scale / 127).astype(np.float32).view(np.uint8)
    steps = {T.Q4_K: 15 * 63, T.Q5_K: 31 * 63, T.Q6_K: 32 * 127, T.Q2_K: 3 * 15, T.Q3_K: 4 * 32}.get(qtype, 1)
    for off in _F16_FIELDS.get(qtype, ()):
        raw[:, off : off + 2] = (rng.uniform(0.2, 1, (n, 1)) * scale / steps).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, cols // block * size)


def _half_ulp16(x: np.ndarray) -> np.ndarray:
    """The most float16 rounding moves x: 2^-11 relative, 2^-25 absolute among subnormals."""
    return np.maximum(np.abs(x.astype(np.float32)) * 2**-11, 2**-25)


def dequantized(a: quants.Affine) -> np.ndarray:
    s, b = mx.array(a.scales.astype(np.float32)), mx.array(a.biases.astype(np.float32))
    return np.array(mx.dequantize(mx.array(a.weight), s, b, group_size=32, bits=a.bits))


# --- the mapping, type by type, against gguf.quants.dequantize --------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    qtype=st.sampled_from(EXACT), rows=st.integers(1, 4), blocks_per_row=st.integers(1, 3), seed=st.integers(0, 2**16)
)
def test_exact_types_equal_gguf_dequantize(qtype, rows, blocks_per_row, seed):
    cols = blocks_per_row * gguf.GGML_QUANT_SIZES[qtype][0]
    raw = blocks(qtype, rows, cols, np.random.default_rng(seed))
    want = quants.reference(qtype, raw)
    a, err, _ = quants.map_exact(qtype, raw, cols, quants.EXACT_BITS[qtype], np.float32)
    got = dequantized(a)
    if qtype == T.Q8_K:  # float32 d: d*(q+128) - 128*d rounds once more than d*q
        np.testing.assert_allclose(got, want, rtol=0, atol=float(np.abs(want).max()) * 2**-22)
    else:
        np.testing.assert_array_equal(got, want)
    assert err == pytest.approx(float(np.abs(got - want).max()), abs=1e-12)
    # float16 scales and biases: each rounded once (half an ulp), so a weight moves by at most q*ds + db
    a16, err16, _ = quants.map_exact(qtype, raw, cols, quants.EXACT_BITS[qtype], np.float16)
    codes = quants.unpack(a.weight, a.bits).reshape(rows, -1, 32).astype(np.float32)
    bound = _half_ulp16(a.scales)[..., None] * codes + _half_ulp16(a.biases)[..., None]
    assert (np.abs(dequantized(a16) - want).reshape(bound.shape) <= bound * 1.0001 + 1e-12).all()
    assert err16 == pytest.approx(float(np.abs(dequantized(a16) - want).max()), rel=1e-6)


@settings(max_examples=12, deadline=None)
@given(
    qtype=st.sampled_from(REQUANT + FLOATS),
    bits=st.sampled_from([None, 2, 4, 6, 8]),
    rows=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_requantized_types_within_a_step(qtype, bits, rows, seed):
    cols = 256
    raw = blocks(qtype, rows, cols, np.random.default_rng(seed))
    want = quants.reference(qtype, raw)
    bits = bits or quants.REQUANT_BITS.get(qtype, 8)
    a, err, _ = quants.requantize(qtype, raw, cols, bits, np.float16)
    got = dequantized(a)
    # The stated bound: one step of the stored group scale, plus float16 rounding of scale and bias.
    s, b = np.abs(a.scales.astype(np.float32))[..., None], np.abs(a.biases.astype(np.float32))[..., None]
    bound = s + (2**bits - 1) * _half_ulp16(s) + _half_ulp16(b)
    assert (np.abs(got - want).reshape(rows, -1, 32) <= bound + 1e-7).all()
    assert err == pytest.approx(float(np.abs(got - want).max()), rel=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 5, 6, 8]), rows=st.integers(1, 3), groups=st.integers(1, 3), seed=st.integers(0, 999)
)
def test_pack_is_mlx_layout(bits, rows, groups, seed):
    """Codes packed here dequantize through MLX to themselves (scale 1, bias 0), for every bit width."""
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (rows, 32 * groups)).astype(np.uint8)
    packed = quants.pack(codes, bits)
    ones, zeros = mx.ones((rows, groups)), mx.zeros((rows, groups))
    back = mx.dequantize(mx.array(packed), ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(back), codes.astype(np.float32))
    np.testing.assert_array_equal(quants.unpack(packed, bits), codes)


# --- tiny GGUFs end to end -----------------------------------------------------------------------

TINY = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 64,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rope_traditional": True,
}
_GGUF_TO_MLX = {v: k for k, v in _GGUF_NAMES.items()}


def _shapes(c: dict) -> dict[str, tuple[int, int]]:
    """GGUF tensor name -> numpy shape (rows, cols) of a tiny llama."""
    d, n, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    out = {"token_embd.weight": (c["vocab_size"], d), "output.weight": (c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        out |= {
            f"blk.{i}.attn_q.weight": (d, d),
            f"blk.{i}.attn_k.weight": (kv, d),
            f"blk.{i}.attn_v.weight": (kv, d),
            f"blk.{i}.attn_output.weight": (d, d),
            f"blk.{i}.ffn_gate.weight": (n, d),
            f"blk.{i}.ffn_up.weight": (n, d),
            f"blk.{i}.ffn_down.weight": (d, n),
            f"blk.{i}.attn_norm.weight": (d,),
            f"blk.{i}.ffn_norm.weight": (d,),
        }
    return out | {"output_norm.weight": (d,)}


def _byte_vocab(w: gguf.GGUFWriter, kind: str = "gpt2") -> None:
    from tokenizers import pre_tokenizers

    tokens = ["<|end|>"] + sorted(pre_tokenizers.ByteLevel.alphabet())[1:]
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)


def write_tiny_gguf(
    path, qtype: T, seed: int = 0, config: dict = TINY, tokenizer: str = "gpt2", types: dict | None = None
) -> dict:
    """A tiny llama GGUF with every matrix in `qtype` (or `types[name]`; norms F32); returns the raw tensors."""
    rng = np.random.default_rng(seed)
    w = llama_gguf_writer(path, config)
    _byte_vocab(w, tokenizer)
    written = {}
    for name, shape in _shapes(config).items():
        if len(shape) == 1:
            kind, raw = T.F32, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:  # larger FFN weights, so the tiny FFNs matter to the logits
            kind = (types or {}).get(name, qtype)
            raw = blocks(kind, *shape, rng, scale=0.15 if "ffn" in name else 0.05)
        w.add_tensor(name, raw, raw_dtype=kind)
        written[name] = (kind, raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def reference_model(written: dict, config: dict = TINY, requant_bits: int | None = None) -> llama.Model:
    """mlx-lm's llama with every tensor dequantized to float32 by gguf (names mapped by hand).

    `requant_bits`: the matrices then go through the stated requantization (mx.quantize, groups of 32).
    """
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = {}
    for name, (kind, raw) in written.items():
        value = mx.array(quants.reference(kind, raw) if kind != T.F32 else raw)
        if requant_bits and value.ndim == 2:
            value = mx.dequantize(
                *mx.quantize(value, group_size=32, bits=requant_bits), group_size=32, bits=requant_bits
            )
        base, leaf = name.rsplit(".", 1)
        if base == "token_embd":
            weights[f"model.embed_tokens.{leaf}"] = value
        elif base == "output_norm":
            weights[f"model.norm.{leaf}"] = value
        elif base == "output":
            weights[f"lm_head.{leaf}"] = value
        else:
            _, layer, role = base.split(".")
            weights[f"model.layers.{layer}.{_GGUF_TO_MLX[role]}.{leaf}"] = value
    model.load_weights(list(weights.items()))
    return model


TOKENS = [3, 17, 99, 200, 45, 8, 250, 1]


def _logits(model) -> np.ndarray:
    out = model(mx.array(TOKENS)[None])
    mx.eval(out)
    return np.array(out.astype(mx.float32))


@pytest.mark.parametrize("qtype", EXACT + REQUANT + FLOATS, ids=lambda t: t.name)
def test_tiny_gguf_resident_matches_dequantized_reference(tmp_path, qtype, capsys, bits=None):
    """The reading itself, in the layout that keeps the source's groups (the rows layout re-quantizes)."""
    written = write_tiny_gguf(tmp_path / "tiny.gguf", qtype)
    bundle = mlxflash.convert(
        tmp_path / "tiny.gguf", tmp_path / "bundle", bits=bits, dtype="float32", progress=False, layout="groups"
    )
    report = capsys.readouterr().out
    model, _ = mlxflash.load(bundle, mode="resident")
    got = _logits(model)
    model.flash.close()
    line = next(x for x in report.splitlines() if f": {qtype.name}: " in x)
    if qtype in EXACT or qtype in FLOATS:
        err = float(np.abs(got - _logits(reference_model(written))).max())
        assert err < 1e-4, f"{qtype.name}: max |logit diff| {err:.2e}"
        assert "exact" in line, line
    else:  # requantized: exactly gguf's dequantization requantized by mx.quantize in groups of 32
        bits = bits or quants.REQUANT_BITS[qtype]
        err = float(np.abs(got - _logits(reference_model(written, requant_bits=bits))).max())
        assert err < 1e-4, f"{qtype.name}: max |logit diff| {err:.2e}"
        assert f"requantized to {bits}-bit" in line, line
    print(f"{qtype.name}: max |logit - reference| {err:.2e}")


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K], ids=lambda t: t.name)
def test_rows_layout_stays_close_to_the_gguf(tmp_path, qtype):
    """8-bit downs get the rows layout by default: one more 8-bit rounding, a small logit change."""
    written = write_tiny_gguf(tmp_path / "tiny.gguf", qtype)
    bundle = mlxflash.convert(tmp_path / "tiny.gguf", tmp_path / "bundle", dtype="float32", progress=False)
    assert Bundle.open(bundle).spec.quantization["down"]["layout"] == "rows"
    model, _ = mlxflash.load(bundle, mode="resident")
    reference = _logits(reference_model(written, requant_bits=8 if qtype == T.Q6_K else None))
    err = float(np.abs(_logits(model) - reference).max())
    model.flash.close()
    assert 0 < err < 5e-2, f"{qtype.name}: max |logit diff| {err:.2e}"  # measured 2.1e-2 (Q8_0), 5.8e-3 (Q6_K)


@pytest.mark.parametrize("qtype, bits", [(T.Q6_K, 6), (T.Q3_K, 3)], ids=["Q6_K-6bit", "Q3_K-3bit"])
def test_user_bits_for_requantized_types(tmp_path, qtype, bits, capsys):
    """--bits sets what Q2_K/Q3_K/Q6_K become (here 6 and 3 bits: the runtime's straddling codes)."""
    test_tiny_gguf_resident_matches_dequantized_reference(tmp_path, qtype, capsys, bits=bits)


def test_mixed_ffn_types_are_promoted_exactly(tmp_path):
    """Q4_K_M keeps some layers' ffn_down in Q6_K: every layer's ffn_down then takes 8 bits, Q4_K exactly."""
    path = tmp_path / "mixed.gguf"
    written = write_tiny_gguf(path, T.Q4_K, types={"blk.1.ffn_down.weight": T.Q6_K})
    src = open_source(path, tmp_path, dtype="float32")
    down0 = src.weights["model.layers.0.mlp.down_proj.weight"]
    assert down0.shape == (256, 512 * 8 // 32)  # promoted to 8 bits
    a = quants.Affine(
        np.array(down0),
        np.array(src.weights["model.layers.0.mlp.down_proj.scales"]),
        np.array(src.weights["model.layers.0.mlp.down_proj.biases"]),
        8,
    )
    np.testing.assert_array_equal(dequantized(a), quants.reference(T.Q4_K, written["blk.0.ffn_down.weight"][1]))
    assert src.config["quantization"]["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 8}


# --- bad input -----------------------------------------------------------------------------------


def test_truncated_gguf_is_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, T.Q4_0)
    data = path.read_bytes()
    for cut in (len(data) // 2, 40):  # inside the tensor data, inside the header
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ConvertError, match=rf"{short}.*(truncated|corrupt)"):
            mlxflash.convert(short, tmp_path / f"out{cut}", progress=False)
    assert not (tmp_path / f"out{len(data) // 2}").exists()


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    _byte_vocab(w)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(np.zeros((4, 256), np.float32), T.Q8_0), raw_dtype=T.Q8_0)
    raw = np.random.default_rng(0).integers(0, 256, (4, 4 * 18), dtype=np.uint8)  # IQ4_NL: 18-byte blocks of 32
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=T.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        ConvertError, match=r"iq\.gguf: tensor blk\.0\.ffn_up\.weight: GGUF type IQ4_NL is not supported"
    ):
        mlxflash.convert(path, tmp_path / "out", progress=False)


def test_unknown_tensor_type_id_is_refused(tmp_path):
    """A type id gguf does not know (a newer llama.cpp's): a clear error naming the file."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, T.Q4_0)
    data = bytearray(path.read_bytes())
    reader = gguf.GGUFReader(path)
    field = reader.tensors[0].field  # its parts: name length, name, n_dims, dims, type, offset
    type_part = field.parts[-2]
    offset = field.offset + sum(p.nbytes for p in field.parts[:-2])
    assert int(type_part[0]) == int(reader.tensors[0].tensor_type)
    data[offset : offset + 4] = (250).to_bytes(4, "little")
    del reader
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ConvertError, match=rf"{bad}.*250"):
        mlxflash.convert(bad, tmp_path / "out", progress=False)


def test_unhandled_tokenizer_kind(tmp_path):
    path = tmp_path / "t5tok.gguf"
    write_tiny_gguf(path, T.Q8_0, tokenizer="t5")
    with pytest.raises(ConvertError, match=r"t5tok\.gguf: tokenizer\.ggml\.model 't5' is not supported"):
        mlxflash.convert(path, tmp_path / "out", progress=False)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    _byte_vocab(w)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConvertError, match=r"falcon\.gguf: unsupported architecture 'falcon'"):
        mlxflash.convert(path, tmp_path / "out", progress=False)


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from([3, 5, 6]), rows=st.integers(1, 2), cols=st.integers(1, 2), seed=st.integers(0, 999))
def test_runtime_transposes_odd_bit_codes(bits, rows, cols, seed):
    """The runtime's per-neuron down columns for 3/5/6-bit codes (Q5_0/Q5_1/Q5_K and --bits 3/5/6)."""
    from mlxflash.format.quant import pack_codes, transpose_packed, unpack_codes

    codes = np.random.default_rng(seed).integers(0, 1 << bits, (32 * rows, 32 * cols)).astype(np.uint8)
    packed = mx.array(quants.pack(codes, bits))
    assert mx.array_equal(pack_codes(mx.array(codes.astype(np.uint32)), bits), packed).item()
    np.testing.assert_array_equal(np.array(unpack_codes(transpose_packed(packed, bits), bits)), codes.T)
