"""`mlxflash chat` in a pseudo-terminal: two turns (the second answered from the kept KV cache),
/stats, Ctrl-C stopping an answer without leaving, /reset, /quit."""

from __future__ import annotations

import re
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "
FOOTER = re.compile(r"\((\d+) tokens, [\d.]+ tok/s; (\d+) of (\d+) prompt tokens from the cache\)")


def _turn(child, text: str) -> tuple[str, int, int]:
    """Send one message; (answer, prompt tokens reused from the cache, prompt tokens)."""
    child.sendline(text)
    child.expect(FOOTER, timeout=120)
    answer = child.before.split(text, 1)[-1].strip()
    reused, total = int(child.match.group(2)), int(child.match.group(3))
    child.expect_exact(PROMPT, timeout=30)
    return answer, reused, total


def test_chat_keeps_history_in_the_cache(default_bundle):
    args = ["-m", "mlxflash.cli", "chat", "--model", str(default_bundle), "--max-tokens", "12", "--temp", "0"]
    child = pexpect.spawn(sys.executable, args, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact("memory plan", timeout=120)  # the memory-fit report at load
        child.expect_exact(PROMPT)
        first, reused, _ = _turn(child, "What is the capital of France?")
        assert "Paris" in first and reused == 0
        second, reused, total = _turn(child, "And of Germany?")
        assert "Berlin" in second  # only answerable from the first turn
        assert reused > total // 2  # the history came from the kept cache, not recomputed

        child.sendline("/stats")
        child.expect(r"kv cache: (\d+) tokens; turns: 2")
        assert int(child.match.group(1)) > total
        child.expect_exact(PROMPT)

        child.sendline("Write a long story about a dragon.")
        child.expect(r"dragon\.\r\n\S", timeout=120)  # the answer has started
        child.sendintr()
        child.expect_exact("[stopped]", timeout=60)
        child.expect(FOOTER, timeout=60)
        child.expect_exact(PROMPT)

        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.sendline("/stats")
        child.expect_exact("kv cache: 0 tokens; turns: 0")
        child.expect_exact(PROMPT)
        _, reused, _ = _turn(child, "And of Germany?")
        assert reused == 0  # nothing left of the old conversation

        child.sendline("/quit")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def _open_fds_on(path) -> int:
    import os

    fds = os.listdir("/proc/self/fd")
    return sum(os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path) for fd in fds if fd.isdigit())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts file descriptors through /proc")
def test_python_session_reuses_the_cache_and_closes(default_bundle):
    import mlxflash

    ffn = default_bundle / "ffn.bin"
    before = _open_fds_on(ffn)
    with mlxflash.session(default_bundle) as s:
        assert _open_fds_on(ffn) > before
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        first = "".join(r.text for r in s.chat(messages, max_tokens=8))
        assert "Paris" in first and s.reused_tokens == 0
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Germany?"}]
        second = "".join(r.text for r in s.chat(messages, max_tokens=8))
        assert "Berlin" in second and s.reused_tokens > 30
    assert _open_fds_on(ffn) == before and s.model is None
