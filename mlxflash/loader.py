"""`load`: a model by path or by name (the default model when none), ready to generate. Below the front
ends (generate, chat, serve, eval) and above the runtime and the fetchers."""

from __future__ import annotations

from pathlib import Path

from .fetch.default_model import default_model_path, ensure_default_predictors
from .format.bundle import Bundle
from .format.moe import is_moe_bundle
from .runtime.model import load_model
from .runtime.moe import load_moe_model
from .runtime.planner import choose_mode


def load(path: str | Path | None = None, mode: str | None = None, memory: str | int | None = None, **kwargs):
    """Load a flash bundle -> (model, tokenizer). With no path, the default model (fetched on first use).

    mode: "resident" (the whole FFN in memory), "naive" (each token reads every layer's FFN from disk) or
    "flash" (selected neurons, windowed cache); by default "flash" when `memory` ("4GB", "50%") is
    smaller than the model, else "resident". Other options: selector ("predictor", "gate", "all" or a
    Selector), window, density, gate_bits, gap, bundled, masked_prompts, retain, verify, threads (see
    mlxflash.runtime.model.load_model).
    `model.flash` carries the runtime (plan, statistics); `model.flash.close()` releases the bundle.
    """
    if path is None:
        path = default_model_path()
        if kwargs.get("selector") in (None, "predictor", "gate") and _flash_wanted(path, mode, memory):
            ensure_default_predictors(path)
    if is_moe_bundle(path):  # mixture of experts: the routed experts stream (runtime/moe.py)
        return load_moe_model(path, mode=mode, memory=memory, **kwargs)
    return load_model(path, mode=mode, memory=memory, **kwargs)


def _flash_wanted(path: Path, mode: str | None, memory) -> bool:
    return mode == "flash" or (
        mode is None and memory is not None and choose_mode(Bundle.open(path, verify=False), None, memory)[0] == "flash"
    )
