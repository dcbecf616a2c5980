"""Invariants of the record format and the reader (hypothesis)."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxflash.format.bundle import RecordLayout
from mlxflash.runtime.ffn import pack_codes, transpose_packed, unpack_codes
from mlxflash.runtime.reader import FlashReader, aligned_buffer

DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "float16": np.float16, "float32": np.float32}


@settings(max_examples=60, deadline=None)
@given(
    fields=st.lists(st.tuples(st.sampled_from(sorted(DTYPES)), st.integers(1, 9)), min_size=1, max_size=6),
    n=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_record_pack_view_roundtrip(fields, n, seed):
    layout = RecordLayout.build((f"f{i}", dt, count) for i, (dt, count) in enumerate(fields))
    rng = np.random.default_rng(seed)
    parts = {f.name: rng.integers(0, 255, (n, f.nbytes), dtype=np.uint8).view(DTYPES[f.dtype]) for f in layout.fields}
    records = layout.pack(parts)
    assert records.shape == (n, layout.nbytes) and layout.nbytes % 16 == 0
    for f in layout.fields:
        assert f.offset % np.dtype(DTYPES[f.dtype]).itemsize == 0
        back = np.asarray(layout.view(mx.array(records), f.name))
        assert back.tobytes() == parts[f.name].tobytes()
    assert RecordLayout.from_json(layout.to_json()) == layout


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 5), cols=st.integers(1, 4), seed=st.integers(0, 999))
def test_packed_transpose_is_lossless(bits, rows, cols, seed):
    per = 32 // bits
    codes = mx.array(np.random.default_rng(seed).integers(0, 1 << bits, (rows * per, cols * per)), dtype=mx.uint32)
    packed = pack_codes(codes, bits)
    assert mx.array_equal(unpack_codes(packed, bits), codes).item()
    assert mx.array_equal(unpack_codes(transpose_packed(packed, bits), bits), codes.T).item()
    assert mx.array_equal(transpose_packed(transpose_packed(packed, bits), bits), packed).item()
    w = mx.random.normal((8, 64))
    q = mx.quantize(w, 32, 8)[0]
    assert mx.array_equal(
        unpack_codes(q, 8), mx.array(np.asarray(q).view(np.uint8).reshape(8, 64).astype(np.uint32))
    ).item()


@settings(max_examples=40, deadline=None)
@given(
    runs=st.lists(
        st.tuples(st.integers(0, 300_000), st.integers(1, 70_000), st.integers(0, 4095)), min_size=1, max_size=8
    ),
    direct=st.booleans(),
)
def test_reader_returns_file_bytes(tmp_path_factory, runs, direct):
    path = tmp_path_factory.getbasetemp() / "reader.bin"
    if not path.exists():
        path.write_bytes(np.random.default_rng(0).integers(0, 255, 400_000, dtype=np.uint8).tobytes())
    data = path.read_bytes()
    reader = FlashReader(path, threads=3, direct=direct)
    try:
        wanted, dests = [], []
        for offset, length, skew in runs:
            length = min(length, len(data) - offset)
            if length <= 0:
                continue
            _, buf = aligned_buffer(length + skew)
            dests.append((offset, buf[skew : skew + length]))  # misaligned destinations too
            wanted.append(data[offset : offset + length])
        reader.read(dests)
        for (_, dest), expect in zip(dests, wanted, strict=True):
            assert dest.tobytes() == expect
        assert reader.counters.bytes_read == sum(len(w) for w in wanted)
    finally:
        reader.close()


def test_reader_reports_io_mode(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(8192))
    reader = FlashReader(path)
    assert reader.io_note in ("O_DIRECT", "F_NOCACHE") or reader.io_note.startswith("buffered reads (")
    assert reader.direct_io == (reader.io_note in ("O_DIRECT", "F_NOCACHE"))
    reader.close()
    assert FlashReader(path, direct=False).io_note == "buffered reads (direct I/O not requested)"
