"""`mlxflash serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn): the routes, CORS, body
limits and errors; the requests' shapes are in protocol.py, the model's queue in engine.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import UsageError
from ..fetch.staging import models_dir
from ..options import add_model_options, model_options
from ..runtime.report import load_report
from .engine import Engine, Job
from .generate import check_prompt, context_limit, encode_prompt
from .models import Catalog
from .protocol import (
    DEFAULT_MAX_TOKENS,
    ApiError,
    Event,
    Params,
    Shape,
    bad,
    parse_messages,
    parse_params,
    parse_prompt,
    parse_response_format,
    parse_tools,
    with_instruction,
)
from .session import Session, session
from .tools import Reply

log = logging.getLogger("mlxflash.server")
MAX_BODY = 1 << 20  # bytes of a request body
DRAIN_LIMIT = 64 << 20  # an oversized body is read and dropped up to this, so the client sees the 413


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

    async def _model(self, body: dict) -> str:
        """The request's model, loaded (a catalog bundle other than the loaded one is loaded now)."""
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad("model", "must be a string")
        if model in (None, "", "default"):
            return await self.engine.use(None)
        if model != self.engine.model_id and model not in self.engine.catalog.bundles():
            raise ApiError(
                404,
                f"the model '{model}' does not exist; this server has {', '.join(self.engine.model_ids())}",
                param="model",
                code="model_not_found",
            )
        try:
            return await self.engine.use(model)
        except Exception as e:
            log.exception("loading %s failed", model)
            raise ApiError(500, f"the model '{model}' failed to load: {e}", param="model") from None

    def _fit(self, tokens: list[int], params: Params) -> None:
        context, limit = context_limit(self.engine.session.model)
        try:
            params.max_tokens = check_prompt(context, tokens, params.max_tokens, DEFAULT_MAX_TOKENS, limit)
        except UsageError as e:
            raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from None

    async def chat(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        messages, params = parse_messages(body), parse_params(body, chat=True)
        tools, fmt = parse_tools(body), parse_response_format(body)
        model = await self._model(body)
        tokenizer = self.engine.tokenizer
        if tools.tools and not tokenizer.has_tool_calling:
            raise bad("tools", f"are not supported: the chat template of '{model}' has no tool calling")
        if fmt.json:
            messages = with_instruction(messages, fmt.instruction())
        try:
            tokens = list(tokenizer.apply_chat_template(messages, tools=tools.tools, add_generation_prompt=True))
        except Exception as e:  # the template rejects this conversation (e.g. the roles' order)
            raise ApiError(400, f"the chat template rejects these messages: {e}", param="messages") from None
        reply = Reply(tokenizer, tools.tools, fmt, params.stream)
        return await self._respond(request, tokens, params, model, reply)

    async def completions(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        prompt, params = parse_prompt(body), parse_params(body, chat=False)
        model = await self._model(body)
        vocab = self.engine.session.model.flash.bundle.config.get("vocab_size")
        if isinstance(prompt, list) and vocab and max(prompt) >= vocab:
            raise bad("prompt", f"has token ids beyond the vocabulary ({vocab})")
        tokens = encode_prompt(self.engine.tokenizer, prompt)
        return await self._respond(request, tokens, params, model, None)

    async def _respond(
        self, request: Request, tokens: list[int], params: Params, model: str, reply: Reply | None
    ) -> Response:
        """Run the job; `reply` (chat only) turns its events into content and tool calls."""
        self._fit(tokens, params)
        loop = asyncio.get_running_loop()
        job = Job(tokens, params, loop, asyncio.Queue(), model)
        try:
            self.engine.submit(job)
        except ApiError as e:
            return e.response({"Retry-After": str(self.engine.retry_after())})
        shape = Shape(reply is not None, model)
        if params.stream:
            return JobStream(job, self._sse(job, shape, reply))
        return await self._whole(request, job, shape, reply)

    async def _events(self, job: Job, reply: Reply | None = None) -> AsyncIterator[Event]:
        while (event := await job.events.get()) is not None:
            if event.error:
                raise event.error
            yield reply.step(event) if reply else event

    async def _whole(self, request: Request, job: Job, shape: Shape, reply: Reply | None) -> Response:
        watch = asyncio.create_task(_watch_disconnect(request, job))
        try:
            events = [e async for e in self._events(job, reply)]
        finally:
            job.cancel.set()
            watch.cancel()
        return JSONResponse(shape.whole(reply.whole(events) if reply else events))

    async def _sse(self, job: Job, shape: Shape, reply: Reply | None) -> AsyncIterator[str]:
        try:
            yield _sse(shape.chunk(Event(""), first=True))
            usage = None
            async for event in self._events(job, reply):
                usage = event.usage or usage
                if event.tool_calls and event.finish_reason:  # the calls, then the finish, as OpenAI sends them
                    yield _sse(shape.chunk(replace(event, finish_reason=None)))
                    event = replace(event, text="", logprobs=None, tool_calls=None)
                if event.text or event.finish_reason or event.logprobs or event.tool_calls:
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
        cards = [{"id": m, "object": "model", "created": e.created, "owned_by": "mlxflash"} for m in e.model_ids()]
        return JSONResponse({"object": "list", "data": cards})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.engine.model_id})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(self.engine.metrics(), media_type="text/plain; version=0.0.4")

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
        Route("/metrics", api.metrics, methods=["GET"]),
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
    p.add_argument(
        "--models",
        metavar="DIR",
        help="the bundles /v1/models lists and loads on request (default: $MLXFLASH_MODELS, else models/)",
    )
    p.set_defaults(run=serve)


def serve(args) -> None:
    import sys

    import uvicorn

    if args.max_queue < 0 or not 0 < args.port < 65536:
        raise UsageError("--max-queue must be >= 0 and --port within 1..65535")
    root = Path(args.models) if args.models else models_dir()
    if args.models and not root.is_dir():
        raise UsageError(f"--models {args.models}: not a directory")
    # MLX streams belong to a thread: load, generate and close on the one worker thread.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxflash-gen")
    sess = worker.submit(session, args.model, **model_options(args)).result()
    print(load_report(sess.model), file=sys.stderr, flush=True)
    catalog = Catalog(root, model_options(args))
    engine = Engine(sess, model_id_of(sess), args.max_queue, worker, catalog)
    origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
    app = make_app(engine, origins, args.max_body)
    print(f"mlxflash: serving {engine.model_id} at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
    finally:
        worker.submit(sess.close)
        worker.shutdown(wait=True, cancel_futures=True)
