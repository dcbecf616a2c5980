"""Tools, response_format and model switching in the HTTP API, on tiny random bundles whose chat template
renders tools the Hermes way (so mlx-lm's tokenizer infers its `json_tools` parser). A random model emits no
tool call, so the tool-call tests script the model's text at the token-stream boundary (Session.stream);
the template, the HTTP layer, mlx-lm's parser and the response assembly are the real ones, talked to with
the official `openai` client."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from loopback import get, post, serving_engine
from tiny import make_hf_dir

import mlxflash
from mlxflash.serve.generate import Response
from mlxflash.serve.models import Catalog
from mlxflash.serve.protocol import JSON_INSTRUCTION
from mlxflash.serve.session import Session

openai = pytest.importorskip("openai")

TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% for tool_call in m.tool_calls or [] %}{% set tool_call = tool_call.function %}"
    "<tool_call>{{ tool_call.name }}</tool_call>{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = [
    "Let me check. ",
    "<tool",
    "_call>",
    '{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}',
    "</tool_call>",
]
Q = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models dir with two bundles: tiny-a, and tiny-b (a link to it, under another name)."""
    root = tmp_path_factory.mktemp("tools")
    src = make_hf_dir(root / "src", {"max_position_embeddings": 1024})
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": TEMPLATE}))
    models = root / "models"
    mlxflash.convert(src, models / "tiny-a", bits=4, group_size=32, progress=False)
    (models / "tiny-b").symlink_to(models / "tiny-a")
    (models / "not-a-bundle").mkdir()
    return models


@pytest.fixture(scope="module")
def served(models):
    catalog = Catalog(models, {"mode": "resident"})
    with serving_engine(models / "tiny-a", "tiny-a", catalog, mode="resident") as (port, engine):
        yield port, engine


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[0]}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture
def scripted(monkeypatch):
    """Make the model "say" the given text pieces; returns the list of prompts it was given (decoded)."""
    prompts: list[str] = []

    def script(pieces: list[str]) -> list[str]:
        def stream(self, prompt, max_tokens=256, **kw):
            prompts.append(self.tokenizer.decode(list(prompt)))
            self.reused_tokens = 0
            for i, piece in enumerate(pieces):
                finish = "stop" if i == len(pieces) - 1 else None
                yield Response(piece, 0, mx.zeros((1,)), len(prompt), i + 1, finish, {})

        monkeypatch.setattr(Session, "stream", stream)
        return prompts

    return script


def _chat(client, **kw):
    return client.chat.completions.create(model="tiny-a", messages=Q, max_tokens=16, **kw)


def test_the_tokenizer_has_mlx_lms_json_tools_parser(served):
    tok = served[1].tokenizer
    assert tok.has_tool_calling and (tok.tool_call_start, tok.tool_call_end) == ("<tool_call>", "</tool_call>")


def test_tool_call_whole(client, scripted):
    prompts = scripted(CALL)
    r = _chat(client, tools=[WEATHER])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check. "
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert "<tools>get_weather;</tools>" in prompts[-1]  # the chat template rendered the tools


def test_tool_call_streamed(client, scripted):
    scripted(CALL)
    chunks = list(_chat(client, tools=[WEATHER], tool_choice="auto", stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me check. "
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather")]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_no_tools_leaves_the_text_alone(client, scripted):
    scripted(CALL)
    r = _chat(client, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content == "".join(CALL) and r.choices[0].finish_reason == "stop"


def test_tool_results_in_the_history_reach_the_template(client, scripted):
    prompts = scripted(["It is sunny."])
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [
        *Q,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    r = client.chat.completions.create(model="tiny-a", messages=history, tools=[WEATHER], max_tokens=8)
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"
    assert "<assistant><tool_call>get_weather</tool_call><tool>sunny, 21 C" in prompts[-1]


def test_json_object_gets_an_instruction_and_a_repair(client, scripted):
    prompts = scripted(["Sure! ", '{"city": ', '"Paris"} hope that helps'])
    r = _chat(client, response_format={"type": "json_object"})
    assert json.loads(r.choices[0].message.content) == {"city": "Paris"}
    assert prompts[-1].startswith(f"<system>{JSON_INSTRUCTION}")
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
    assert _chat(client, response_format=schema).choices[0].message.content == '{"city": "Paris"}'
    assert _chat(client, response_format={"type": "text"}).choices[0].message.content.startswith("Sure! ")


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": "get_weather"}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tools": [{"type": "code", "function": {"name": "x"}}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, "tools[0].function.parameters"),
        ({"tools": [WEATHER], "tool_choice": "maybe"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}]},
            "messages[0].tool_calls[0]",
        ),
    ],
)
def test_bad_shapes_get_400_naming_the_field(served, extra, param):
    status, body = post(served[0], "/v1/chat/completions", {"messages": Q, "max_tokens": 2, **extra})
    assert status == 400 and body["error"]["param"] == param, body


