"""The model behind the server: requests run one at a time, in arrival order, on one worker thread (MLX
streams belong to a thread); a bounded number wait, the rest get 503. The KV cache is kept between
requests and a prompt that shares a prefix with the last one only computes what is new."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from ..errors import UsageError
from ..runtime.stats import current_rss_bytes, peak_rss_bytes
from .models import Catalog
from .protocol import ApiError, Event, Params, StopScanner
from .session import Session, session

log = logging.getLogger("mlxflash.server")
RECENT = 32  # requests /v1/stats lists


@dataclass
class Job:
    tokens: list[int]
    params: Params
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    model_id: str = ""  # the model the prompt was encoded for; "" for whichever is loaded
    cancel: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])

    def put(self, event: Event | None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """The model, its kept KV cache, the one worker thread and the live figures."""

    def __init__(
        self,
        sess: Session,
        model_id: str,
        max_queue: int,
        worker: ThreadPoolExecutor | None = None,
        catalog: Catalog | None = None,
    ):
        self.session, self.model_id, self.max_queue = sess, model_id, max_queue
        self.catalog = catalog or Catalog(None)
        self._switching = asyncio.Lock()
        self.worker = worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxflash-gen")
        self.pending = 0  # admitted and not finished (the running one included); event-loop thread only
        self.served = self.rejected = self.cancelled = self.tokens = self.tokens_decoded = 0
        self.decode_s = 0.0
        self.prompt_tokens = self.cached_tokens = 0  # totals over the served requests
        self.prefill_s = 0.0
        self.last: dict = {}
        self.recent: deque[dict] = deque(maxlen=RECENT)  # the last requests' figures, for /v1/stats
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

    def model_ids(self) -> list[str]:
        """The loaded model, then the catalog's other bundles."""
        return [self.model_id, *(m for m in self.catalog.bundles() if m != self.model_id)]

    async def use(self, model_id: str | None) -> str:
        """The loaded model's id once `model_id` (a catalog bundle; None: whichever is loaded) is loaded,
        on the worker after the jobs queued before. Waits out a switch another request started."""
        async with self._switching:
            if model_id and model_id != self.model_id:
                await asyncio.get_running_loop().run_in_executor(self.worker, self._switch, model_id)
            return self.model_id

    def _switch(self, model_id: str) -> None:
        path, previous = self.catalog.bundles()[model_id], self.session.model.flash.bundle.path
        log.info("switching from %s to %s", self.model_id, model_id)
        self.session.close()
        try:
            self.session = session(path, **self.catalog.load_kw)
        except Exception:
            self.session = session(previous, **self.catalog.load_kw)  # keep serving the one that worked
            raise
        self.model_id = model_id

    def _run(self, job: Job) -> None:
        try:
            if job.model_id and job.model_id != self.model_id:
                msg = f"the server switched to '{self.model_id}' while this request waited; retry it"
                job.put(Event("", error=ApiError(503, msg, code="model_switched")))
            elif not job.cancel.is_set():
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
        cached = self.session.reused_tokens
        self.prompt_tokens += len(job.tokens)
        self.cached_tokens += cached
        self.prefill_s += stats.get("prefill_s") or 0.0
        self.last = {**stats, "prompt_tokens_reused": cached}
        self.recent.append(
            {
                "id": job.id,
                "prompt_tokens": len(job.tokens),
                "cached_tokens": cached,
                "completion_tokens": n,
                "prefill_s": stats.get("prefill_s"),
                "tokens_per_s": stats.get("tokens_per_s", 0.0),
                "finished": time.time(),
            }
        )
        return {
            "prompt_tokens": len(job.tokens),
            "completion_tokens": n,
            "total_tokens": len(job.tokens) + n,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _logprobs(self, r, top: int) -> dict:
        lp = r.logprobs
        entry = {"token": self.tokenizer.decode([r.token]), "id": r.token, "logprob": lp[r.token].item()}
        if top:
            ids = mx.argpartition(-lp, top - 1)[:top]
            vals = lp[ids]
            pairs = sorted(zip(ids.tolist(), vals.tolist()), key=lambda x: -x[1])
            entry["top"] = [{"token": self.tokenizer.decode([i]), "logprob": v} for i, v in pairs]
        return entry

    def metrics(self) -> str:
        """Prometheus text exposition, with llama-server's metric names where one means the same."""
        rows = [
            ("llamacpp:prompt_tokens_total", "counter", "prompt tokens processed", self.prompt_tokens),
            ("llamacpp:prompt_seconds_total", "counter", "prompt processing time", self.prefill_s),
            ("llamacpp:tokens_predicted_total", "counter", "generated tokens", self.tokens),
            ("llamacpp:tokens_predicted_seconds_total", "counter", "decode time", self.decode_s),
            ("llamacpp:n_decode_total", "counter", "requests served", self.served),
            ("llamacpp:requests_processing", "gauge", "requests running", int(self.pending > 0)),
            ("llamacpp:requests_deferred", "gauge", "requests waiting", max(0, self.pending - 1)),
            (
                "llamacpp:kv_cache_tokens",
                "gauge",
                "tokens in the last conversation's KV cache",
                len(self.session.cache_tokens),
            ),
            (
                "mlxflash_prompt_cached_tokens_total",
                "counter",
                "prompt tokens taken from kept caches",
                self.cached_tokens,
            ),
            ("mlxflash_requests_rejected_total", "counter", "requests refused with 503", self.rejected),
            ("mlxflash_requests_cancelled_total", "counter", "requests whose client went away", self.cancelled),
            ("mlxflash_prompt_cache_bytes", "gauge", "bytes of the kept KV caches", self.session.kept_bytes),
            ("mlxflash_rss_bytes", "gauge", "resident set size", current_rss_bytes()),
            ("mlxflash_peak_rss_bytes", "gauge", "peak resident set size", peak_rss_bytes()),
        ]
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"

    def stats(self) -> dict:
        if self.session.model is None:
            raise ApiError(503, "the server is switching models", code="model_loading")
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
            "prompt_cache": {"conversations": len(self.session.prompt_cache), "bytes": self.session.kept_bytes},
            "last_request": last,
            "requests": list(self.recent),
        }
        if "cache_hit_rate" in last:
            out["cache_hit_rate"] = last["cache_hit_rate"]
        if hasattr(rt, "live"):  # the flash runtime's plan and neuron-cache figures
            out["runtime"] = rt.live()
        return out
