"""mlxflash eval: scoring against hand-computed log-likelihoods, the data parsers, the CLI and --compare."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama
from tiny import TINY, make_hf_dir

import mlxflash
from mlxflash.cli import main
from mlxflash.errors import UsageError
from mlxflash.eval.data import (
    ChoiceItem,
    ClozeItem,
    DataFormatError,
    choice_prompts,
    read_choice_jsonl,
    read_hellaswag_text,
    read_lambada,
    read_task,
)
from mlxflash.eval.evaluate import difference, format_difference
from mlxflash.eval.perplexity import perplexity, token_logprobs, window_spans
from mlxflash.eval.scoring import encode_pair, score_continuations
from mlxflash.eval.tasks import evaluate_choices, evaluate_lambada

# ------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_llama():
    mx.random.seed(1)
    model = llama.Model(llama.ModelArgs.from_dict(TINY))
    model.eval()
    return model


def direct_logprobs(model, tokens: list[int]) -> np.ndarray:
    """log p(tokens[t] | tokens[:t]) for t >= 1 from one plain forward and a log-softmax."""
    logits = model(mx.array(tokens)[None])[0].astype(mx.float32)
    logprobs = np.array(nn.log_softmax(logits, axis=-1))
    return np.array([logprobs[t - 1, tokens[t]] for t in range(1, len(tokens))])


class Bigram(nn.Module):
    """A model whose next-token log-probabilities depend on the current token only: a known table."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = mx.array(np.log(table).astype(np.float32))
        self.layers = []

    def __call__(self, x, cache=None):
        return self.table[x]


