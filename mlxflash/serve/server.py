"""`mlxflash serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn) for one model.

Requests run one at a time, in arrival order, on one worker thread; a bounded number wait, the rest get
503 with Retry-After. The KV cache is kept between requests and a prompt that shares a prefix with the
last one (the next turn of a chat) only computes what is new.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import UsageError
from ..options import add_model_options, model_options
from ..runtime.report import load_report
from ..runtime.stats import current_rss_bytes, peak_rss_bytes
from .generate import encode_prompt
from .session import Session, session

log = logging.getLogger("mlxflash.server")
MAX_BODY = 1 << 20  # bytes of a request body
DRAIN_LIMIT = 64 << 20  # an oversized body is read and dropped up to this, so the client sees the 413
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


def _bad(name: str, what: str) -> ApiError:
    return ApiError(400, f"'{name}' {what}", param=name, code="invalid_value")


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
    if isinstance(v, bool) or not ok:
        raise _bad(name, "must be an integer" if integer else "must be a number")
    if not lo <= v <= hi:
        raise _bad(name, f"must be within [{lo}, {hi}], got {v}")
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, "must be a boolean")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or len(items) > 16:
        raise _bad("stop", "must be a string or a list of at most 16 strings")
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
        raise _bad("n", "must be 1")
    max_tokens = _number(body, "max_completion_tokens", None, 1, 1 << 20, integer=True)
    max_tokens = _number(body, "max_tokens", max_tokens, 1, 1 << 20, integer=True)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
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
    raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"messages[{i}]", f"must be an object with a role among {sorted(ROLES)}")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m, i)})
    return out


def parse_prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
        return p
    raise _bad("prompt", "must be a non-empty string, a list of one string, or a list of token ids")


# ---- generation ---------------------------------------------------------------------------------------


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


@dataclass
class Job:
    tokens: list[int]
    params: Params
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)

    def put(self, event: Event | None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """The model, its kept KV cache, the one worker thread and the live figures."""

    def __init__(self, sess: Session, model_id: str, max_queue: int, worker: ThreadPoolExecutor | None = None):
        self.session, self.model_id, self.max_queue = sess, model_id, max_queue
        self.worker = worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxflash-gen")
        self.pending = 0  # admitted and not finished (the running one included); event-loop thread only
        self.served = self.rejected = self.cancelled = self.tokens = self.tokens_decoded = 0
        self.decode_s = 0.0
        self.last: dict = {}
        self.created = int(time.time())

    @property
    def tokenizer(self):
        return self.session.tokenizer

    def context_length(self) -> int | None:
        return self.session.model.flash.context_length

    def submit(self, job: Job) -> None:
        """Queue a job, or raise a 503 ApiError when the queue is full."""
        if self.pending > self.max_queue:
            self.rejected += 1
            raise ApiError(503, "the server is busy: too many requests waiting", code="server_busy")
        self.pending += 1
        fut = self.worker.submit(self._run, job)
        fut.add_done_callback(lambda _: job.loop.call_soon_threadsafe(self._finished))

    def _finished(self) -> None:
        self.pending -= 1

    def retry_after(self) -> int:
        return max(1, self.pending * 2)

    def _run(self, job: Job) -> None:
        try:
            if not job.cancel.is_set():
                for event in self._generate(job):
                    job.put(event)
                    if job.cancel.is_set():
                        self.cancelled += 1
                        break
        except UsageError as e:
            job.put(Event("", error=ApiError(400, str(e), code="context_length_exceeded")))
        except Exception:
            log.exception("generation failed")
            job.put(Event("", error=ApiError(500, "internal error during generation")))
        finally:
            job.put(None)

    def _generate(self, job: Job) -> Iterator[Event]:
        p, scanner, n = job.params, StopScanner(job.params.stop), 0
        kw = {"temp": p.temperature, "top_p": p.top_p if p.top_p < 1 else 0.0, "top_k": p.top_k, "seed": p.seed}
        if p.seed is not None:
            kw["seed"] = p.seed % (1 << 64)
        if p.penalties:
            kw["logits_processors"] = make_logits_processors(**p.penalties)
        for r in self.session.stream(job.tokens, max_tokens=p.max_tokens, **kw):
            n += 1
            text, hit = scanner.feed(r.text)
            finish = "stop" if hit else r.finish_reason
            if finish and not hit:
                text += scanner.flush()
            lp = [self._logprobs(r, p.top_logprobs)] if p.logprobs else None
            usage = self._usage(job, n, r.stats) if finish else None
            yield Event(text, finish, lp, usage)
            if finish:
                return

    def _usage(self, job: Job, n: int, stats: dict) -> dict:
        self.served += 1
        self.tokens += n
        if stats.get("tokens_per_s"):  # decode steps only: the first token carries the prompt
            self.tokens_decoded += stats["tokens"]
            self.decode_s += stats["tokens"] / stats["tokens_per_s"]
        self.last = {**stats, "prompt_tokens_reused": self.session.reused_tokens}
        return {"prompt_tokens": len(job.tokens), "completion_tokens": n, "total_tokens": len(job.tokens) + n}

    def _logprobs(self, r, top: int) -> dict:
        lp = r.logprobs
        entry = {"token": self.tokenizer.decode([r.token]), "id": r.token, "logprob": lp[r.token].item()}
        if top:
            ids = mx.argpartition(-lp, top - 1)[:top]
            vals = lp[ids]
            pairs = sorted(zip(ids.tolist(), vals.tolist()), key=lambda x: -x[1])
            entry["top"] = [{"token": self.tokenizer.decode([i]), "logprob": v} for i, v in pairs]
        return entry

    def stats(self) -> dict:
        rt = self.session.model.flash
        last = self.last
        out = {
            "model": self.model_id,
            "mode": rt.mode,
            "requests_served": self.served,
            "requests_rejected": self.rejected,
            "requests_cancelled": self.cancelled,
            "queue_depth": max(0, self.pending - 1),
            "busy": self.pending > 0,
            "tokens_generated": self.tokens,
            "tokens_per_s": last.get("tokens_per_s", 0.0),
            "avg_tokens_per_s": self.tokens_decoded / self.decode_s if self.decode_s else 0.0,
            "bytes_read_per_token": last.get("bytes_read_per_token", 0.0),
            "resident_bytes": rt.resident_bytes,
            "ffn_bytes": rt.ffn_bytes,
            "rss_bytes": current_rss_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
            "kv_cache_tokens": len(self.session.cache_tokens),
            "last_request": last,
        }
        if "cache_hit_rate" in last:
            out["cache_hit_rate"] = last["cache_hit_rate"]
        if hasattr(rt, "live"):  # the flash runtime's plan and neuron-cache figures
            out["runtime"] = rt.live()
        return out


# ---- HTTP ----------------------------------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object; 413 over `limit` bytes, 400 when it is not a JSON object."""
    size, chunks, over = 0, [], False
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_LIMIT:
        raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    async for chunk in request.stream():
        size += len(chunk)
        over = over or size > limit
        if size > DRAIN_LIMIT:
            break
        if not over:
            chunks.append(chunk)
    if over:
        raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


