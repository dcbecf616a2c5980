"""OpenAI's HTTP protocol for chat and text completions: request validation into typed parameters, the
response and stream-chunk shapes, errors in OpenAI's shape, and stop strings over streamed text. Plain
Python: no MLX, no model (tests/test_protocol.py exercises it alone)."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from starlette.responses import JSONResponse

DEFAULT_MAX_TOKENS = 512
ROLES = {"system", "developer", "user", "assistant", "tool"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self, headers: dict | None = None) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---- request validation ----------------------------------------------------------------------------


def bad(name: str, what: str) -> ApiError:
    return ApiError(400, f"'{name}' {what}", param=name, code="invalid_value")


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
    if isinstance(v, bool) or not ok:
        raise bad(name, "must be an integer" if integer else "must be a number")
    if not lo <= v <= hi:
        raise bad(name, f"must be within [{lo}, {hi}], got {v}")
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, "must be a boolean")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or len(items) > 16:
        raise bad("stop", "must be a string or a list of at most 16 strings")
    return [s for s in items if s]


@dataclass
class Params:
    """The generation settings of one request."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    penalties: dict = field(default_factory=dict)


def parse_params(body: dict, chat: bool) -> Params:
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise bad("n", "must be 1")
    max_tokens = _number(body, "max_completion_tokens", None, 1, 1 << 20, integer=True)
    max_tokens = _number(body, "max_tokens", max_tokens, 1, 1 << 20, integer=True)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    if chat:
        logprobs = _bool(body, "logprobs")
        top = _number(body, "top_logprobs", 0, 0, 20, integer=True)
    else:
        top = _number(body, "logprobs", None, 0, 5, integer=True)
        logprobs, top = top is not None, top or 0
    penalties = {
        "repetition_penalty": _number(body, "repetition_penalty", None, 0.01, 10.0),
        "presence_penalty": _number(body, "presence_penalty", None, -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", None, -2.0, 2.0),
    }
    return Params(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_number(body, "top_k", 0, 0, 1 << 20, integer=True),
        seed=_number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True),
        stop=_stop(body),
        stream=_bool(body, "stream"),
        include_usage=_bool(options or {}, "include_usage"),
        logprobs=logprobs,
        top_logprobs=top,
        penalties={k: v for k, v in penalties.items() if v},
    )


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None or isinstance(c, str):
        return c or ""
    if isinstance(c, list) and all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in c):
        return "".join(p.get("text", "") for p in c if p.get("type", "text") == "text")
    raise bad(f"messages[{i}].content", "must be a string or a list of text parts")


def parse_messages(body: dict) -> list[dict]:
    """The conversation for the chat template: role and content, plus an assistant's `tool_calls` (their
    JSON arguments decoded, as templates expect) and a tool message's `tool_call_id` and `name`."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise bad(f"messages[{i}]", f"must be an object with a role among {sorted(ROLES)}")
        role = "system" if m["role"] == "developer" else m["role"]
        msg = {"role": role, "content": _content(m, i)}
        if m.get("tool_calls") is not None and role == "assistant":
            msg["tool_calls"] = _history_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        for key in ("tool_call_id", "name"):
            if role == "tool" and isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    return out


def _history_calls(calls, name: str) -> list[dict]:
    if not isinstance(calls, list):
        raise bad(name, "must be a list")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise bad(f"{name}[{j}]", "must be an object with function.name")
        args = f.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise bad(f"{name}[{j}].function.arguments", "must be a JSON string") from None
        call = {"type": "function", "function": {"name": f["name"], "arguments": args}}
        out.append({"id": c["id"], **call} if isinstance(c.get("id"), str) else call)
    return out


@dataclass
class ToolSpec:
    """A request's tools: the list the chat template gets (None: no tools) and `tool_choice`."""

    tools: list[dict] | None = None
    choice: str | dict = "auto"


