"""Bad input gets one clear line on stderr and a non-zero exit; nothing half-written is left behind.
Also the CLI's statistics and the README's main command on the default model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from tiny import make_hf_dir

import mlxflash
from mlxflash.format.checksums import with_digest


def run_cli(*args, check_error: bool = False):
    proc = subprocess.run([sys.executable, "-m", "mlxflash.cli", *map(str, args)], capture_output=True, text=True)
    if check_error:
        assert proc.returncode != 0, proc.stdout
        assert "Traceback" not in proc.stderr, proc.stderr
        # Progress bars (tqdm, carriage returns) are not messages; the error is one line.
        lines = [line[line.find("mlxflash:") :] if "mlxflash:" in line else line for line in proc.stderr.splitlines()]
        lines = [line for line in lines if line.strip() and "layer/s" not in line]
        assert len(lines) == 1 and lines[0].startswith("mlxflash: error:"), proc.stderr
    return proc


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("src") / "hf")


@pytest.fixture(scope="module")
def bundle(hf, tmp_path_factory):
    return mlxflash.convert(hf, tmp_path_factory.mktemp("b") / "tiny", progress=False)


@pytest.fixture
def copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "copy")


def _generate_error(path) -> str:
    return run_cli("generate", "--model", path, "--prompt", "hi", "--max-tokens", 2, check_error=True).stderr


def test_missing_bundle_file(copy):
    (copy / "resident.safetensors").unlink()
    assert "resident.safetensors: missing" in _generate_error(copy)


def test_missing_bundle_dir(tmp_path):
    assert "no such bundle directory" in _generate_error(tmp_path / "nothing")


def test_truncated_ffn(copy):
    ffn = copy / "ffn.bin"
    ffn.write_bytes(ffn.read_bytes()[:-100])
    assert "ffn.bin: truncated" in _generate_error(copy)


def test_checksum_mismatch(copy):
    ffn = copy / "ffn.bin"
    data = bytearray(ffn.read_bytes())
    data[100] ^= 0xFF
    ffn.write_bytes(bytes(data))
    assert "checksum mismatch in layer 0" in _generate_error(copy)


def test_unknown_format_version(copy):
    config = json.loads((copy / "config.json").read_text())
    config["flash"]["format_version"] = 99
    (copy / "config.json").write_text(json.dumps(with_digest(config)))  # a future bundle, intact
    assert "unsupported flash format_version 99" in _generate_error(copy)


def test_unsupported_architecture(tmp_path):
    src = make_hf_dir(tmp_path / "src", {"model_type": "gpt2"})
    err = run_cli("convert", src, tmp_path / "out", check_error=True).stderr
    assert "unsupported architecture model_type='gpt2'" in err
    assert not (tmp_path / "out").exists()


def test_prompt_longer_than_context(bundle):
    err = run_cli("generate", "--model", bundle, "--prompt", "x" * 200, "--max-tokens", 4, check_error=True).stderr
    assert "context is 96 tokens" in err


def test_unwritable_output_path(hf, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = run_cli("convert", hf, blocker / "bundle", check_error=True).stderr
    assert "cannot write the bundle here" in err


def test_convert_onto_existing_bundle(hf, bundle):
    before = sorted(p.name for p in bundle.iterdir())
    err = run_cli("convert", hf, bundle, check_error=True).stderr
    assert "already exists" in err
    assert sorted(p.name for p in bundle.iterdir()) == before


def test_failed_conversion_leaves_nothing(hf, tmp_path):
    src = shutil.copytree(hf, tmp_path / "broken")
    weights = mx.load(str(src / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]  # fails after layer 0 was written
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    err = run_cli("convert", src, tmp_path / "out" / "bundle", check_error=True).stderr
    assert "model.layers.1.mlp.down_proj.weight missing" in err
    assert list((tmp_path / "out").iterdir()) == []  # no bundle, no partial directory


def test_bad_option_values(bundle):
    err = run_cli("generate", "--model", bundle, "--prompt", "hi", "--max-tokens", -3, check_error=True).stderr
    assert "--max-tokens -3" in err


@pytest.mark.parametrize("mode", ["resident", "naive"])
def test_stats_json(bundle, tmp_path, mode):
    out = tmp_path / "s.json"
    proc = run_cli(
        "generate",
        "--model",
        bundle,
        "--prompt",
        "hello",
        "--max-tokens",
        6,
        "--mode",
        mode,
        "--stats",
        "--stats-json",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(out.read_text())
    for key in (
        "mode",
        "tokens",
        "tokens_per_s",
        "io_ms_per_token",
        "bytes_read_per_token",
        "mem_ms_per_token",
        "compute_ms_per_token",
        "ffn_bytes",
        "resident_bytes",
        "peak_rss_bytes",
        "direct_io",
    ):
        assert key in stats, key
    assert stats["mode"] == mode and stats["tokens"] >= 1
    assert f"mode {mode}" in proc.stderr
    if mode == "naive":
        assert stats["bytes_read_per_token"] == stats["ffn_bytes"] > 0
        assert stats["io_ms_per_token"] > 0
    else:
        assert stats["bytes_read_per_token"] == 0
        assert stats["resident_bytes"] > stats["ffn_bytes"]


def test_readme_main_command_answers_paris(default_bundle):
    proc = run_cli("generate", "--prompt", "What is the capital of France?", "--max-tokens", 24, "--temp", 0)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_tools_repack_is_the_same_converter(hf, tmp_path):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "repack.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(hf), str(tmp_path / "b"), "--bits", "8"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert mlxflash.format.bundle.Bundle.open(tmp_path / "b").spec.quantization["up"]["bits"] == 8
    again = subprocess.run([sys.executable, str(script), str(hf), str(tmp_path / "b")], capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr
