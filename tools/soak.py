"""Soak `mlxflash serve`: N short requests (chat, completions, streaming, varied prompts) against a
server started here, sampling the server's resident memory; prints the growth after warm-up.

    python tools/soak.py [--model DIR] [--requests 200] [--max-tokens 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import time


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


def post(port: int, path: str, body: dict) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def request(i: int, port: int, max_tokens: int) -> int:
    topic = ["France", "Germany", "Italy", "Spain", "Japan"][i % 5]
    common = {"max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": i % 3 == 0}
    if i % 4 == 3:
        return post(port, "/v1/completions", {"prompt": f"The capital of {topic} is", **common})
    messages = [{"role": "user", "content": f"What is the capital of {topic}? ({i})"}]
    return post(port, "/v1/chat/completions", {"messages": messages, **common})


def start(model: str | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "mlxflash.cli", "serve", "--port", str(port)] + (["--model", model] if model else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=20, help="requests before the baseline sample")
    ap.add_argument("--json", help="write the samples here")
    args = ap.parse_args()
    proc, port = start(args.model)
    samples, failures, t0 = [], 0, time.time()
    try:
        for i in range(args.requests):
            failures += request(i, port, args.max_tokens) != 200
            if i + 1 == args.warmup or (i + 1) % 20 == 0:
                samples.append((i + 1, rss_bytes(proc.pid)))
                print(f"{i + 1:4d} requests  RSS {samples[-1][1] / 1e6:7.1f} MB", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    base = next(r for n, r in samples if n == args.warmup)
    after = [r for n, r in samples if n >= args.warmup]
    result = {
        "requests": args.requests,
        "failures": failures,
        "seconds": round(time.time() - t0, 1),
        "rss_after_warmup_mb": round(base / 1e6, 1),
        "rss_end_mb": round(after[-1] / 1e6, 1),
        "rss_max_mb": round(max(after) / 1e6, 1),
        "growth_mb": round((after[-1] - base) / 1e6, 1),
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
