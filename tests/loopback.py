"""An app served on a loopback port from a thread (uvicorn), and plain HTTP to it, for in-process tests."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from mlxflash.serve.app import make_app
from mlxflash.serve.engine import Engine
from mlxflash.serve.models import Catalog
from mlxflash.serve.session import session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: bytes | dict) -> tuple[int, object]:
    """(status, parsed JSON or the text of a stream) of one POST."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _exchange(port, "POST", path, raw, {"Content-Type": "application/json"}, timeout=120)


def get(port: int, path: str) -> tuple[int, object]:
    return _exchange(port, "GET", path, None, {}, timeout=60)


def _exchange(port: int, method: str, path: str, body: bytes | None, headers: dict, timeout: float):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data.decode(errors="replace")
    finally:
        conn.close()


@contextmanager
def serving(bundle, model_id: str = "tiny", **load_kw) -> Iterator[int]:
    """Serve `bundle` (loaded on the engine's worker thread, as `mlxflash serve` does); yields the port."""
    with serving_engine(bundle, model_id, None, **load_kw) as (port, _):
        yield port


@contextmanager
def serving_engine(bundle, model_id: str, catalog: Catalog | None, **load_kw) -> Iterator[tuple[int, Engine]]:
    """`serving`, with a catalog of bundles to switch to; yields (port, engine)."""
    import uvicorn

    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxflash-gen")
    sess = worker.submit(session, bundle, **load_kw).result()
    engine = Engine(sess, model_id, 8, worker, catalog)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(engine), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield port, engine
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        worker.submit(lambda: engine.session.close()).result()
        worker.shutdown()
