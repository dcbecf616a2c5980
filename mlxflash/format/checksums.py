"""Checksums a bundle carries: sha256 of its files (or of a byte range, a layer's block) and of config.json
itself, so a corrupt or truncated bundle is refused at load with the file named."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CONFIG_DIGEST = "config_sha256"  # config.json's own checksum: of the config without this key


def config_digest(config: dict) -> str:
    body = {k: v for k, v in config.items() if k != CONFIG_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def with_digest(config: dict) -> dict:
    return {**config, CONFIG_DIGEST: config_digest(config)}


def sha256_file(path: Path, start: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = os.path.getsize(path) - start if length is None else length
        while left > 0:
            chunk = f.read(min(left, 8 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        _drop_page_cache(f.fileno())
    return h.hexdigest()


def _drop_page_cache(fd: int) -> None:
    # Hashing must not leave the FFN in the page cache, or later "disk" reads would be memory reads.
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
