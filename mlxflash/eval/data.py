"""Evaluation data: the zero-shot tasks' file formats (parsed with errors that name the file and line),
their default files under ../shared/data, the prompts lm-evaluation-harness writes for them, and the
tokens of a text file for perplexity."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

TASKS = ("hellaswag", "arc_easy", "piqa", "lambada")
DATA_FILES = {
    "hellaswag": "zeroshot/hellaswag_val.txt",
    "arc_easy": "zeroshot/arc_easy.jsonl",
    "piqa": "zeroshot/piqa.jsonl",
    "lambada": "zeroshot/lambada_openai.jsonl",
}
SHARED_DATA = Path("../shared/data")  # the project's convention, relative to the checkout


class DataFormatError(UsageError):
    """An evaluation file is not in a format the parsers know; the message names the file and line."""


# --------------------------------------------------------------------------------------------- data


@dataclass
class ChoiceItem:
    """A multiple-choice item: the context, the choices (continuations) and the gold index."""

    context: str
    choices: list[str]
    gold: int


@dataclass
class ClozeItem:
    """A LAMBADA item: the context and the word that completes it."""

    context: str
    target: str


def _bad(path: Path, line: int, what: str) -> DataFormatError:
    return DataFormatError(f"{path}:{line}: {what}")


def _json_lines(path: Path):
    """(line number, object) for each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _bad(path, n, f"not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict):
                raise _bad(path, n, f"expected a JSON object, found {type(obj).__name__}")
            yield n, obj


def _choice_item(path: Path, n: int, obj: dict) -> ChoiceItem:
    query, choices, gold = obj.get("query"), obj.get("choices"), obj.get("gold")
    if not isinstance(query, str):
        raise _bad(path, n, 'expected {"query": str, "choices": [str, ...], "gold": int}; "query" missing or not text')
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
        raise _bad(path, n, '"choices" must be a list of at least two strings')
    if not (isinstance(gold, int) and 0 <= gold < len(choices)):
        raise _bad(path, n, f'"gold" must be an index into the {len(choices)} choices, found {gold!r}')
    return ChoiceItem(query, choices, gold)


def read_choice_jsonl(path: str | Path) -> list[ChoiceItem]:
    """ARC/PIQA JSON lines: {"query", "choices", "gold"} (mosaicml/llm-foundry local eval format)."""
    path = Path(path)
    return [_choice_item(path, n, obj) for n, obj in _json_lines(path)]


def read_hellaswag_text(path: str | Path) -> list[ChoiceItem]:
    """HellaSwag text: 6 lines per item, context / gold label 0-3 / four endings (llama.cpp's format)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    items = []
    for start in range(0, len(lines), 6):
        block = lines[start : start + 6]
        label = block[1].strip() if len(block) > 1 else ""
        if len(block) > 1 and label not in ("0", "1", "2", "3"):
            raise _bad(path, start + 2, f"expected the gold label 0-3, found {label[:40]!r}")
        if len(block) < 6:
            raise _bad(path, start + 1, f"an item needs 6 lines (context, label, 4 endings), found {len(block)}")
        for k, line in enumerate(block[2:]):
            if not line.strip():
                raise _bad(path, start + 3 + k, "empty ending")
        items.append(ChoiceItem(block[0], block[2:], int(label)))
    return items


def read_lambada(path: str | Path) -> list[ClozeItem]:
    """LAMBADA JSON lines: {"context", "continuation"}."""
    path = Path(path)
    items = []
    for n, obj in _json_lines(path):
        context, target = obj.get("context"), obj.get("continuation")
        if not (isinstance(context, str) and isinstance(target, str) and target.strip()):
            raise _bad(path, n, 'expected {"context": str, "continuation": str}')
        items.append(ClozeItem(context, target.strip()))
    return items


def read_task(task: str, path: str | Path) -> list[ChoiceItem] | list[ClozeItem]:
    """The items of a task's file; the format is recognised from the first line."""
    path = Path(path)
    if task not in TASKS:
        raise UsageError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    is_json = first.lstrip().startswith("{")
    if task == "lambada":
        if not is_json:
            raise _bad(path, 1, 'LAMBADA expects JSON lines {"context", "continuation"}')
        return read_lambada(path)
    if is_json:
        return read_choice_jsonl(path)
    if task == "hellaswag":
        return read_hellaswag_text(path)
    raise _bad(path, 1, f'{task} expects JSON lines {{"query", "choices", "gold"}}')


def default_data(task: str) -> Path:
    """The task's file under ../shared/data, from the working directory or else from the checkout."""
    here = SHARED_DATA / DATA_FILES[task]
    checkout = Path(__file__).resolve().parents[2] / SHARED_DATA / DATA_FILES[task]
    return here if here.exists() or not checkout.exists() else checkout.resolve()


def choice_prompts(task: str, item: ChoiceItem) -> list[tuple[str, str]]:
    """(context, continuation) per choice, as lm-evaluation-harness writes them."""
    if task in ("arc_easy", "piqa"):
        query = item.context.strip()
        if not query.startswith("Question:"):
            query = "Question: " + query
        return [(query + "\nAnswer:", " " + c.strip()) for c in item.choices]
    return [(item.context.rstrip(), " " + c.strip()) for c in item.choices]


def read_text_tokens(tokenizer, path: str | Path, limit: int | None) -> list[int]:
    """A text file's tokens (no BOS), the first `limit` of them if given."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if limit:  # tokenize a generous prefix only: whole files can be long
        text = text[: max(limit * 16, 4096)]
    tokens = list(tokenizer.encode(text, add_special_tokens=False))
    tokens = tokens[:limit] if limit else tokens
    if len(tokens) < 2:
        raise UsageError(f"{path}: fewer than 2 tokens to score")
    return tokens
