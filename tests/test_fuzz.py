"""Fuzzing with hypothesis (bounded): a bundle with random byte flips or truncations in any of its files is
refused at load with a message naming that file; the HTTP API answers any JSON shape or type with a 2xx or
4xx (never a 500) and keeps serving. MLXFLASH_FUZZ_SCALE=N tries N times as many inputs (CI: 1)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from loopback import post, serving
from tiny import make_hf_dir

import mlxflash
from mlxflash.errors import MlxflashError
from mlxflash.format.bundle import Bundle

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
SCALE = int(os.environ.get("MLXFLASH_FUZZ_SCALE", "1"))  # a longer fuzz than CI's, when asked
FILES = ["config.json", "ffn.bin", "resident.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    src = make_hf_dir(root / "src")
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": TEMPLATE}))
    return mlxflash.convert(src, root / "bundle", bits=4, group_size=32, progress=False)


def test_every_file_is_checksummed(tiny_bundle):
    listed = set(Bundle.open(tiny_bundle).spec.files) | {"config.json"}
    assert sorted(p.name for p in tiny_bundle.iterdir()) == sorted(listed) == sorted(FILES)


@settings(max_examples=60 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(FILES),
    where=st.floats(0, 1, exclude_max=True),
    how=st.sampled_from(["flip", "truncate"]),
    mask=st.integers(1, 255),
)
def test_damaged_bundle_is_refused_naming_the_file(tiny_bundle, tmp_path_factory, name, where, how, mask):
    copy = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("damaged") / "b"))
    data = bytearray((copy / name).read_bytes())
    at = int(where * len(data))
    if how == "flip":
        data[at] ^= mask
    else:
        del data[at:]
    (copy / name).write_bytes(bytes(data))
    assume(name != "config.json" or not _same_json(bytes(data), (tiny_bundle / name).read_bytes()))
    with pytest.raises(MlxflashError) as e:
        model, _ = mlxflash.load(copy, mode="resident")
        model.flash.close()
    assert name in str(e.value), (how, at, str(e.value))


def _same_json(damaged: bytes, original: bytes) -> bool:
    """The manifest is not checksummed (it holds the checksums): cutting only its trailing newline is no damage."""
    try:
        return json.loads(damaged) == json.loads(original)
    except ValueError:
        return False


# ---- the HTTP API ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_port(tiny_bundle):
    with serving(tiny_bundle, mode="resident") as port:
        yield port


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "robot"]) | json_values},
    optional={"content": st.text(max_size=40) | json_values, "name": json_values, "tool_calls": json_values},
)
fields = {
    "model": st.sampled_from(["tiny", "default", "other"]) | json_values,
    "messages": st.lists(message, max_size=3) | json_values,
    "prompt": st.text(max_size=40) | st.lists(st.integers(-3, 300), max_size=6) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-1, 2) | json_values,
    "top_k": st.integers(-2, 50) | json_values,
    "seed": st.integers(-(1 << 65), 1 << 65) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3) | json_values,
    "logprobs": st.booleans() | st.integers(-1, 6) | json_values,
    "top_logprobs": st.integers(-1, 25) | json_values,
    "n": st.integers(0, 3) | json_values,
    "presence_penalty": st.floats(-3, 3) | json_values,
    "repetition_penalty": st.floats(-1, 11) | json_values,
}
bodies = st.fixed_dictionaries(
    {"max_tokens": st.integers(-2, 3) | json_values},  # always there: a valid request generates at most 3 tokens
    optional=fields,
)


@settings(max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=bodies)
def test_api_never_answers_500(api_port, path, body):
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 3:
        body["max_tokens"] = 3
    try:
        raw = json.dumps(body, allow_nan=True).encode()
    except (ValueError, OverflowError):
        return
    status, answer = post(api_port, path, raw)
    assert status in (200, 400, 404, 413, 422), (status, answer, body)
    if status != 200:
        assert isinstance(answer, dict) and isinstance(answer["error"]["message"], str) and answer["error"]["message"]


@settings(max_examples=60 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_api_refuses_arbitrary_bytes_with_400(api_port, raw):
    status, answer = post(api_port, "/v1/chat/completions", raw)
    assert status == 400 and answer["error"]["code"] in ("invalid_json", "invalid_value"), (raw, answer)


def test_api_keeps_serving_after_the_fuzz(api_port):
    body = {"prompt": "abc", "max_tokens": 2, "temperature": 0}
    status, answer = post(api_port, "/v1/completions", json.dumps(body).encode())
    assert status == 200 and answer["usage"]["completion_tokens"] == 2
