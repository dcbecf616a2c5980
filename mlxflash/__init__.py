"""mlxflash: run language models larger than memory, with the FFN streamed from the SSD
("LLM in a flash", Apple 2024), on MLX and mlx-lm."""

from __future__ import annotations

from pathlib import Path

from .convert import convert
from .errors import BundleError, ConvertError, MlxflashError, UsageError
from .generate import Response, generate, stream_generate

__all__ = [
    "load",
    "generate",
    "stream_generate",
    "convert",
    "Response",
    "MlxflashError",
    "BundleError",
    "ConvertError",
    "UsageError",
]
__version__ = "0.1.0"


def load(path: str | Path | None = None, mode: str = "resident", verify: bool = True, threads: int = 8):
    """Load a flash bundle -> (model, tokenizer). With no path, the default model (fetched on first use).

    `mode`: "resident" (the whole FFN in memory) or "naive" (each token reads every layer's FFN from
    disk). `model.flash` carries the runtime: bundle, reader, counters; `model.flash.close()` releases it.
    """
    from .default_model import default_model_path
    from .model import load_model

    return load_model(path if path is not None else default_model_path(), mode=mode, verify=verify, threads=threads)
