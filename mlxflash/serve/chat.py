"""`mlxflash chat`: a terminal chat. The history stays in the KV cache across turns, so a turn only
computes its own new tokens. /reset, /stats, /quit; Ctrl-C stops the current answer."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

from ..errors import UsageError
from ..options import add_model_options, model_options
from ..runtime.report import load_report
from ..runtime.stats import current_rss_bytes, peak_rss_bytes
from .generate import check_prompt, context_limit
from .session import Session, session

HELP = "Type a message. /reset starts over, /stats shows figures, /quit leaves; Ctrl-C stops an answer."


def add_chat(sub) -> None:
    """Register `mlxflash chat`."""
    p = sub.add_parser("chat", help="chat with the model in the terminal")
    add_model_options(p)
    p.add_argument("--system", help="system message")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.set_defaults(run=run_chat)


@contextmanager
def ctrl_c_sets(flag: threading.Event):
    """While inside, Ctrl-C sets `flag` instead of raising KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class Chat:
    """The conversation: messages, the session that keeps their KV cache, the last answer's figures."""

    def __init__(self, sess: Session, args):
        self.sess, self.args = sess, args
        self.base = [{"role": "system", "content": args.system}] if args.system else []
        self.messages = list(self.base)
        self.last: dict = {}

    def reset(self) -> None:
        self.messages = list(self.base)
        self.sess.reset()
        self.last = {}

    def answer(self, text: str) -> None:
        """Stream the model's answer to `text`; keep both in the history."""
        tok, a = self.sess.tokenizer, self.args
        tokens = tok.apply_chat_template(
            [*self.messages, {"role": "user", "content": text}], add_generation_prompt=True
        )
        context, limit = context_limit(self.sess.model)
        try:
            room = check_prompt(context, tokens, None, default=a.max_tokens, limit=limit)
        except UsageError:
            print(f"(the conversation no longer fits {limit}: /reset to start over)")
            return
        reply, n, stats, stop = "", 0, {}, threading.Event()
        with ctrl_c_sets(stop):
            for r in self.sess.stream(tokens, room, temp=a.temp, top_p=a.top_p, top_k=a.top_k, seed=a.seed):
                print(r.text, end="", flush=True)
                reply, n, stats = reply + r.text, n + 1, r.stats
                if stop.is_set():
                    print(" [stopped]", end="")
                    break
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        self.last = {**stats, "answer_tokens": n, "prompt": len(tokens), "reused": self.sess.reused_tokens}
        print(
            f"\n({n} tokens, {stats.get('tokens_per_s', 0.0):.1f} tok/s; "
            f"{self.sess.reused_tokens} of {len(tokens)} prompt tokens from the cache)"
        )

    def stats_text(self) -> str:
        rt, s = self.sess.model.flash, self.last
        lines = [
            f"mode {rt.mode}; kv cache: {len(self.sess.cache_tokens)} tokens; "
            f"turns: {sum(m['role'] == 'user' for m in self.messages)}",
            f"memory: resident {rt.resident_bytes / 1e6:.1f} MB, RSS {current_rss_bytes() / 1e6:.1f} MB, "
            f"peak {peak_rss_bytes() / 1e6:.1f} MB",
        ]
        if s:
            line = (
                f"last answer: {s['answer_tokens']} tokens at {s.get('tokens_per_s', 0.0):.2f} tok/s, "
                f"{s.get('bytes_read_per_token', 0) / 1e6:.2f} MB read/token; "
                f"prompt {s['prompt']} tokens, {s['reused']} from the cache"
            )
            if "cache_hit_rate" in s:
                line += f"; neuron cache hit rate {s['cache_hit_rate']:.1%}"
            lines.append(line)
        return "\n".join(lines)


def _read_line() -> str | None:
    """One line from the user; None at end of input. Ctrl-C at the prompt only clears the line."""
    while True:
        try:
            return input(">>> ")
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print("\n(/quit to leave)")


def loop(chat: Chat) -> None:
    """Read and answer lines until /quit or end of input."""
    print(HELP)
    while (line := _read_line()) is not None:
        cmd = line.strip()
        if cmd in ("/quit", "/exit", "/bye"):
            break
        if cmd == "/reset":
            chat.reset()
            print("(conversation cleared)")
        elif cmd == "/stats":
            print(chat.stats_text())
        elif cmd.startswith("/"):
            print(f"unknown command {cmd}. {HELP}")
        elif cmd:
            chat.answer(line)


def run_chat(args) -> None:
    if args.max_tokens < 1 or args.temp < 0 or not 0 <= args.top_p <= 1:
        raise UsageError("--max-tokens must be >= 1, --temp >= 0 and --top-p within [0, 1]")
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    with session(args.model, **model_options(args)) as sess:
        print(load_report(sess.model), file=sys.stderr, flush=True)
        loop(Chat(sess, args))
