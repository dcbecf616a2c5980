"""Layer blocks of ffn.bin read whole or in slices, through the reader, into one reused buffer."""

from __future__ import annotations

import mlx.core as mx

from ..format.bundle import Bundle
from .reader import FlashReader, aligned_buffer


class BlockSource:
    """Reads layer blocks, whole (naive mode, the gate selector's rows) or in slices of `rows` records
    (flash prompts), into one shared, aligned buffer: the only FFN memory of the naive mode."""

    def __init__(self, bundle: Bundle, reader: FlashReader, rows: int | None = None):
        self.bundle, self.reader = bundle, reader
        spec = bundle.spec
        self.rows = rows or max(b.neurons for b in spec.layers)
        self._buffer, self._view = aligned_buffer(self.rows * spec.record.nbytes)

    def read_block(self, layer: int) -> mx.array:
        return self.read_rows(layer, 0, self.bundle.spec.layers[layer].neurons)

    def read_rows(self, layer: int, first: int, count: int) -> mx.array:
        """Records first..first+count of a layer (count <= rows): (count, R), valid until the next read."""
        spec = self.bundle.spec
        R = spec.record.nbytes
        self.reader.read([(spec.layers[layer].offset + first * R, self._view[: count * R])])
        return self._buffer[: count * R].reshape(count, R)
