"""Several conversations and the KV cache in the budget, on a tiny random model served on loopback:
alternating conversations keep their prefixes (mlx-lm's LRU prompt cache, `cached_tokens`), a request past
`--max-kv-size` gets a 400 naming it, the planner reserves the KV cache and refuses a budget that cannot
hold it with the smallest workable figure, and `--kv-bits` stores it quantized."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from loopback import get, post, serving
from mlx.utils import tree_flatten
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache, make_prompt_cache, trim_prompt_cache
from tiny import make_hf_dir

import mlxflash
from mlxflash.errors import UsageError
from mlxflash.runtime.kv import kv_bytes_per_token, kv_plan, make_kv_cache, prefill_step, step_scratch_bytes
from mlxflash.runtime.train import calibrate_gate
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


def test_step_scratch_bounds_what_a_forward_pass_allocates(bundle):
    model, _ = mlxflash.load(bundle, mode="resident", max_kv_size=MAX_KV)
    config = model.flash.bundle.config
    tokens = mx.array([[(7 * i) % 200 + 3 for i in range(1024)]])
    for context, step in ((1024, 256), (512, 512), (1024, 16)):
        cache = make_kv_cache(model, model.flash.kv)
        for lo in range(0, context - step, 256):
            model(tokens[:, lo : min(lo + 256, context - step)], cache=cache)
            mx.eval([c.state for c in cache])
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        model(tokens[:, :step], cache=cache)  # the logits are not evaluated, as in a prefill step
        mx.eval([c.state for c in cache])
        measured = mx.get_peak_memory() - before
        estimate = step_scratch_bytes(config, step, context)
        assert measured <= estimate < 4 * measured, (context, step, measured, estimate)


def test_prefill_step_is_the_largest_that_fits_the_compute_buffer(bundle):
    config = mlxflash.load(bundle, mode="resident")[0].flash.bundle.config
    assert prefill_step(config, 1000, step_scratch_bytes(config, 100, 1000)) == 100
    assert prefill_step(config, 1000, step_scratch_bytes(config, 100, 1000) - 1) == 99
    assert prefill_step(config, 1000, 0) == 512  # no bounded context: llama.cpp's batch
    assert prefill_step(config, 4000, 1) == 16  # never below the smallest step
    plan = kv_plan(config, MAX_KV, None)
    assert plan.buffer_bytes == step_scratch_bytes(config, 32, MAX_KV) and kv_plan(config, None, None).buffer_bytes == 0


def test_a_float16_bundle_in_memory_is_what_its_plan_says(tmp_path):
    """The CPU computes in float32, but quantization scales stay float16 (exact, runtime/dtypes.py): MLX
    holds no more than the plan counts, KV reservation apart."""
    src = make_hf_dir(tmp_path / "src", {"hidden_size": 256, "intermediate_size": 512, "vocab_size": 2048})
    b = mlxflash.convert(src, tmp_path / "b", bits=4, group_size=32, dtype="float16", progress=False)
    mx.clear_cache()
    before = mx.get_active_memory()
    model, _ = mlxflash.load(b, mode="flash", selector="all", memory="8MB", max_kv_size=256)
    plan = model.flash.plan
    held, planned = mx.get_active_memory() - before, plan.planned_bytes - plan.kv_bytes
    params = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert params <= plan.resident_bytes + plan.selector_bytes, (params, plan.resident_bytes)
    assert planned >= held >= plan.resident_bytes + plan.cache_bytes, (held, planned)
    assert model.lm_head["scales"].dtype == mx.float16  # (the untied input embedding streams: runtime/embedding.py)
    model.flash.close()


def test_a_kept_conversation_and_its_working_copy_share_memory(bundle):
    model, tokenizer = mlxflash.load(bundle, mode="resident", max_kv_size=MAX_KV)
    with Session(model, tokenizer) as sess:
        prompt = [(5 * i) % 200 + 3 for i in range(600)]
        first = [r.token for r in sess.stream(prompt, max_tokens=4, temp=0)]
        kept, snapshot = sess.kept_bytes, [np.array(c.keys) for c in sess.cache]  # sess.cache is the kept one
        mx.clear_cache()
        before = mx.get_active_memory()
        cache, rest = sess.prompt_cache.fetch_nearest_cache(sess.model_key, prompt + first)
        assert len(rest) == 0 and mx.get_active_memory() - before < kept / 10  # a view, not a copy
        trim_prompt_cache(cache, 100)
        for c in cache:  # the working copy writes over kept positions: the kept one must not see it
            c.update_and_fetch(mx.ones_like(c.keys[..., :1, :]), mx.ones_like(c.values[..., :1, :]))
        assert all(np.array_equal(np.array(c.keys), k) for c, k in zip(sess.cache, snapshot))
        again = [r.token for r in sess.stream(prompt, max_tokens=4, temp=0)]
        assert again == first and sess.reused_tokens == len(prompt) - 1


def test_a_budget_too_small_names_the_least_one_a_lower_density_would_take(tmp_path):
    src = make_hf_dir(tmp_path / "src", {"hidden_size": 256, "intermediate_size": 1024})
    b = mlxflash.convert(src, tmp_path / "b", bits=4, group_size=32, progress=False)
    (tmp_path / "text.txt").write_text(" ".join(f"word{i % 97} and more{i % 13}" for i in range(3000)))
    calibrate_gate(b, tmp_path / "text.txt", tokens=512, context=64)  # a selector that may be re-thresholded
    with pytest.raises(UsageError) as e:
        mlxflash.load(b, mode="flash", memory="0.5MB", max_kv_size=MAX_KV)
    found = re.search(r"about ([\d.]+) MB, or ([\d.]+) MB with the selector set to density 0.05", str(e.value))
    assert found and float(found.group(2)) < float(found.group(1)), str(e.value)
    model, _ = mlxflash.load(b, mode="flash", memory=int(float(found.group(2)) * 1e6 + 1e5), max_kv_size=MAX_KV)
    plan = model.flash.plan
    assert 0.05 <= plan.density < 0.5 and plan.planned_bytes <= plan.budget
    model.flash.close()
