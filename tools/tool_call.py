"""A tool call round trip with a real model through the official `openai` client (pip install -e ".[test]"):
`mlxflash serve` is started here on a model whose chat template knows tools (Qwen2.5-Coder-1.5B-Instruct,
`mlxflash fetch qwen2.5-coder-1.5b`), asked a question with one tool, whole and streamed; the call is
answered with the tool's result and the model's final reply printed (asked with `tool_choice: "none"`,
as apps do for the last turn: the 1.5B model, offered the tool again, calls it again). Exits non-zero
unless both requests returned a well-formed call of the tool and the final reply is text.

    python tools/tool_call.py [--model Qwen2.5-Coder-1.5B-Instruct-Q4_K_M] [--memory 70%] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

from soak import start

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city's name"}},
            "required": ["city"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris right now? Use the tool."}]
RESULT = {"city": "Paris", "temperature_c": 14, "sky": "light rain"}


def whole(client, model: str) -> dict:
    t = time.perf_counter()
    r = client.chat.completions.create(model=model, messages=QUESTION, tools=[WEATHER], max_tokens=64, temperature=0)
    choice = r.choices[0]
    calls = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in choice.message.tool_calls or []
    ]
    return {
        "finish_reason": choice.finish_reason,
        "calls": calls,
        "content": choice.message.content,
        "s": time.perf_counter() - t,
    }


def streamed(client, model: str) -> dict:
    t, calls, finish, chunks = time.perf_counter(), {}, None, 0
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, tools=[WEATHER], max_tokens=64, temperature=0, stream=True
    )
    for chunk in stream:
        chunks += 1
        delta = chunk.choices[0].delta if chunk.choices else None
        for c in (delta.tool_calls or []) if delta else []:
            entry = calls.setdefault(c.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = c.id or entry["id"]
            entry["name"] += (c.function.name or "") if c.function else ""
            entry["arguments"] += (c.function.arguments or "") if c.function else ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return {"finish_reason": finish, "calls": list(calls.values()), "chunks": chunks, "s": time.perf_counter() - t}


def answer(client, model: str, call: dict) -> str:
    """Send the tool's result back; the model's reply to it."""
    messages = QUESTION + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(RESULT)},
    ]
    r = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=48, temperature=0
    )
    return r.choices[0].message.content or ""


def well_formed(result: dict) -> bool:
    calls = result["calls"]
    if result["finish_reason"] != "tool_calls" or len(calls) != 1 or calls[0]["name"] != "get_weather":
        return False
    try:
        return isinstance(json.loads(calls[0]["arguments"]).get("city"), str)
    except ValueError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M")
    ap.add_argument("--memory", help="the server's --memory (flash mode below the model's size)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    try:
        import openai
    except ImportError:
        raise SystemExit('this tool needs the official openai client: pip install -e ".[test]"') from None
    proc, port = start(args.model, args.memory, [])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=1800)
        model = client.models.list().data[0].id
        out = {
            "model": model,
            "memory": args.memory,
            "whole": whole(client, model),
            "streamed": streamed(client, model),
        }
        for kind in ("whole", "streamed"):
            r = out[kind]
            print(f"{kind:8s}: finish_reason={r['finish_reason']} calls={r['calls']} ({r['s']:.1f} s)")
        ok = well_formed(out["whole"]) and well_formed(out["streamed"])
        if ok:
            out["reply"] = answer(client, model, out["whole"]["calls"][0])
            print(f"reply to the tool's result: {out['reply']!r}")
            ok = bool(out["reply"].strip())
        out["ok"] = ok
        print("tool call round trip:", "ok" if ok else "FAILED")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        if not ok:
            raise SystemExit(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
