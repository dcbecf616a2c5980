"""tools/bench.py --decode on a tiny synthetic bundle: every mode runs the whole model in its own process,
the figures come back per mode, and mlx-lm's own model with the same weights decodes the same tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench  # noqa: E402
import bench_decode  # noqa: E402
import make_synthetic  # noqa: E402

from mlxflash.format.bundle import Bundle  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("decode")
    return make_synthetic.make_synthetic(
        "tiny-llama", root / "llama", dtype="float32", bits=8, group_size=32, progress=False
    )


def test_decode_bench_runs_every_mode_end_to_end(tiny, tmp_path, capsys):
    text = tmp_path / "prompt.txt"
    text.write_text("To be, or not to be, that is the question. " * 8)
    out = tmp_path / "decode.json"
    argv = [str(tiny), "--decode", "--memory", "2MB", "--modes", "flash,naive,resident,mlx-lm", "--rounds", "1"]
    assert bench.main([*argv, "--tokens", "3", "--prompt-tokens", "24", "--text", str(text), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| flash |" in table and "| mlx-lm |" in table
    modes = {m["mode"]: m for m in json.loads(out.read_text())["modes"]}
    assert all(not m["skipped"] for m in modes.values()), {k: m["skipped"] for k, m in modes.items()}
    spec = Bundle.open(tiny).spec
    assert modes["naive"]["bytes_read_per_token"] == spec.ffn_bytes  # the whole FFN at every token
    flash = modes["flash"]
    assert 0 < flash["bytes_read_per_token"] <= flash["transferred_per_token"] < spec.ffn_bytes
    assert flash["operating_point"].startswith("predictor, density")
    assert all(len(m["tokens"]) == 4 and m["decode_ms"] > 0 and m["ttft_s"] > 0 for m in modes.values())
    # the rows layout's down re-quantized back for mlx-lm's down_proj: still the same greedy tokens here
    assert modes["mlx-lm"]["tokens"] == modes["resident"]["tokens"] == modes["naive"]["tokens"]


def test_decode_bench_refuses_unknown_modes_and_missing_text(tiny, tmp_path):
    with pytest.raises(SystemExit, match="unknown warp"):
        bench_decode.main([str(tiny), "--modes", "flash,warp"])
    with pytest.raises(SystemExit, match="no such file"):
        bench_decode.main([str(tiny), "--text", str(tmp_path / "none.txt")])
