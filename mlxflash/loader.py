"""`load`: a model by path or by name (the default model when none), ready to generate. Below the front
ends (generate, chat, serve, eval) and above the runtime and the fetchers."""

from __future__ import annotations

from pathlib import Path

from .fetch.default_model import default_model_path, ensure_default_predictors
from .format.bundle import Bundle
from .runtime.model import load_model
from .runtime.planner import Budget, choose_mode


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
        memory = Budget.of(Bundle.open(path, verify=False), memory)  # parsed once: load_model takes it as it is
        if kwargs.get("selector") in (None, "predictor", "gate") and choose_mode(memory, mode) == "flash":
            ensure_default_predictors(path)
    return load_model(path, mode=mode, memory=memory, **kwargs)