def parse_tools(body: dict) -> ToolSpec:
    """`tools` (a list of {type: "function", function: {name, parameters?}}) and `tool_choice` ("none",
    "auto", "required" or {type: "function", function: {name}}); "none" passes no tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("tools", "must be a list")
        for i, t in enumerate(tools):
            _check_tool(t, f"tools[{i}]")
    choice = "auto" if choice is None else choice
    names = {t["function"]["name"] for t in tools or []}
    if isinstance(choice, dict):
        f = choice.get("function")
        if choice.get("type") != "function" or not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise bad("tool_choice", "must be 'none', 'auto', 'required' or {type: 'function', function: {name}}")
        if f["name"] not in names:
            raise bad("tool_choice", f"names the function '{f['name']}', which is not among the tools")
    elif choice not in ("none", "auto", "required"):
        raise bad("tool_choice", "must be 'none', 'auto', 'required' or {type: 'function', function: {name}}")
    if choice == "required" and not names:
        raise bad("tool_choice", "is 'required' but there are no tools")
    return ToolSpec(None if choice == "none" else tools or None, choice)


def _check_tool(t, name: str) -> None:
    f = t.get("function") if isinstance(t, dict) else None
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
        raise bad(name, "must be {type: 'function', function: {name, parameters?}}")
    if not isinstance(f.get("name"), str) or not f["name"]:
        raise bad(f"{name}.function.name", "must be a non-empty string")
    if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
        raise bad(f"{name}.function.parameters", "must be a JSON schema object")


JSON_INSTRUCTION = "Answer with a single valid JSON object only: no prose, no code fences."


@dataclass
class ResponseFormat:
    """`response_format`: "text", "json_object" or "json_schema" (with its schema, when given)."""

    kind: str = "text"
    schema: dict | None = None

    @property
    def json(self) -> bool:
        return self.kind != "text"

    def instruction(self) -> str:
        if self.schema is None:
            return JSON_INSTRUCTION
        return f"{JSON_INSTRUCTION} It must match this JSON schema: {json.dumps(self.schema)}"


def parse_response_format(body: dict) -> ResponseFormat:
    rf = body.get("response_format")
    if rf is None:
        return ResponseFormat()
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise bad("response_format", "must be {type: 'text' | 'json_object' | 'json_schema'}")
    if kind != "json_schema":
        return ResponseFormat(kind)
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad("response_format.json_schema", "must be an object with a name (and a schema)")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise bad("response_format.json_schema.schema", "must be a JSON schema object")
    return ResponseFormat(kind, schema)


def with_instruction(messages: list[dict], text: str) -> list[dict]:
    """`messages` with `text` added to the system message (a new first one when there is none)."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}".strip()}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def parse_prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
        return p
    raise bad("prompt", "must be a non-empty string, a list of one string, or a list of token ids")


# ---- streamed text and responses ------------------------------------------------------------


class StopScanner:
    """Finds stop strings in streamed text; holds back a tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent = stops, "", 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached)."""
        self.text += piece
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            end, hit = min(hits), True
        else:
            end, hit = len(self.text) - self._held(), False
        out, self.sent = self.text[self.sent : max(end, self.sent)], max(end, self.sent)
        return out, hit

    def _held(self) -> int:
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


@dataclass
class Event:
    """One step of a generation, as the HTTP side sends it."""

    text: str
    finish_reason: str | None = None
    logprobs: list[dict] | None = None  # one entry per token of this step
    usage: dict | None = None
    error: ApiError | None = None
    tool_calls: list[dict] | None = None  # OpenAI's tool-call objects finished in this step


class Shape:
    """OpenAI's response objects for chat.completion(.chunk) and text_completion."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _logprobs(self, entries: list[dict] | None):
        if entries is None:
            return None
        if self.chat:
            return {"content": [_chat_logprob(e) for e in entries]}
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top", [])} for e in entries],
            "text_offset": [],
        }

    def chunk(self, event: Event, first: bool = False) -> dict:
        lp = self._logprobs(event.logprobs)
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": event.text} if event.text else {})
            if event.tool_calls:
                delta["tool_calls"] = event.tool_calls
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": event.finish_reason}
        else:
            choice = {"index": 0, "text": event.text, "logprobs": lp, "finish_reason": event.finish_reason}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head(True), "choices": [], "usage": usage}

    def whole(self, events: list[Event]) -> dict:
        text = "".join(e.text for e in events)
        last = events[-1] if events else Event("", "stop", usage={})
        entries = [x for e in events for x in (e.logprobs or [])] if any(e.logprobs for e in events) else None
        lp = self._logprobs(entries)
        if self.chat:
            calls = [c for e in events for c in (e.tool_calls or [])]
            message = {"role": "assistant", "content": (text or None) if calls else text}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "logprobs": lp}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp}
        choice["finish_reason"] = last.finish_reason
        return {**self._head(False), "choices": [choice], "usage": last.usage}


def _chat_logprob(e: dict) -> dict:
    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {**one(e["token"], e["logprob"]), "top_logprobs": [one(t["token"], t["logprob"]) for t in e.get("top", [])]}
