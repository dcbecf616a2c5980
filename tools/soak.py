"""Soak `mlxflash serve`: concurrent clients for a while (chat and completions, streamed and whole, clients
that hang up mid-stream, long prompts) against a server started here, sampling the server's resident
memory; prints failures, RSS after warm-up, at the end and at most, and the budget it must stay under.

    python tools/soak.py [--model DIR] [--memory 84%] [--clients 4] [--minutes 30] [--json out.json]
    python tools/soak.py --requests 200 --clients 1       # a count instead of a duration

A request fails when its status is not 200 or a stream ends without `[DONE]`; a client's own hang-up is
not a failure. The budget line is the memory budget plus the fixed overhead (`/v1/stats`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

TOPICS = ["France", "Germany", "Italy", "Spain", "Japan", "Peru", "Kenya", "Canada"]
LONG_TEXT = (
    "The history of cartography is the study of how people have drawn maps of the world they knew, from "
    "clay tablets and sea charts to surveys made with instruments and, later, photographs taken from above. "
)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except OSError:  # macOS
        return int(subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout) * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def post(port: int, path: str, body: dict, hang_up_after: int | None = None) -> tuple[int, bool]:
    """(status, completed): a stream is complete when it reached `[DONE]`; `hang_up_after` closes the
    connection after that many stream lines, as a client that gives up would."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if not body.get("stream") or resp.status != 200:
            resp.read()
            return resp.status, True
        lines = 0
        for raw in resp:
            lines += raw.startswith(b"data:")
            if raw.strip() == b"data: [DONE]":
                return resp.status, True
            if hang_up_after is not None and lines >= hang_up_after:
                return resp.status, False
        return resp.status, False
    finally:
        conn.close()


@dataclass
class Tally:
    requests: int = 0
    failures: int = 0
    hang_ups: int = 0
    long_prompts: int = 0
    kinds: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_request(i: int, port: int, max_tokens: int, rng: random.Random, tally: Tally) -> None:
    topic = TOPICS[i % len(TOPICS)]
    stream = rng.random() < 0.5
    hang_up = 2 if stream and rng.random() < 0.2 else None
    long_prompt = rng.random() < 0.15
    common = {"max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": stream}
    text = (LONG_TEXT * rng.randint(4, 12) if long_prompt else "") + f"What is the capital of {topic}? ({i})"
    if rng.random() < 0.25:
        kind, path, body = "completion", "/v1/completions", {"prompt": text, **common}
    else:
        kind, path, body = "chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], **common}
    try:
        status, complete = post(port, path, body, hang_up)
        failed = status != 200 or (not complete and hang_up is None)
        error = f"{kind} status {status} complete {complete}"
    except OSError as e:
        failed, error = True, f"{kind}: {e}"
    with tally.lock:
        tally.requests += 1
        tally.failures += failed
        tally.hang_ups += hang_up is not None
        tally.long_prompts += long_prompt
        label = f"{kind}{'-stream' if stream else ''}{'-long' if long_prompt else ''}"
        tally.kinds[label] = tally.kinds.get(label, 0) + 1
        if failed and len(tally.errors) < 20:
            tally.errors.append(error)


def start(model: str | None, memory: str | None, extra: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "mlxflash.cli", "serve", "--port", str(port), "--max-queue", "16"]
    cmd += (["--model", model] if model else []) + (["--memory", memory] if memory else []) + extra
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(3000):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited ({proc.returncode}): {' '.join(cmd)}") from None
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--memory", help="the server's --memory (flash mode below the model's size)")
    ap.add_argument("--serve-arg", action="append", default=[], help="another argument for `mlxflash serve`")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--minutes", type=float, help="run this long (else --requests)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=0.1, help="share of the run before the baseline sample")
    ap.add_argument("--json", help="write the result and samples here")
    args = ap.parse_args()
    proc, port = start(args.model, args.memory, args.serve_arg)
    tally, samples, t0 = Tally(), [], time.time()
    deadline = t0 + args.minutes * 60 if args.minutes else None
    counter = iter(range(1 << 62))
    done = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not done.is_set():
            i = next(counter)
            if (deadline is None and i >= args.requests) or (deadline is not None and time.time() > deadline):
                return
            one_request(i, port, args.max_tokens, rng, tally)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(2)
            samples.append((round(time.time() - t0, 1), tally.requests, rss_bytes(proc.pid)))
            if len(samples) % 30 == 1:
                print(
                    f"{samples[-1][0]:7.0f} s  {tally.requests:5d} requests  RSS {samples[-1][2] / 1e6:7.1f} MB",
                    flush=True,
                )
        stats = get_json(port, "/v1/stats")
    finally:
        done.set()
        proc.terminate()
        proc.wait(timeout=30)
    total = samples[-1][0]
    after = [r for s, _, r in samples if s >= args.warmup * total] or [samples[-1][2]]
    runtime = stats.get("runtime", {})
    budget = runtime.get("memory_budget", 0) + runtime.get("fixed_overhead_bytes", 0)
    result = {
        "clients": args.clients,
        "requests": tally.requests,
        "failures": tally.failures,
        "client_hang_ups": tally.hang_ups,
        "long_prompts": tally.long_prompts,
        "kinds": tally.kinds,
        "errors": tally.errors,
        "seconds": round(time.time() - t0, 1),
        "server_peak_rss_mb": round(stats.get("peak_rss_bytes", 0) / 1e6, 1),
        "budget_plus_fixed_mb": round(budget / 1e6, 1) if budget else None,
        "rss_after_warmup_mb": round(after[0] / 1e6, 1),
        "rss_end_mb": round(after[-1] / 1e6, 1),
        "rss_max_mb": round(max(after) / 1e6, 1),
        "growth_mb": round((after[-1] - after[0]) / 1e6, 1),
        "server_mode": stats.get("mode"),
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
