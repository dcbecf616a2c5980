"""Zero-shot tasks: multiple choice (acc and acc_norm) and LAMBADA (greedy last word, its perplexity)."""

from __future__ import annotations

import math

import numpy as np

from .data import ChoiceItem, ClozeItem, choice_prompts
from .scoring import encode_pair, score_continuations
from .stats import mean_se, progress_bar


def evaluate_choices(model, tokenizer, task: str, items: list[ChoiceItem], progress: bool = False) -> dict:
    """acc (summed log-likelihood) and acc_norm (per character) over multiple-choice items."""
    correct, correct_norm = [], []
    with progress_bar(len(items), "item", progress, task) as bar:
        for item in items:
            prompts = choice_prompts(task, item)
            scores = score_continuations(model, [encode_pair(tokenizer, c, x) for c, x in prompts])
            ll = np.array([s.logprob for s in scores])
            lengths = np.array([len(c.strip()) for c in item.choices], dtype=np.float64)
            correct.append(float(np.argmax(ll) == item.gold))
            correct_norm.append(float(np.argmax(ll / np.maximum(lengths, 1)) == item.gold))
            bar.update(1)
    return _accuracy(task, correct, correct_norm)


def _accuracy(task: str, correct: list[float], correct_norm: list[float] | None) -> dict:
    acc, se = mean_se(correct)
    out = {"task": task, "items": len(correct), "accuracy": acc, "accuracy_se": se, "correct": correct}
    if correct_norm is not None:
        out["accuracy_norm"], out["accuracy_norm_se"] = mean_se(correct_norm)
        out["correct_norm"] = correct_norm
    return out


def evaluate_lambada(model, tokenizer, items: list[ClozeItem], progress: bool = False) -> dict:
    """Exact greedy match of the last word, and the perplexity of the last word."""
    correct, logprobs = [], []
    with progress_bar(len(items), "item", progress, "lambada") as bar:
        for item in items:
            (score,) = score_continuations(model, [encode_pair(tokenizer, item.context.rstrip(), " " + item.target)])
            correct.append(float(score.greedy))
            logprobs.append(score.logprob)
            bar.update(1)
    out = _accuracy("lambada", correct, None)
    mean, se = mean_se(logprobs)
    out.update(perplexity=math.exp(-mean), ci95=[math.exp(-mean - 1.96 * se), math.exp(-mean + 1.96 * se)])
    return out


def evaluate_task(model, tokenizer, task: str, items: list, progress: bool = False) -> dict:
    if task == "lambada":
        return evaluate_lambada(model, tokenizer, items, progress)
    return evaluate_choices(model, tokenizer, task, items, progress)
