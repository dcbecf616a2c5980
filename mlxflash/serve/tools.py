"""Tool calls and JSON answers in chat completions, on mlx-lm's own pieces: the tokenizer's
`tool_call_start`/`tool_call_end` markers and `tool_parser` (mlx_lm.tool_parsers), and mlx-lm's server's
`ToolCallFormatter` for OpenAI's tool-call objects. `ToolScanner` splits streamed text into content and
tool calls; `json_answer` repairs a `json_object` answer (no constrained decoding: a prompt and a repair)."""

from __future__ import annotations

import json
from dataclasses import replace

from mlx_lm.server import ToolCallFormatter
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .protocol import Event, ResponseFormat


class Reply:
    """One chat answer's events reshaped: with tools, the tool calls split out of the text and the finish
    reason "tool_calls" after one; with a JSON `response_format`, a whole answer repaired by `json_answer`."""

    def __init__(self, tokenizer: TokenizerWrapper, tools: list[dict] | None, fmt: ResponseFormat, streaming: bool):
        self.scanner = ToolScanner(tokenizer, tools, streaming) if tools else None
        self.fmt = fmt

    def step(self, event: Event) -> Event:
        if self.scanner is None:
            return event
        text, calls = self.scanner.feed(event.text)
        finish = event.finish_reason
        if finish:
            rest, more = self.scanner.flush()
            text, calls = text + rest, calls + more
            finish = "tool_calls" if self.scanner.made and finish == "stop" else finish
        return replace(event, text=text, finish_reason=finish, tool_calls=calls or None)

    def whole(self, events: list[Event]) -> list[Event]:
        """A whole answer's events; a JSON answer's text, repaired, on the last one."""
        if not self.fmt.json or not events:
            return events
        text = json_answer("".join(e.text for e in events))
        return [*(replace(e, text="") for e in events[:-1]), replace(events[-1], text=text)]


class ToolScanner:
    """Streamed text in, (content text, finished tool calls) out: the text between the tokenizer's
    tool-call markers goes to its parser; a tail that may begin a start marker is held back."""

    def __init__(self, tokenizer: TokenizerWrapper, tools: list[dict], streaming: bool):
        self.start, self.end = tokenizer.tool_call_start, tokenizer.tool_call_end
        self.format = ToolCallFormatter(tokenizer.tool_parser, tools, streaming)
        self.buffer, self.inside, self.made = "", False, False

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        self.buffer += piece
        text, calls = "", []
        while True:
            mark = self.end if self.inside else self.start
            at = self.buffer.find(mark)
            if at < 0:
                break
            if self.inside:
                calls += self.format([self.buffer[:at]])
            else:
                text += self.buffer[:at]
            self.buffer, self.inside = self.buffer[at + len(mark) :], not self.inside
        if not self.inside:
            keep = _partial_tail(self.buffer, self.start)
            text, self.buffer = text + self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        self.made = self.made or bool(calls)
        return text, calls

    def flush(self) -> tuple[str, list[dict]]:
        """At the end: a call left open is parsed if it can be (mlx-lm's server does the same)."""
        rest, self.buffer = self.buffer, ""
        if not self.inside:
            return rest, []
        calls = self.format([rest])
        self.made = self.made or bool(calls)
        return "", calls


def _partial_tail(text: str, mark: str) -> int:
    for k in range(min(len(mark) - 1, len(text)), 0, -1):
        if text.endswith(mark[:k]):
            return k
    return 0


def json_answer(text: str) -> str:
    """`text` when it is valid JSON, else its first {...} block that is, else `text` unchanged."""
    try:
        json.loads(text)
        return text
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for at in (i for i, c in enumerate(text) if c == "{"):
        try:
            obj, end = decoder.raw_decode(text, at)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return text[at:end]
    return text
