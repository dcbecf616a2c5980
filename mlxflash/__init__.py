"""mlxflash: run language models larger than memory, with the FFN streamed from the SSD
("LLM in a flash", Apple 2024), on MLX and mlx-lm."""

from __future__ import annotations

from pathlib import Path

from .convert import convert
from .errors import BundleError, ConvertError, MlxflashError, UsageError
from .generate import Response, generate, stream_generate
from .session import Session, session

__all__ = [
    "load",
    "generate",
    "stream_generate",
    "session",
    "Session",
    "convert",
    "Response",
    "MlxflashError",
    "BundleError",
    "ConvertError",
    "UsageError",
]
__version__ = "0.1.0"


def load(path: str | Path | None = None, mode: str | None = None, memory: str | int | None = None, **kwargs):
    """Load a flash bundle -> (model, tokenizer). With no path, the default model (fetched on first use).

    mode: "resident" (the whole FFN in memory), "naive" (each token reads every layer's FFN from disk) or
    "flash" (selected neurons, windowed cache); by default "flash" when `memory` ("4GB", "50%") is
    smaller than the model, else "resident". Other options: selector ("predictor", "gate", "all" or a
    Selector), window, density, gate_bits, gap, bundled, masked_prompts, retain, verify, threads (see
    mlxflash.model.load_model).
    `model.flash` carries the runtime (plan, statistics); `model.flash.close()` releases the bundle.
    """
    from .default_model import default_model_path, ensure_default_predictors
    from .model import load_model

    if path is None:
        path = default_model_path()
        if kwargs.get("selector") in (None, "predictor", "gate") and _flash_wanted(path, mode, memory):
            ensure_default_predictors(path)
    return load_model(path, mode=mode, memory=memory, **kwargs)


def _flash_wanted(path: Path, mode: str | None, memory) -> bool:
    from .bundle import Bundle
    from .planner import choose_mode

    return mode == "flash" or (
        mode is None and memory is not None and choose_mode(Bundle.open(path, verify=False), None, memory)[0] == "flash"
    )
