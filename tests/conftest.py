"""Shared fixtures: the real default model (fetched and converted once) and tiny random bundles."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def default_bundle() -> Path:
    """The default model's bundle (SmolLM2-135M-Instruct, Q4_1), converted into models/ on first use."""
    from mlxflash.fetch.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_model(default_bundle):
    """(model, tokenizer) of the default model, resident, shared by the tests that only read it."""
    import mlxflash

    model, tokenizer = mlxflash.load(default_bundle, mode="resident")
    yield model, tokenizer
    model.flash.close()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA}")
    return SHARED_DATA
