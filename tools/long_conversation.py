"""One long conversation against `mlxflash serve` started here, with its KV cache in the budget: turns are
added until the prompt reaches `--tokens`, the server's resident memory sampled after each turn; then one
request past `--max-kv-size` must get a 400 naming the limit. Prints a table (turn, prompt tokens, cached
tokens, RSS) and the budget line (the memory budget plus the fixed overhead, from `/v1/stats`).

    python tools/long_conversation.py --memory 180MB --max-kv-size 4096 --tokens 3000 --past 5000 [--json out.json]
    python tools/long_conversation.py --conversations 2 --tokens 1500 --short-turns   # two chats alternating

With several conversations, each turn goes to the next one in turn (as clients alternating would), and the
result says the least share of a later turn's prompt that came from the cache (`cached_tokens`). With
--short-turns only a conversation's first message is long; the later ones are a short question, as in a chat.
"""

from __future__ import annotations

import argparse
import http.client
import json

from soak import LONG_TEXT, TOPICS, get_json, rss_bytes, start


def chat(port: int, messages: list[dict], max_tokens: int) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    try:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def user_turn(i: int) -> str:
    """About 200 tokens of plain prose that differs from turn to turn, and a question."""
    return f"Part {i}. " + LONG_TEXT * 5 + f"What does part {i} say about {TOPICS[i % len(TOPICS)]}?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--memory", default="180MB")
    ap.add_argument("--max-kv-size", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=3000, help="grow the conversation to this many prompt tokens")
    ap.add_argument("--past", type=int, default=5000, help="then one prompt of about this many tokens: a 400")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--conversations", type=int, default=1, help="this many conversations, turns alternating")
    ap.add_argument(
        "--short-turns", action="store_true", help="after its first message, a conversation gets short questions"
    )
    ap.add_argument("--json", help="write the rows and the result here")
    args = ap.parse_args()
    proc, port = start(args.model, args.memory, ["--max-kv-size", str(args.max_kv_size)])
    rows, talks = [], [[] for _ in range(max(1, args.conversations))]
    try:
        while not rows or rows[-1]["prompt_tokens"] < args.tokens:
            talk = len(rows) % len(talks)
            messages = talks[talk]
            short = args.short_turns and messages
            text = f"And what about {TOPICS[len(rows) % len(TOPICS)]}?" if short else user_turn(len(rows))
            messages.append({"role": "user", "content": f"Conversation {talk}. " + text})
            status, r = chat(port, messages, args.max_tokens)
            if status != 200:
                raise SystemExit(f"turn {len(rows)}: HTTP {status}: {r}")
            messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
            usage = r["usage"]
            rows.append(
                {
                    "turn": len(rows),
                    "conversation": talk,
                    "prompt_tokens": usage["prompt_tokens"],
                    "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                    "rss_mb": round(rss_bytes(proc.pid) / 1e6, 1),
                }
            )
            print(
                "turn {turn:3d}  conversation {conversation}  prompt {prompt_tokens:5d} tokens  cached {cached_tokens:5d}  "
                "RSS {rss_mb:7.1f} MB".format(**rows[-1]),
                flush=True,
            )
        words = max(1, args.past // len(LONG_TEXT.split()))
        status, past = chat(port, [{"role": "user", "content": LONG_TEXT * words}], args.max_tokens)
        stats = get_json(port, "/v1/stats")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    runtime = stats.get("runtime", {})
    result = {
        "memory": args.memory,
        "max_kv_size": args.max_kv_size,
        "turns": len(rows),
        "conversations": len(talks),
        "least_cached_share_after_first_turns": round(
            min((r["cached_tokens"] / r["prompt_tokens"] for r in rows[len(talks) :]), default=0.0), 3
        ),
        "last_prompt_tokens": rows[-1]["prompt_tokens"],
        "server_peak_rss_mb": round(stats.get("peak_rss_bytes", 0) / 1e6, 1),
        "budget_mb": round(runtime.get("memory_budget", 0) / 1e6, 1),
        "fixed_overhead_mb": round(runtime.get("fixed_overhead_bytes", 0) / 1e6, 1),
        "budget_plus_fixed_mb": round(
            (runtime.get("memory_budget", 0) + runtime.get("fixed_overhead_bytes", 0)) / 1e6, 1
        ),
        "past_limit_status": status,
        "past_limit_message": past.get("error", {}).get("message") if isinstance(past, dict) else None,
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, **result}, f, indent=1)


if __name__ == "__main__":
    main()
