"""tools/selfcheck.py runs here and says what it verified (CPU only on a machine without Metal)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import selfcheck  # noqa: E402


def test_selfcheck_verifies_io_memory_and_exactness(tmp_path):
    out = tmp_path / "s.json"
    assert selfcheck.main(["--no-decode", "--json", str(out)]) == 0
    checks = {c["name"]: c for c in json.loads(out.read_text())}
    gpu = selfcheck.gpu_available()
    assert checks["device"]["detail"].startswith("GPU (Metal)" if gpu else "CPU only")
    assert checks["direct I/O"]["status"] in ("PASS", "SKIP")  # SKIP: a file system that refuses direct I/O
    assert checks["reads land in MLX memory (cpu)"]["status"] == "PASS"
    for shape in selfcheck.TINY_SHAPES:
        for mode in ("naive", "flash"):
            assert checks[f"exact {shape} {mode} (cpu vs resident on the cpu)"]["status"] == "PASS"
        if not gpu:
            assert checks[f"exact {shape} (gpu vs cpu)"]["status"] == "SKIP"


def test_selfcheck_catches_a_wrong_answer(monkeypatch, tmp_path):
    real = selfcheck.decode_logits

    def off_by_a_bit(bundle, mode, tokens, device):
        got = real(bundle, mode, tokens, device)
        return got + (1e-2 if mode == "naive" else 0.0)

    monkeypatch.setattr(selfcheck, "decode_logits", off_by_a_bit)
    assert selfcheck.main(["--no-decode"]) == 1


def test_selfcheck_times_a_flash_decode_of_the_default_model(default_bundle):
    check = selfcheck.check_decode(default_bundle, "88%", tokens=4)
    assert check.status == "PASS", check.detail
    assert "flash mode" in check.detail and "ms/token" in check.detail
    assert mx.default_device() == mx.cpu or selfcheck.gpu_available()
