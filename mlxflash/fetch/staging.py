"""Where converted bundles live, and how a fetch reaches them: downloads and conversion happen in a staging
folder outside the models folder, and only a complete bundle is renamed into it."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def models_dir() -> Path:
    """$MLXFLASH_MODELS, else the checkout's models/ (editable install), else ~/.cache/mlxflash/models."""
    if os.environ.get("MLXFLASH_MODELS"):
        return Path(os.environ["MLXFLASH_MODELS"])
    checkout = Path(__file__).resolve().parents[2] / "models"
    if (checkout / "README.md").is_file():
        return checkout
    return Path.home() / ".cache" / "mlxflash" / "models"


def staging_dir() -> Path:
    """$MLXFLASH_STAGING, else $XDG_CACHE_HOME/mlxflash/staging (default ~/.cache): what an interrupted
    fetch had verified waits here for its rerun."""
    if os.environ.get("MLXFLASH_STAGING"):
        return Path(os.environ["MLXFLASH_STAGING"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mlxflash" / "staging"


def is_bundle(path: Path) -> bool:
    """A complete bundle: the writer renames a bundle into place only once its config is written."""
    return (path / "config.json").is_file()


def say(msg: str) -> None:
    print(f"mlxflash: {msg}", file=sys.stderr, flush=True)


@contextmanager
def staged(name: str) -> Iterator[Path]:
    """The staging folder for `name`, held under an exclusive lock: a second process fetching the same
    model waits here, then finds the bundle already published."""
    stage = staging_dir() / name
    stage.mkdir(parents=True, exist_ok=True)
    with open(stage.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield stage
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def publish(bundle: Path, target: Path) -> Path:
    """Move the complete `bundle` to `target` in one rename (across file systems: copy to a hidden sibling
    first, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_bundle(target):  # published meanwhile by someone not sharing our staging folder
        shutil.rmtree(bundle)
        return target
    try:
        os.rename(bundle, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            shutil.copytree(bundle, tmp, dirs_exist_ok=True)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(bundle)
    return target
