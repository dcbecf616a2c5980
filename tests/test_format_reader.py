"""Invariants of the record format and the reader (hypothesis)."""

from __future__ import annotations

import errno
import os

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxflash.errors import BundleError
from mlxflash.format.bundle import RecordLayout
from mlxflash.format.quant import pack_codes, transpose_packed, unpack_codes
from mlxflash.runtime.reader import IOV_MAX, SPLIT_BYTES, FlashReader, _split_buffers, aligned_buffer, scratch_size_for

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
    record=st.sampled_from([1, 1007, 2600, 24_000, 100_000]),  # the scratch is sized from the record
)
def test_reader_returns_file_bytes(tmp_path_factory, runs, direct, record):
    path = tmp_path_factory.getbasetemp() / "reader.bin"
    if not path.exists():
        path.write_bytes(np.random.default_rng(0).integers(0, 255, 400_000, dtype=np.uint8).tobytes())
    data = path.read_bytes()
    reader = FlashReader(path, threads=3, direct=direct, scratch=scratch_size_for(record))
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


@settings(max_examples=30, deadline=None)
@given(
    runs=st.lists(st.tuples(st.integers(0, 60), st.lists(st.integers(1, 80), min_size=1, max_size=60)), max_size=6),
    direct=st.booleans(),
)
def test_scatter_fills_each_runs_buffers_in_file_order(tmp_path_factory, runs, direct):
    """Runs of page-sized buffers (more than a piece's bytes, or than IOV_MAX buffers) get the file's bytes."""
    path = tmp_path_factory.getbasetemp() / "scatter.bin"
    if not path.exists():
        path.write_bytes(np.random.default_rng(1).integers(0, 255, 400 * 4096, dtype=np.uint8).tobytes())
    data = path.read_bytes()
    reader = FlashReader(path, threads=3, direct=direct)
    try:
        page = 4096
        wanted = [(first * page, [aligned_buffer(pages * page)[1] for pages in sizes]) for first, sizes in runs]
        wanted = [(o, bufs) for o, bufs in wanted if o + sum(b.nbytes for b in bufs) <= len(data)]
        reader.scatter(wanted)
        for offset, bufs in wanted:
            assert b"".join(b.tobytes() for b in bufs) == data[offset : offset + sum(b.nbytes for b in bufs)]
        assert reader.counters.bytes_read == sum(b.nbytes for _, bufs in wanted for b in bufs)
        with pytest.raises(BundleError, match="truncated"):
            reader.scatter([(len(data) - page, [aligned_buffer(page)[1], aligned_buffer(page)[1]])])
    finally:
        reader.close()


def test_scatter_pieces_stay_within_split_bytes_and_iov_max():
    small = [np.zeros(100, np.uint8)] * 2500  # buffered reads may take buffers of any size
    pieces = _split_buffers(1000, small)
    assert [len(b) for _, b, _ in pieces] == [IOV_MAX, IOV_MAX, 2500 - 2 * IOV_MAX]
    assert [o for o, _, _ in pieces] == [1000, 1000 + 100 * IOV_MAX, 1000 + 200 * IOV_MAX]
    pages = [np.zeros(4096, np.uint8)] * 600
    assert [size for _, _, size in _split_buffers(0, pages)] == [SPLIT_BYTES, SPLIT_BYTES, 88 * 4096]


def test_scratch_is_two_records_and_their_pages_within_16_to_64_kib():
    assert scratch_size_for(1007) == 16 << 10  # the default model's records
    assert scratch_size_for(12_000) == 32 << 10  # 2 * 12,000 + 8 KiB, in whole pages
    assert scratch_size_for(48_000) == 64 << 10
    assert scratch_size_for(1007, gap=3) == 64 << 10  # reads through gaps are long: not cut small


def _direct_read_works(path) -> bool:
    """Whether this file system serves an aligned O_DIRECT read (Linux), asked apart from the reader."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.preadv(fd, [aligned_buffer(4096)[1]], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
def test_reader_uses_direct_io_where_the_file_system_serves_it(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(8192))
    reader = FlashReader(path)
    expected = ("O_DIRECT", True) if _direct_read_works(path) else (reader.io_note, False)
    assert (reader.io_note, reader.direct_io) == expected
    assert reader.direct_io or reader.io_note.startswith("buffered reads (O_DIRECT refused: ")
    reader.close()
    buffered = FlashReader(path, direct=False)
    assert (buffered.io_note, buffered.direct_io) == ("buffered reads (direct I/O not requested)", False)
    buffered.close()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
def test_reader_falls_back_to_buffered_reads_when_direct_io_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    data = os.urandom(10_000)
    path.write_bytes(data)
    real_open = os.open

    def refuse_direct(file, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    reader = FlashReader(path, threads=2)
    assert reader.io_note == f"buffered reads (O_DIRECT refused: {os.strerror(errno.EINVAL)})"
    assert not reader.direct_io
    _, dest = aligned_buffer(5000)
    reader.read([(123, dest[1:4001])])  # unaligned offset, length and destination: fine when buffered
    assert dest[1:4001].tobytes() == data[123:4123]
    reader.close()
