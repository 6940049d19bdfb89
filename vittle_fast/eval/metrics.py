"""Answer metrics: POPE yes/no scores with LLaVA's normalisation, exact-match / contains accuracy,
per-token NLL of the reference answers. Inputs are LLaVA answer records (``answers.jsonl`` lines)
whose ``metadata`` carries our reference, NLL and token count."""
from __future__ import annotations

import re
import string

import torch
import torch.nn.functional as F

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def pope_yes_no(text: str) -> str:
    """LLaVA's ``eval_pope.py`` normalisation, as released: keep the first sentence, drop commas, and
    answer "no" iff one of the words is ``No``, ``no`` or ``not`` -- anything else counts as "yes"."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def contains(prediction: str, reference: str) -> bool:
    """The normalised reference appears in the normalised prediction as whole words."""
    return f" {normalize_answer(reference)} " in f" {normalize_answer(prediction)} "


def is_yes_no(reference: str) -> bool:
    return normalize_answer(reference) in ("yes", "no")


def pope_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """POPE's accuracy / precision / recall / F1 / yes-ratio with "yes" the positive class, as
    ``eval_pope.py`` computes them (a zero denominator gives 0 instead of an exception)."""
    pred = [pope_yes_no(p) == "yes" for p in predictions]
    label = [normalize_answer(r) == "yes" for r in references]
    tp = sum(p and t for p, t in zip(pred, label))
    fp = sum(p and not t for p, t in zip(pred, label))
    tn = sum(not p and not t for p, t in zip(pred, label))
    fn = sum(not p and t for p, t in zip(pred, label))
    n = len(pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(pred) / n if n else 0.0}


def summarize(answers: list[dict]) -> dict:
    """metrics.json content for answer records (``text`` + ``metadata.reference/nll_sum/n_ref_tokens``).

    ``nll_per_token`` is the token-weighted mean over every reference token (answer + end token);
    ``teacher_forced_accuracy`` the fraction of references whose every token is the argmax (what
    greedy decoding would reproduce exactly, up to ties)."""
    scored = [a for a in answers if a["metadata"].get("reference") is not None]
    predictions = [a["text"] for a in scored]
    references = [a["metadata"]["reference"] for a in scored]
    result = {"n_answers": len(answers), "n_with_reference": len(scored)}
    if scored:
        result["exact_match"] = sum(map(exact_match, predictions, references)) / len(scored)
        result["contains"] = sum(map(contains, predictions, references)) / len(scored)
        tokens = sum(a["metadata"]["n_ref_tokens"] for a in scored)
        result["nll_per_token"] = sum(a["metadata"]["nll_sum"] for a in scored) / max(tokens, 1)
        result["teacher_forced_accuracy"] = sum(a["metadata"]["tf_correct"] for a in scored) / len(scored)
    yes_no = [(p, r) for p, r in zip(predictions, references) if is_yes_no(r)]
    if yes_no:
        result["pope"] = pope_scores(*map(list, zip(*yes_no)))
    categories = sorted({a["metadata"].get("category") for a in scored} - {None})
    if categories:
        result["by_category"] = {
            c: {"n": len(sel), "exact_match": sum(exact_match(a["text"], a["metadata"]["reference"]) for a in sel) / len(sel)}
            for c in categories for sel in [[a for a in scored if a["metadata"].get("category") == c]]}
    return result


def reference_scores(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """Per row of next-token ``logits`` [B, S, V] and ``targets`` [B, S]: summed NLL (fp32), number of
    target tokens, and whether every target is the argmax (greedy decoding would reproduce it)."""
    logits = logits.float()
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=ignore_index, reduction="none")
    counted = targets != ignore_index
    all_argmax = ((logits.argmax(-1) == targets) | ~counted).all(1) & counted.any(1)
    return nll.sum(1), counted.sum(1), all_argmax