def test_models_lists_the_bundles_and_switches(served, client, models):
    port, engine = served
    assert [m.id for m in client.models.list().data] == ["tiny-a", "tiny-b"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=Q, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "'gpt-9'" in e.value.body["message"]
    r = client.chat.completions.create(model="tiny-b", messages=Q, max_tokens=2, temperature=0)
    assert r.model == "tiny-b" and r.usage.completion_tokens >= 1
    assert get(port, "/health")[1]["model"] == "tiny-b"
    assert engine.session.model.flash.bundle.path == models / "tiny-b"
    assert [m.id for m in client.models.list().data] == ["tiny-b", "tiny-a"]
    text = client.completions.create(model="tiny-a", prompt="hi", max_tokens=2, temperature=0)
    assert text.model == "tiny-a" and engine.model_id == "tiny-a"


def test_a_model_that_fails_to_load_is_named_and_the_last_one_keeps_serving(served, client, models):
    port, engine = served
    broken = models / "tiny-broken"
    shutil.copytree(models / "tiny-a", broken)
    try:
        with open(broken / "ffn.bin", "r+b") as f:
            f.truncate(100)
        before = engine.model_id
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="tiny-broken", messages=Q, max_tokens=2)
        assert "'tiny-broken' failed to load" in e.value.body["message"] and "ffn.bin" in e.value.body["message"]
        assert engine.model_id == before and get(port, "/health")[1]["model"] == before
        r = client.chat.completions.create(messages=Q, max_tokens=2, temperature=0, model=before)
        assert r.model == before and r.usage.completion_tokens >= 1
    finally:
        shutil.rmtree(broken)


def test_the_catalog_reads_a_config_again_only_when_it_changes(models, monkeypatch):
    import mlxflash.serve.models as catalog_module

    reads: list[str] = []
    real = catalog_module.is_bundle
    monkeypatch.setattr(catalog_module, "is_bundle", lambda p: reads.append(p.name) or real(p))
    catalog = Catalog(models)
    assert list(catalog.bundles()) == ["tiny-a", "tiny-b"] and sorted(reads) == ["tiny-a", "tiny-b"]
    catalog.bundles()
    assert len(reads) == 2  # nothing changed: nothing read
    config = models / "tiny-a" / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    assert list(catalog.bundles()) == ["tiny-a", "tiny-b"] and len(reads) == 4  # tiny-b links to it


def test_the_default_models_template_has_no_tools(default_bundle):
    """SmolLM2-135M-Instruct's template ignores `tools` and mlx-lm finds no parser: tools there are a 400."""
    from mlx_lm.tokenizer_utils import load

    tok = load(Path(default_bundle))
    assert not tok.has_tool_calling and "tools" not in tok.chat_template


def _scanner(streaming: bool = True):
    from types import SimpleNamespace

    from mlx_lm.tool_parsers import json_tools

    from mlxflash.serve.tools import ToolScanner

    tok = SimpleNamespace(
        tool_call_start="<tool_call>", tool_call_end="</tool_call>", tool_parser=json_tools.parse_tool_call
    )
    return ToolScanner(tok, [WEATHER], streaming)


def test_scanner_holds_back_only_what_may_start_a_call():
    s = _scanner()
    assert s.feed("a < b <") == ("a < b ", [])
    assert s.feed("tool_call>") == ("", [])
    text, calls = s.feed('{"name": "f", "arguments": {}}</tool_call> after <t')
    assert text == " after " and [c["function"]["name"] for c in calls] == ["f"] and calls[0]["index"] == 0
    assert s.flush() == ("<t", []) and s.made


def test_scanner_parses_a_call_left_open_at_the_end():
    s = _scanner(streaming=False)
    assert s.feed('<tool_call>{"name": "f", "arguments": {"x": 1}}') == ("", [])
    (call,) = s.flush()[1]
    assert json.loads(call["function"]["arguments"]) == {"x": 1} and "index" not in call


def test_json_answer():
    from mlxflash.serve.tools import json_answer

    assert json_answer('{"a": [1, {"b": 2}]}') == '{"a": [1, {"b": 2}]}'
    assert json_answer('Here: {"a": {"b": "}"}} ok') == '{"a": {"b": "}"}}'
    assert json_answer('{broken {"ok": true}') == '{"ok": true}'
    assert json_answer("no json here") == "no json here"


def test_requests_for_both_models_at_once_each_get_theirs(served, client):
    from concurrent.futures import ThreadPoolExecutor

    def ask(model: str) -> str:
        return client.chat.completions.create(model=model, messages=Q, max_tokens=2, temperature=0).model

    names = ["tiny-a", "tiny-b", "tiny-a", "tiny-b", "tiny-b"]
    with ThreadPoolExecutor(len(names)) as pool:
        assert list(pool.map(ask, names)) == names
    assert get(served[0], "/v1/stats")[0] == 200
