"""Model assembly: mlx-lm's architecture class with each block's MLP swapped for the flash FFN.

Attention, KV cache, norms and the LM head stay mlx-lm's; their weights come from
resident.safetensors. The FFN records stay in ffn.bin and reach the FFN modules through the
mode's source: all in memory (`resident`) or the whole block re-read at every token (`naive`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.utils import _get_classes

from .bundle import Bundle
from .convert import LLAMA_FAMILY, quant_params
from .errors import BundleError
from .ffn import NaiveFFN, ResidentFFN
from .reader import FlashReader, aligned_buffer
from .stats import RuntimeStats

MODES = ("resident", "naive")


class BlockSource:
    """Reads whole layer blocks into one shared, aligned buffer (the naive mode's only FFN memory)."""

    def __init__(self, bundle: Bundle, reader: FlashReader):
        self.bundle, self.reader = bundle, reader
        largest = max(bundle.spec.block_bytes(i) for i in range(bundle.num_layers))
        self._buffer, self._view = aligned_buffer(largest)

    def read_block(self, layer: int) -> mx.array:
        spec = self.bundle.spec
        n = spec.block_bytes(layer)
        self.reader.read([(spec.layers[layer].offset, self._view[:n])])
        return self._buffer[:n].reshape(spec.layers[layer].neurons, spec.record.nbytes)


@dataclass
class FlashRuntime:
    """What `load` attaches to the model as `model.flash`: the bundle, the reader and the counters."""

    bundle: Bundle
    mode: str
    reader: FlashReader
    stats: RuntimeStats
    resident_bytes: int

    @property
    def ffn_bytes(self) -> int:
        return self.bundle.spec.ffn_bytes

    @property
    def context_length(self) -> int | None:
        return self.bundle.config.get("max_position_embeddings")

    def close(self) -> None:
        self.reader.close()


def _layers(model: nn.Module) -> list[nn.Module]:
    return model.model.layers


def load_model(
    path: str | Path, mode: str = "resident", verify: bool = True, threads: int = 8
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a bundle as an mlx-lm model whose FFNs live in the bundle; `model.flash` holds the runtime."""
    if mode not in MODES:
        raise BundleError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    bundle = Bundle.open(path, verify=verify)
    config = bundle.config
    if config.get("model_type") not in LLAMA_FAMILY:
        raise BundleError(
            f"{bundle.path}/config.json: unsupported architecture model_type={config.get('model_type')!r}"
        )
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    reader = FlashReader(bundle.ffn_path, threads=threads)
    stats = RuntimeStats(io=reader.counters)
    blocks = BlockSource(bundle, reader) if mode == "naive" else None
    for i, block in enumerate(_layers(model)):
        if mode == "naive":
            block.mlp = NaiveFFN(i, bundle.spec, stats, blocks)
        else:
            block.mlp = ResidentFFN(i, bundle.spec, stats)

    weights = bundle.resident_weights()
    qcfg = config.get("quantization")
    if qcfg:
        nn.quantize(
            model,
            class_predicate=lambda p, m: (
                f"{p}.scales" in weights and hasattr(m, "to_quantized") and quant_params(qcfg, p)
            ),
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise BundleError(f"{bundle.path}/resident.safetensors: does not match the config ({e})") from e
    mx.eval(model.parameters())
    resident_bytes = bundle.resident_bytes
    if mode == "resident":
        _load_all_records(bundle, reader, model)
        resident_bytes += bundle.spec.ffn_bytes
    model.eval()
    model.flash = FlashRuntime(bundle, mode, reader, stats, resident_bytes)
    eos = config.get("eos_token_id")
    tokenizer = load_tokenizer(bundle.path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    return model, tokenizer


def _load_all_records(bundle: Bundle, reader: FlashReader, model: nn.Module) -> None:
    spec = bundle.spec
    buffers = [aligned_buffer(spec.block_bytes(i)) for i in range(bundle.num_layers)]
    reader.read([(spec.layers[i].offset, view) for i, (_, view) in enumerate(buffers)])
    for i, block in enumerate(_layers(model)):
        block.mlp.set_records(buffers[i][0].reshape(spec.layers[i].neurons, spec.record.nbytes))