class Api:
    """The routes; one Engine behind them."""

    def __init__(self, engine: Engine, max_body: int = MAX_BODY):
        self.engine, self.max_body = engine, max_body

    def _check_model(self, body: dict) -> str:
        model = body.get("model")
        if model is None or model in ("", self.engine.model_id, "default"):
            return self.engine.model_id
        if not isinstance(model, str):
            raise _bad("model", "must be a string")
        raise ApiError(
            404,
            f"the model '{model}' does not exist; this server has '{self.engine.model_id}'",
            param="model",
            code="model_not_found",
        )

    def _fit(self, tokens: list[int], params: Params) -> None:
        context = self.engine.context_length()
        room = context - len(tokens) if context else None
        if params.max_tokens is None:
            params.max_tokens = DEFAULT_MAX_TOKENS if room is None else min(DEFAULT_MAX_TOKENS, room)
        if room is not None and (room < 1 or params.max_tokens > room):
            raise ApiError(
                400,
                f"the prompt is {len(tokens)} tokens and max_tokens is {params.max_tokens}, "
                f"but the model's context is {context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )

    async def chat(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        model = self._check_model(body)
        messages, params = parse_messages(body), parse_params(body, chat=True)
        try:
            tokens = list(self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except Exception as e:  # the template rejects this conversation (e.g. the roles' order)
            raise ApiError(400, f"the chat template rejects these messages: {e}", param="messages") from None
        return await self._respond(request, tokens, params, model, chat=True)

    async def completions(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        model = self._check_model(body)
        prompt, params = parse_prompt(body), parse_params(body, chat=False)
        vocab = self.engine.session.model.flash.bundle.config.get("vocab_size")
        if isinstance(prompt, list) and vocab and max(prompt) >= vocab:
            raise _bad("prompt", f"has token ids beyond the vocabulary ({vocab})")
        tokens = encode_prompt(self.engine.tokenizer, prompt)
        return await self._respond(request, tokens, params, model, chat=False)

    async def _respond(self, request: Request, tokens: list[int], params: Params, model: str, chat: bool) -> Response:
        self._fit(tokens, params)
        loop = asyncio.get_running_loop()
        job = Job(tokens, params, loop, asyncio.Queue())
        try:
            self.engine.submit(job)
        except ApiError as e:
            return e.response({"Retry-After": str(self.engine.retry_after())})
        shape = Shape(chat, model)
        if params.stream:
            return JobStream(job, self._sse(job, shape))
        return await self._whole(request, job, shape)

    async def _events(self, job: Job) -> AsyncIterator[Event]:
        while (event := await job.events.get()) is not None:
            if event.error:
                raise event.error
            yield event

    async def _whole(self, request: Request, job: Job, shape: Shape) -> Response:
        watch = asyncio.create_task(_watch_disconnect(request, job))
        try:
            events = [e async for e in self._events(job)]
        finally:
            job.cancel.set()
            watch.cancel()
        return JSONResponse(shape.whole(events))

    async def _sse(self, job: Job, shape: Shape) -> AsyncIterator[str]:
        try:
            yield _sse(shape.chunk(Event(""), first=True))
            usage = None
            async for event in self._events(job):
                usage = event.usage or usage
                if event.text or event.finish_reason or event.logprobs:
                    yield _sse(shape.chunk(event))
            if job.params.include_usage and usage:
                yield _sse(shape.usage_chunk(usage))
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield _sse({"error": {"message": e.message, "type": "server_error", "param": e.param, "code": e.code}})
        finally:  # also when the client went away: the worker stops at its next token
            job.cancel.set()

    async def models(self, request: Request) -> Response:
        e = self.engine
        card = {"id": e.model_id, "object": "model", "created": e.created, "owned_by": "mlxflash"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.engine.model_id})

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.engine.stats())


class JobStream(StreamingResponse):
    """Server-sent events of one job; however the response ends, the job is told to stop."""

    def __init__(self, job: Job, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel.set()


async def _watch_disconnect(request: Request, job: Job) -> None:
    while not job.cancel.is_set():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


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
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp}
        choice["finish_reason"] = last.finish_reason
        return {**self._head(False), "choices": [choice], "usage": last.usage}


def _chat_logprob(e: dict) -> dict:
    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {**one(e["token"], e["logprob"]), "top_logprobs": [one(t["token"], t["logprob"]) for t in e.get("top", [])]}


# ---- the app -------------------------------------------------------------------------------------------


async def _api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return ApiError(
        exc.status_code, exc.detail or "error", code="not_found" if exc.status_code == 404 else None
    ).response()


async def _gone(request: Request, exc: ClientDisconnect) -> Response:
    return Response(status_code=499)  # nobody is listening


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("request failed")
    return ApiError(500, "internal server error").response()


def make_app(engine: Engine, allowed_origins: list[str] | None = None, max_body: int = MAX_BODY) -> Starlette:
    """The Starlette app serving `engine`."""
    api = Api(engine, max_body)
    routes = [
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/stats", api.stats, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
    ]
    middleware = []
    if allowed_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=allowed_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
            )
        )
    handlers = {ApiError: _api_error, HTTPException: _http_error, ClientDisconnect: _gone, Exception: _internal_error}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


def model_id_of(sess: Session) -> str:
    return os.path.basename(os.path.normpath(str(sess.model.flash.bundle.path)))


# ---- the command ---------------------------------------------------------------------------------------


def add_serve(sub) -> None:
    """Register `mlxflash serve`."""
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--allowed-origins", default="", help="comma-separated origins allowed by CORS ('*' for any)")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait; more get 503")
    p.add_argument("--max-body", type=int, default=MAX_BODY, help="largest request body in bytes")
    p.set_defaults(run=serve)


def serve(args) -> None:
    import sys

    import uvicorn

    if args.max_queue < 0 or not 0 < args.port < 65536:
        raise UsageError("--max-queue must be >= 0 and --port within 1..65535")
    # MLX streams belong to a thread: load, generate and close on the one worker thread.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxflash-gen")
    sess = worker.submit(session, args.model, **model_options(args)).result()
    print(load_report(sess.model), file=sys.stderr, flush=True)
    engine = Engine(sess, model_id_of(sess), args.max_queue, worker)
    origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
    app = make_app(engine, origins, args.max_body)
    print(f"mlxflash: serving {engine.model_id} at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
    finally:
        worker.submit(sess.close)
        worker.shutdown(wait=True, cancel_futures=True)