class CharTokenizer:
    """One token per character (code point mod 64), no special tokens; eos is 0."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 64 for c in text]


def random_tokens(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, TINY["vocab_size"], n)]


# ------------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("batch", [True, False])
def test_scores_match_log_softmax(tiny_llama, batch):
    ctx = random_tokens(11, 0)
    conts = [random_tokens(k, k) for k in (1, 4, 2, 6)]
    scores = score_continuations(tiny_llama, [(ctx, c) for c in conts], batch=batch)
    for cont, score in zip(conts, scores):
        expected = direct_logprobs(tiny_llama, ctx + cont)[len(ctx) - 1 :]
        assert score.tokens == len(cont)
        assert score.logprob == pytest.approx(float(expected.sum()), abs=1e-4)


def test_scores_without_a_shared_prefix(tiny_llama):
    pairs = [(random_tokens(5, 1), random_tokens(3, 2)), (random_tokens(8, 3), random_tokens(2, 4))]
    for (ctx, cont), score in zip(pairs, score_continuations(tiny_llama, pairs)):
        expected = direct_logprobs(tiny_llama, ctx + cont)[len(ctx) - 1 :].sum()
        assert score.logprob == pytest.approx(float(expected), abs=1e-4)


def test_greedy_flag(tiny_llama):
    ctx = random_tokens(6, 5)
    logits = tiny_llama(mx.array(ctx)[None])[0, -1]
    best = int(mx.argmax(logits).item())
    other = (best + 1) % TINY["vocab_size"]
    good, bad = score_continuations(tiny_llama, [(ctx, [best]), (ctx, [other])])
    assert good.greedy and not bad.greedy


def test_token_logprobs_with_prefilled_cache(tiny_llama):
    tokens = random_tokens(30, 6)
    expected = direct_logprobs(tiny_llama, tokens)
    np.testing.assert_allclose(token_logprobs(tiny_llama, tokens, 1), expected, atol=1e-4)
    np.testing.assert_allclose(token_logprobs(tiny_llama, tokens, 17), expected[16:], atol=1e-4)


@pytest.mark.parametrize("n,context,stride", [(40, 16, 16), (40, 16, 5), (17, 16, 16), (5, 16, 3), (100, 7, 1)])
def test_windows_score_every_token_once(n, context, stride):
    scored = []
    for start, end, first in window_spans(n, context, stride):
        assert end - start <= context and start < first < end  # every window scores a token
        scored += range(first, end)
    spans = window_spans(n, context, stride)
    if stride < context:  # overlapping windows: every token but the stream's first, once
        assert scored == list(range(1, n))
    else:  # non-overlapping: a token that would start a window has no context and is not scored
        assert scored == [t for t in range(1, n) if t % context != 0]
        assert len(spans) == -(-(n - 1) // context)


def test_strided_perplexity_matches_direct(tiny_llama):
    tokens = random_tokens(40, 7)
    out = perplexity(tiny_llama, tokens, context=16, stride=8)
    # by hand: window k starts at 8k; tokens 1..15 from window 0, then each window scores its last 8
    nll = list(-direct_logprobs(tiny_llama, tokens[:16]))
    for start in (8, 16, 24):
        nll += list(-direct_logprobs(tiny_llama, tokens[start : start + 16])[-8:])
    assert out["tokens"] == 39 and out["windows"] == 4
    assert out["nll"] == pytest.approx(np.mean(nll), abs=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    lo, hi = out["ci95"]
    assert lo < out["perplexity"] < hi


def test_uniform_model_has_perplexity_of_the_vocabulary():
    model = Bigram(np.full((64, 64), 1 / 64))
    out = perplexity(model, list(range(1, 50)), context=10)
    assert out["perplexity"] == pytest.approx(64, rel=1e-5)
    assert out["tokens"] == 49 - 5  # five windows, each first token without context


def known_bigram() -> np.ndarray:
    """After 'a' (33): ' ' (32) has p 1/100.4; after ' ': uniform; after 'c' (35): 'c' p 60/123."""
    table = np.full((64, 64), 1.0)
    table[33, 34], table[33, 35], table[35, 35] = 32.0, 6.4, 60.0
    return table / table.sum(axis=1, keepdims=True)


def test_known_answer_acc_and_acc_norm():
    table = known_bigram()
    model, tok = Bigram(table), CharTokenizer()
    # after the context "xa": " b" costs log p(' '|a) + log p(b|' '), " cccc" two more steps of p(c|c)
    item = ChoiceItem("xa", ["b", "cccc"], gold=0)
    pairs = [encode_pair(tok, c, x) for c, x in choice_prompts("hellaswag", item)]
    scores = score_continuations(model, pairs)
    space, a, b, c = 32, 33, 34, 35
    ll_b = math.log(table[a, space]) + math.log(table[space, b])
    ll_c = math.log(table[a, space]) + math.log(table[space, c]) + 3 * math.log(table[c, c])
    assert [s.logprob for s in scores] == pytest.approx([ll_b, ll_c], abs=1e-5)
    assert ll_b > ll_c and ll_b / 1 < ll_c / 4  # acc picks "b", acc_norm (per character) picks "cccc"
    out = evaluate_choices(model, tok, "hellaswag", [item, ChoiceItem("xa", ["b", "cccc"], gold=1)])
    assert out["accuracy"] == 0.5 and out["accuracy_norm"] == 0.5
    assert out["correct"] == [1.0, 0.0] and out["correct_norm"] == [0.0, 1.0]
    assert out["accuracy_se"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))


def test_lambada_greedy_match_and_perplexity():
    tok = CharTokenizer()
    x, space, a, b, c = tok.encode("x ab"), 32, 33, 34, 35
    x = x[0]
    table = known_bigram()
    table[x, space], table[space, a] = 0.9, 0.9  # greedy path from "x": " ", "a", then "b"
    table = table / table.sum(axis=1, keepdims=True)
    out = evaluate_lambada(Bigram(table), tok, [ClozeItem("x", "ab"), ClozeItem("x", "ac")])
    assert out["correct"] == [1.0, 0.0]
    lt = np.log(table)
    ll = [lt[x, space] + lt[space, a] + lt[a, b], lt[x, space] + lt[space, a] + lt[a, c]]
    assert out["perplexity"] == pytest.approx(math.exp(-np.mean(ll)), rel=1e-5)


def test_encode_pair_moves_trailing_space_into_the_continuation():
    tok = CharTokenizer()
    assert encode_pair(tok, "ab ", "c") == ([33, 34], [32, 35])
    assert encode_pair(tok, "", "c") == ([0], [35])


def test_prompts_follow_the_harness():
    item = ChoiceItem("Question: Why?\n", ["Because.", "No."], 0)
    assert choice_prompts("arc_easy", item)[0] == ("Question: Why?\nAnswer:", " Because.")
    assert choice_prompts("piqa", ChoiceItem("Open a jar", ["twist"], 0))[0][0] == "Question: Open a jar\nAnswer:"
    assert choice_prompts("hellaswag", ChoiceItem("A man. he", ["runs."], 0)) == [("A man. he", " runs.")]


# ------------------------------------------------------------------------------------------ parsers

HELLASWAG = "Ctx one: a man. he\n2\nend a\nend b\nend c\nend d\nCtx two. she\n0\ne1\ne2\ne3\ne4\n"


def test_parse_hellaswag_text(tmp_path):
    path = tmp_path / "h.txt"
    path.write_text(HELLASWAG)
    items = read_hellaswag_text(path)
    assert [i.gold for i in items] == [2, 0]
    assert items[0].context == "Ctx one: a man. he" and items[1].choices == ["e1", "e2", "e3", "e4"]
    assert read_task("hellaswag", path) == items


@pytest.mark.parametrize(
    "text,line,what",
    [
        (HELLASWAG.replace("\n0\n", "\nzero\n"), 8, "gold label"),
        (HELLASWAG + "ctx three\n1\nonly one ending\n", 13, "6 lines"),
        (HELLASWAG.replace("end c", ""), 5, "empty ending"),
    ],
)
def test_malformed_hellaswag_names_file_and_line(tmp_path, text, line, what):
    path = tmp_path / "h.txt"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=rf"h\.txt:{line}: .*{what}"):
        read_hellaswag_text(path)


def test_parse_choice_jsonl(tmp_path):
    path = tmp_path / "arc.jsonl"
    rows = [
        {"query": "Question: a?", "choices": ["x", "y", "z", "w"], "gold": 3},
        {"query": "q", "choices": ["1", "2"], "gold": 0},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = read_choice_jsonl(path)
    assert items == [ChoiceItem("Question: a?", ["x", "y", "z", "w"], 3), ChoiceItem("q", ["1", "2"], 0)]
    assert read_task("arc_easy", path) == items and read_task("piqa", path) == items


@pytest.mark.parametrize(
    "bad,what",
    [
        ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "gold"),
        ('{"query": "q", "choices": "ab", "gold": 0}', "choices"),
        ('{"choices": ["a", "b"], "gold": 0}', "query"),
        ('{"query": "q", "choices": ["a", "b"], "gold": 0', "not a JSON object"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_choice_jsonl_names_file_and_line(tmp_path, bad, what):
    path = tmp_path / "piqa.jsonl"
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 1}\n' + bad + "\n")
    with pytest.raises(DataFormatError, match=rf"piqa\.jsonl:2: .*{what}"):
        read_choice_jsonl(path)


def test_parse_lambada(tmp_path):
    path = tmp_path / "lambada.jsonl"
    path.write_text('{"context": "He said", "continuation": "hello"}\n{"context": "x", "continuation": " y "}\n')
    assert read_lambada(path) == [ClozeItem("He said", "hello"), ClozeItem("x", "y")]
    path.write_text('{"context": "He said", "continuation": "hello"}\n{"context": "x"}\n')
    with pytest.raises(DataFormatError, match=r"lambada\.jsonl:2: "):
        read_lambada(path)


def test_unrecognised_format_is_an_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just some text\nmore\n")
    with pytest.raises(DataFormatError, match=r"notes\.txt:1: .*JSON lines"):
        read_task("arc_easy", text)
    with pytest.raises(DataFormatError, match=r"notes\.txt:1: "):
        read_task("lambada", text)
    with pytest.raises(DataFormatError, match=r"notes\.txt:2: "):
        read_task("hellaswag", text)
    with pytest.raises(UsageError, match="no such file"):
        read_task("piqa", tmp_path / "missing.jsonl")


def test_shared_data_parses(shared_data):
    counts = {"hellaswag": 10042, "arc_easy": 2376, "piqa": 1838, "lambada": 5153}
    files = {"hellaswag": "hellaswag_val.txt", "arc_easy": "arc_easy.jsonl", "piqa": "piqa.jsonl"}
    files["lambada"] = "lambada_openai.jsonl"
    for task, count in counts.items():
        assert len(read_task(task, shared_data / "zeroshot" / files[task])) == count


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_malformed_data_is_one_line(tmp_path, default_bundle, capsys):
    path = tmp_path / "arc.jsonl"
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q"}\n')
    rc = main(["eval", "--model", str(default_bundle), "--task", "arc_easy", "--data", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and f"{path}:2:" in err[0]


def test_cli_bad_options(default_bundle, capsys):
    rc = main(["eval", "--model", str(default_bundle), "--perplexity", "x.txt", "--context", "8", "--stride", "9"])
    assert rc == 1 and "--stride 9" in capsys.readouterr().err


def test_compare_task_on_default_model(tmp_path, default_bundle, shared_data, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(default_bundle), "--task", "arc_easy", "--limit", "2", "--compare"]
    argv += ["--selector", "all", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "resident" in printed and "flash" in printed and "difference" in printed
    runs = json.loads(out.read_text())["runs"]
    assert [r["mode"] for r in runs] == ["resident", "flash"]
    assert all(r["items"] == 2 and 0 <= r["accuracy"] <= 1 for r in runs)
    # every neuron selected: flash's masked forward is the dense one
    assert runs[0]["accuracy"] == runs[1]["accuracy"] and runs[0]["accuracy_norm"] == runs[1]["accuracy_norm"]


def test_compare_perplexity_on_default_model(tmp_path, default_bundle, shared_data, capsys):
    out = tmp_path / "ppl.json"
    text = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    argv = ["eval", "--model", str(default_bundle), "--perplexity", str(text), "--tokens", "40", "--context", "20"]
    argv += ["--compare", "--compare-mode", "naive", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    resident, naive = report["runs"]
    assert (resident["mode"], naive["mode"]) == ("resident", "naive")
    assert resident["tokens"] == 38 and resident["context"] == 20 and resident["stride"] == 20
    assert 1 < resident["perplexity"] < 1e4
    assert naive["perplexity"] == pytest.approx(resident["perplexity"], rel=1e-6)  # naive reads the same weights
    assert report["difference"]["perplexity"] == pytest.approx(0, abs=1e-3)


def test_difference_of_lambada_runs_formats():
    """LAMBADA runs carry accuracy and last-word perplexity but no text NLL."""
    base = {"accuracy": 0.4, "perplexity": 40.0, "correct": [1, 0, 1]}
    other = {"accuracy": 0.3, "perplexity": 80.0, "correct": [1, 0, 0]}
    line = format_difference(difference(base, other))
    assert "perplexity +40.000 (+100.00%)" in line and "acc -10.0" in line and "NLL" not in line


def test_flash_masked_scoring_batches_rows_as_one_at_a_time(tmp_path):
    """Flash evaluation scores a task's choices as one padded batch (each row its own per-position
    selections); that must equal scoring them one sequence at a time, and differ from dense."""
    path = mlxflash.convert(make_hf_dir(tmp_path / "src"), tmp_path / "b", bits=4, group_size=32, progress=False)
    flash, _ = mlxflash.load(path, mode="flash", selector="gate", density=0.25, window=2, masked_prompts=True)
    dense, _ = mlxflash.load(path, mode="resident")
    ctx = random_tokens(9, 11)
    pairs = [(ctx, random_tokens(k, 20 + k)) for k in (3, 1, 5)]
    batched = [s.logprob for s in score_continuations(flash, pairs)]
    single = [s.logprob for s in score_continuations(flash, pairs, batch=False)]
    assert batched == pytest.approx(single, abs=1e-4)
    assert batched != pytest.approx([s.logprob for s in score_continuations(dense, pairs)], abs=1e-3)
