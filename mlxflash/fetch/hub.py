"""Hugging Face hub names (`org/name`, or `org/name:QUANT` for a repository of GGUF files, as llama.cpp
takes them): the snapshot huggingface_hub downloads or already caches is converted once into the models
folder and reused from there."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..errors import FetchError
from ..format.convert import convert
from .catalog import CATALOG
from .staging import is_bundle, models_dir, publish, say, staged

HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<quant>[\w.-]+))?$")
# What a model directory needs: config, weights, tokenizer files and chat templates (not other formats).
DIRECTORY_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def is_hub_name(name: str) -> bool:
    return HUB_NAME.match(name) is not None


def bundle_name(name: str) -> str:
    """org/name[:QUANT] -> the bundle's folder name, org--name[-QUANT]."""
    m = _parse(name)
    return m["repo"].replace("/", "--") + (f"-{m['quant']}" if m["quant"] else "")


def hub_model_path(name: str, progress: bool = True) -> Path:
    """The bundle of hub model `name`, converted from its snapshot on first use."""
    target = models_dir() / bundle_name(name)
    if is_bundle(target):
        return target
    with staged(target.name) as stage:
        if is_bundle(target):
            return target
        source = _source(_snapshot(name), name)
        say(f"converting {name} ({source.name}) into {target}")
        convert(source, stage / "bundle", progress=progress)
        publish(stage / "bundle", target)
        shutil.rmtree(stage)
    return target


def _parse(name: str) -> dict:
    m = HUB_NAME.match(name)
    if m is None:
        raise FetchError(f"{name}: not a Hugging Face hub name (expected org/name or org/name:QUANT)")
    return m.groupdict()


def _snapshot(name: str) -> Path:
    """The snapshot folder: downloaded when online, else the cached one; a clear line when neither."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise FetchError(f"{name}: hub names need huggingface_hub (pip install huggingface_hub)") from None
    m = _parse(name)
    quant = m["quant"]
    patterns = [f"*{quant.lower()}*.gguf", f"*{quant.upper()}*.gguf", f"*{quant}*.gguf"] if quant else DIRECTORY_FILES
    try:
        return Path(snapshot_download(m["repo"], allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise FetchError(
            f"{m['repo']}: not in the Hugging Face cache and the hub cannot be reached (offline); download it "
            f"while online (`hf download {m['repo']}`), or pass a bundle directory (`mlxflash convert SOURCE DIR` "
            f"converts a local GGUF or model directory) or a fetchable name ({', '.join(CATALOG)})"
        ) from None
    except GatedRepoError:
        raise FetchError(
            f"{m['repo']}: a gated repository; accept its terms on huggingface.co and `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise FetchError(f"{m['repo']}: no such repository on the Hugging Face hub (or it is private)") from None


def _source(snapshot: Path, name: str) -> Path:
    """What to convert inside the snapshot: the GGUF of the named quantization, else the model directory."""
    quant = _parse(name)["quant"]
    if quant:
        ggufs = sorted({p for p in snapshot.rglob("*.gguf") if quant.lower() in p.name.lower()})
        if len(ggufs) != 1:
            found = ", ".join(p.name for p in ggufs) or "none"
            raise FetchError(f"{name}: expected one GGUF file matching {quant} in the repository, found {found}")
        return ggufs[0]
    if not (snapshot / "config.json").is_file() or not any(snapshot.glob("*.safetensors")):
        raise FetchError(
            f"{name}: the repository has no config.json with safetensors weights; for a repository of GGUF "
            f"files name the quantization, e.g. {name}:Q4_K_M"
        )
    return snapshot
