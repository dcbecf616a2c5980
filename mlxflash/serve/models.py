"""The bundles a server may load by name: every bundle directory (one with a config.json holding the
`flash` section, mlxflash.format.bundle's manifest) under the models directory, loaded with the
server's own options; one model is in memory at a time."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..format.bundle import CONFIG_FILE


def is_bundle(path: Path) -> bool:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "flash" in config


@dataclass
class Catalog:
    """`root`'s bundles by directory name, and the load options (`mlxflash.load`'s) they get. Every request
    asks: a directory's config.json is read again only when its modification time changes."""

    root: Path | None
    load_kw: dict = field(default_factory=dict)
    _seen: dict[Path, tuple[int, bool]] = field(default_factory=dict, repr=False)  # config mtime, is a bundle

    def bundles(self) -> dict[str, Path]:
        if self.root is None or not self.root.is_dir():
            return {}
        return {p.name: p for p in sorted(self.root.iterdir()) if p.is_dir() and self._is_bundle(p)}

    def _is_bundle(self, path: Path) -> bool:
        try:
            mtime = (path / CONFIG_FILE).stat().st_mtime_ns
        except OSError:
            return False
        seen = self._seen.get(path)
        if seen is None or seen[0] != mtime:
            seen = self._seen[path] = (mtime, is_bundle(path))
        return seen[1]
