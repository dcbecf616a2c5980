"""`mlxflash serve` on a loopback port, talked to with the official `openai` client (and raw HTTP for
what that client cannot send): chat and completions, streaming, stop strings, usage, queueing, client
disconnects, and OpenAI-shaped errors for bad input after which the server keeps serving."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from mlxflash.fetch.staging import models_dir
from mlxflash.serve.models import is_bundle

openai = pytest.importorskip("openai")

ORIGIN = "http://app.example"
Q = [{"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        try:
            data = json.loads(data)
        except ValueError:
            data = data.decode(errors="replace")
        return resp.status, dict(resp.getheaders()), data
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(default_bundle):
    port = _free_port()
    cmd = [sys.executable, "-m", "mlxflash.cli", "serve", "--model", str(default_bundle), "--port", str(port)]
    cmd += ["--max-queue", "2", "--allowed-origins", ORIGIN]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if _raw(port, "GET", "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read()
    else:
        proc.kill()
        pytest.fail("the server did not come up")
    yield port
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
    assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="none", max_retries=0, timeout=120)


def _chat(client, **kw):
    return client.chat.completions.create(model=kw.pop("model", "SmolLM2-135M-Instruct-Q4_1"), **kw)


def test_health_models_and_stats(server, client):
    assert _raw(server, "GET", "/health")[:1] == (200,)
    ids = [m.id for m in client.models.list().data]
    listed = sorted(p.name for p in models_dir().iterdir() if is_bundle(p))  # other bundles a user fetched too
    assert ids[0] == "SmolLM2-135M-Instruct-Q4_1" and sorted(ids) == listed
    status, _, before = _raw(server, "GET", "/v1/stats")
    assert status == 200 and before["mode"] == "resident" and before["model"] == ids[0]
    assert before["resident_bytes"] > 90e6  # the whole 98 MB model (its 52 MB resident part and the FFN)
    assert before["rss_bytes"] <= before["peak_rss_bytes"] and before["bytes_read_per_token"] == 0
    r = _chat(client, messages=Q, max_tokens=4, temperature=0)
    after = _raw(server, "GET", "/v1/stats")[2]
    assert after["requests_served"] == before["requests_served"] + 1
    assert after["tokens_generated"] == before["tokens_generated"] + r.usage.completion_tokens
    assert after["requests"][-1]["prompt_tokens"] == r.usage.prompt_tokens and after["tokens_per_s"] > 0
    assert after["queue_depth"] == 0 and after["busy"] is False


def test_chat_streaming_equals_whole(client):
    whole = _chat(client, messages=Q, max_tokens=8, temperature=0)
    text = whole.choices[0].message.content
    assert "Paris" in text and whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        _chat(client, messages=Q, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_completions_usage_and_length(client):
    prompt = [1, 504, 3575, 282, 4649, 314]  # token ids: usage counts them as given
    r = client.completions.create(model="SmolLM2-135M-Instruct-Q4_1", prompt=prompt, max_tokens=5, temperature=0)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == len(prompt) + 5
    text = "The capital of France is"
    whole = client.completions.create(model="SmolLM2-135M-Instruct-Q4_1", prompt=text, max_tokens=5, temperature=0)
    parts = client.completions.create(
        model="SmolLM2-135M-Instruct-Q4_1", prompt=text, max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text
    assert "Paris" in whole.choices[0].text


def test_stop_strings(client):
    full = _chat(client, messages=Q, max_tokens=8, temperature=0).choices[0].message.content
    assert " of " in full
    for stop in (" of", [" of", "zzz"]):
        r = _chat(client, messages=Q, max_tokens=8, temperature=0, stop=stop)
        assert r.choices[0].message.content == full[: full.index(" of")]
        assert r.choices[0].finish_reason == "stop"
    chunks = _chat(client, messages=Q, max_tokens=8, temperature=0, stop="capital", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full[: full.index("capital")]


def test_logprobs(client):
    r = _chat(client, messages=Q, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 3
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert content[0].top_logprobs[0].token == content[0].token  # greedy picks the most likely token


def test_eight_clients_at_once(server, client):
    expected = _chat(client, messages=Q, max_tokens=4, temperature=0).choices[0].message.content
    results: list = [None] * 8

    def ask(i: int) -> None:
        try:
            results[i] = _chat(client, messages=Q, max_tokens=4, temperature=0).choices[0].message.content
        except openai.APIStatusError as e:
            results[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a request hung"
    answered = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if not isinstance(r, str)]
    assert answered and all(a == expected for a in answered)
    for e in refused:
        assert e.status_code == 503 and int(e.response.headers["retry-after"]) >= 1
        assert e.body["type"] == "server_error" or e.body.get("code") == "server_busy"
    assert len(answered) >= 3  # one running and two waiting fit the queue
    assert _raw(server, "GET", "/health")[0] == 200


def test_disconnect_mid_stream_frees_the_server(server, client):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    body = {"messages": Q, "max_tokens": 400, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = 0
    while seen < 3:  # a few content chunks, then hang up
        line = resp.fp.readline()
        seen += line.startswith(b"data: ") and b'"content": "' in line and b'"content": ""' not in line
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    start = time.perf_counter()
    r = _chat(client, messages=Q, max_tokens=2, temperature=0)
    assert r.choices[0].message.content
    assert time.perf_counter() - start < 15  # 400 tokens would take about a minute here
    assert _raw(server, "GET", "/v1/stats")[2]["requests_cancelled"] >= 1


def test_disconnect_while_waiting_for_a_whole_answer(server, client):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    body = {"messages": Q, "max_tokens": 400, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    time.sleep(1.5)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    start = time.perf_counter()
    assert _chat(client, messages=Q, max_tokens=2, temperature=0).choices[0].message.content
    assert time.perf_counter() - start < 15


def _assert_error(status: int, body, expected: int) -> None:
    assert status == expected, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "payload, param",
    [
        ({"messages": Q, "max_tokens": "ten"}, "max_tokens"),
        ({"messages": Q, "temperature": "hot"}, "temperature"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": Q, "stream": "yes"}, "stream"),
        ({"messages": Q, "max_tokens": -1}, "max_tokens"),
        ({"messages": Q, "temperature": 7}, "temperature"),
        ({"messages": Q, "top_p": 1.5}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": Q, "max_tokens": 10_000}, "max_tokens"),
    ],
)
def test_bad_fields_get_400(server, payload, param):
    status, _, body = _raw(server, "POST", "/v1/chat/completions", json.dumps(payload).encode())
    _assert_error(status, body, 400)
    assert body["error"]["param"] == param
    assert _raw(server, "GET", "/health")[0] == 200


def test_invalid_json_gets_400(server):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, _, body = _raw(server, "POST", "/v1/chat/completions", raw)
        _assert_error(status, body, 400)
    assert _raw(server, "GET", "/health")[0] == 200


def test_negative_max_tokens_and_empty_messages_through_openai(client):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, messages=Q, max_tokens=-5)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        _chat(client, messages=[])


def test_unknown_model_gets_404(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, model="gpt-9", messages=Q, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    status, _, body = _raw(server, "GET", "/v1/nothing-here")
    _assert_error(status, body, 404)


def test_huge_body_gets_413(server, client):
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (3 << 20)}]}).encode()
    status, _, body = _raw(server, "POST", "/v1/chat/completions", huge)
    _assert_error(status, body, 413)
    assert _chat(client, messages=Q, max_tokens=1, temperature=0).choices[0].message.content


def test_cors_for_allowed_origins_only(server):
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    status, headers, _ = _raw(server, "OPTIONS", "/v1/chat/completions", headers=pre)
    assert status == 200 and headers.get("access-control-allow-origin") == ORIGIN
    status, headers, _ = _raw(server, "GET", "/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in headers}


def test_flash_mode_serves_with_live_figures(default_bundle):
    """The same server in flash mode (the whole FFN as the neuron cache, so it runs on any bundle)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlxflash.cli", "serve", "--model", str(default_bundle), "--port", str(port)]
    cmd += ["--mode", "flash", "--selector", "all"]  # no budget: the cache holds the whole FFN
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                if _raw(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        body = {"messages": Q, "max_tokens": 3, "temperature": 0}
        status, _, r = _raw(port, "POST", "/v1/chat/completions", json.dumps(body).encode())
        assert status == 200 and r["usage"]["completion_tokens"] == 3
        stats = _raw(port, "GET", "/v1/stats")[2]
        assert stats["mode"] == "flash" and stats["runtime"]["selector"] == "all"
        assert stats["runtime"]["cache_capacity"] == 1536  # no budget: the whole FFN width is the cache
        # 3 tokens, all neurons selected: after the prompt's dense pass the 2 decode steps hit the cache
        assert stats["cache_hit_rate"] > 0.5, stats
        assert stats["bytes_read_per_token"] < stats["ffn_bytes"] / 2
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "flash mode" in out and "Traceback" not in out, out


def test_next_turn_reports_its_cached_prompt_tokens(client):
    first = _chat(client, messages=Q, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    follow = [*Q, {"role": "assistant", "content": first.choices[0].message.content}]
    second = _chat(
        client, messages=[*follow, {"role": "user", "content": "And of Germany?"}], max_tokens=4, temperature=0
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens  # the whole first turn, not the new one
