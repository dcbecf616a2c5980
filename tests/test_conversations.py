"""Several conversations and the KV cache in the budget, on a tiny random model served on loopback:
alternating conversations keep their prefixes (mlx-lm's LRU prompt cache, `cached_tokens`), a request past
`--max-kv-size` gets a 400 naming it, the planner reserves the KV cache and refuses a budget that cannot
hold it with the smallest workable figure, and `--kv-bits` stores it quantized."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import pytest
from loopback import get, post, serving
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache, make_prompt_cache
from tiny import make_hf_dir

import mlxflash
from mlxflash.errors import UsageError
from mlxflash.runtime.kv import kv_bytes_per_token, make_kv_cache
from mlxflash.serve.session import Session

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
MAX_KV = 2048  # the KV reservation: a few short conversations (each allocates in 256-token steps)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversations")
    src = make_hf_dir(root / "src", {"max_position_embeddings": 4096})
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": TEMPLATE}))
    return mlxflash.convert(src, root / "bundle", bits=4, group_size=32, progress=False)


@pytest.fixture(scope="module")
def port(bundle):
    with serving(bundle, mode="resident", max_kv_size=MAX_KV) as port:
        yield port


def _turn(port: int, history: list[dict], text: str) -> dict:
    history.append({"role": "user", "content": text})
    status, r = post(port, "/v1/chat/completions", {"messages": history, "max_tokens": 2, "temperature": 0})
    assert status == 200, r
    history.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
    return r["usage"]


def test_two_alternating_conversations_keep_their_prefixes(port):
    a, b = [], []
    first_a = _turn(port, a, "a long first question about maps and the sea " * 6)
    first_b = _turn(port, b, "another conversation, on bread and ovens, " * 6)
    assert first_a["prompt_tokens_details"]["cached_tokens"] == 0
    assert first_b["prompt_tokens_details"]["cached_tokens"] < 8  # at most the template's shared start
    second_a = _turn(port, a, "and?")
    second_b = _turn(port, b, "so?")
    for usage in (second_a, second_b):  # each switch found its own history in the LRU prompt cache
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 0.9 * usage["prompt_tokens"], usage
    status, stats = get(port, "/v1/stats")
    assert status == 200 and stats["prompt_cache"]["conversations"] >= 2  # (stale turns go when bytes run out)
    assert 0 < stats["prompt_cache"]["bytes"] <= stats["runtime"]["kv_reserved_bytes"]
    status, metrics = get(port, "/metrics")
    values = dict(line.split() for line in metrics.splitlines() if not line.startswith("#"))
    assert int(values["llamacpp:n_decode_total"]) == stats["requests_served"] == 4
    assert int(values["mlxflash_prompt_cached_tokens_total"]) == sum(
        u["prompt_tokens_details"]["cached_tokens"] for u in (first_a, first_b, second_a, second_b)
    )
    last = stats["requests"][-1]
    assert (last["prompt_tokens"], last["cached_tokens"]) == (
        second_b["prompt_tokens"],
        second_b["prompt_tokens_details"]["cached_tokens"],
    )


def test_a_request_past_max_kv_size_gets_400_naming_it(port):
    status, r = post(port, "/v1/completions", {"prompt": "x" * (MAX_KV - 4), "max_tokens": 8})
    assert status == 400 and r["error"]["code"] == "context_length_exceeded"
    assert f"--max-kv-size {MAX_KV}" in r["error"]["message"] and f"is {MAX_KV} tokens" in r["error"]["message"]
    status, r = post(port, "/v1/completions", {"prompt": "x" * (MAX_KV - 4), "max_tokens": 2})
    assert status == 200 and r["usage"]["prompt_tokens"] + 2 <= MAX_KV


def test_kv_bytes_per_token_float16_and_quantized(bundle):
    config = mlxflash.load(bundle, mode="resident")[0].flash.bundle.config
    values = 2 * 2 * 2 * 16  # keys and values, 2 layers, 2 KV heads, head_dim 64 / 4 heads
    assert kv_bytes_per_token(config, dtype_bytes=2) == values * 2
    assert kv_bytes_per_token(config, dtype_bytes=4, bits=8) == values + values // 64 * 8  # codes + scale, bias
    assert kv_bytes_per_token(config, dtype_bytes=2, bits=4) == values // 2 + values // 64 * 4


def test_kv_bytes_per_token_is_what_a_real_cache_takes(bundle):
    with Session(*mlxflash.load(bundle, mode="resident")) as sess:
        list(sess.stream("hello", max_tokens=1, temp=0))
        allocated = sum(c.keys.shape[2] for c in sess.cache) // len(sess.cache)  # tokens (256-token steps)
        assert sum(c.nbytes for c in sess.cache) == allocated * kv_bytes_per_token(sess.model.flash.bundle.config)


def test_planner_reserves_the_kv_cache_and_names_the_smallest_budget(bundle):
    config = mlxflash.load(bundle, mode="resident")[0].flash.bundle.config
    per_token = kv_bytes_per_token(config, dtype_bytes=2)  # a budgeted cache stores float16
    with pytest.raises(UsageError) as e:
        mlxflash.load(bundle, mode="flash", selector="all", memory="60%", max_kv_size=MAX_KV)
    message = str(e.value)
    assert "KV cache 0.5 MB for --max-kv-size" in message, message
    smallest = float(re.search(r"smallest workable budget is about ([\d.]+) MB", message).group(1)) * 1e6
    model, _ = mlxflash.load(bundle, mode="flash", selector="all", memory=int(smallest + 1e5), max_kv_size=MAX_KV)
    plan = model.flash.plan
    assert plan.kv_bytes == MAX_KV * per_token
    assert plan.planned_bytes <= plan.budget and plan.capacity == plan.neurons
    model.flash.close()


def test_kv_bits_needs_a_head_dim_it_can_group(bundle):
    with pytest.raises(UsageError, match="head_dim 16 is not a multiple of 32"):
        mlxflash.load(bundle, mode="resident", kv_bits=8)


def test_kv_bits_runs_on_a_quantized_cache_and_max_kv_size_on_a_rotating_one(tmp_path):
    wide = mlxflash.convert(make_hf_dir(tmp_path / "src", {"hidden_size": 128}), tmp_path / "b", progress=False)
    for kw, kind in (({"kv_bits": 8}, QuantizedKVCache), ({"max_kv_size": 64}, RotatingKVCache)):
        with Session(*mlxflash.load(wide, mode="resident", **kw)) as sess:
            out = list(sess.stream("hello there", max_tokens=3, temp=0))
            assert len(out) == 3 and isinstance(sess.cache[0], kind)
            assert sess.cache[0].offset == len(sess.cache_tokens)


def test_a_budgeted_kv_cache_is_float16_at_the_size_planned_and_attends_as_float32(bundle):
    model, tokenizer = mlxflash.load(bundle, mode="resident", max_kv_size=MAX_KV)
    plan = model.flash.kv
    assert plan.half == (mx.default_device() == mx.cpu) and "float16" in plan.describe()
    with Session(model, tokenizer) as sess:
        list(sess.stream("hello there", max_tokens=3, temp=0))
        allocated = sum(c.keys.shape[2] for c in sess.cache) // len(sess.cache)
        assert {c.keys.dtype for c in sess.cache} == {mx.float16}
        assert sum(c.nbytes for c in sess.cache) == allocated * plan.bytes_per_token
    tokens = mx.array([[1, 5, 9, 13, 17, 21, 25, 29]])
    half, full = make_kv_cache(model, plan), make_prompt_cache(model)  # float16-stored vs float32 cache
    for step in (tokens, tokens[:, -1:]):  # a prompt, then one decode step
        a, b = model(step, cache=half), model(step, cache=full)
        assert a.dtype == b.dtype == mx.float32
        assert mx.abs(a - b).max().item() < 1e-2 * mx.abs(b).max().item()
