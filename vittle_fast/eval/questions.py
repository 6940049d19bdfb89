"""Evaluation questions from LLaVA's two formats, as (history, question, reference) items.

- The question JSONL of LLaVA's ``model_vqa_loader`` (POPE, VQAv2, ...): one object per line with
  ``question_id``, ``image`` (optional) and ``text``; a reference answer, when the file carries one,
  is read from ``answer``, ``label`` (POPE), ``gt_answer`` or ``reference``, else absent.
- LLaVA conversation JSON (the training format, e.g. the demo's ``val.json``): every assistant turn
  becomes one question, with the earlier turns of its conversation as history and the reply as
  reference. A one-turn record keeps its ``id`` as the question id; turn ``k`` of a longer one is
  ``"{id}_{k}"``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from vittle_fast.data.conversation import IMAGE_PLACEHOLDER, parse_conversation

REFERENCE_KEYS = ("answer", "label", "gt_answer", "reference")


@dataclass(frozen=True)
class Question:
    """One item to answer. ``turns`` are (human, reply) pairs; the last reply is the reference (``""``
    when the file has none). ``prompt`` is the asked text without ``<image>`` (LLaVA's answer field)."""

    question_id: object
    image: str | None
    turns: tuple[tuple[str, str], ...]
    reference: str | None
    prompt: str
    category: str | None = None

    def with_human_text(self, transform) -> "Question":
        """A copy whose human messages went through ``transform`` (the replies never do)."""
        turns = tuple((transform(human), reply) for human, reply in self.turns)
        return replace(self, turns=turns, prompt=transform(self.prompt))


def _from_jsonl_line(item: dict, line_number: int) -> Question:
    for key in ("question_id", "text"):
        if key not in item:
            raise ValueError(f"question line {line_number}: missing {key!r}")
    text, image = str(item["text"]), item.get("image")
    human = text if image is None or IMAGE_PLACEHOLDER in text else f"{IMAGE_PLACEHOLDER}\n{text}"
    reference = next((str(item[key]) for key in REFERENCE_KEYS if item.get(key) is not None), None)
    return Question(item["question_id"], image, ((human, reference or ""),), reference,
                    text.replace(IMAGE_PLACEHOLDER, "").strip(), item.get("category"))


def _from_conversation(record: dict, index: int) -> list[Question]:
    turns = parse_conversation(record.get("conversations"))
    record_id = record.get("id", index)
    image = record.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            raise ValueError(f"record {record_id!r}: evaluation takes one image per question, got {len(image)}")
        image = image[0]
    questions = []
    for k, (human, reply) in enumerate(turns):
        question_id = record_id if len(turns) == 1 else f"{record_id}_{k}"
        questions.append(Question(question_id, image, tuple(turns[:k + 1]), reply,
                                  human.replace(IMAGE_PLACEHOLDER, "").strip()))
    return questions


def load_questions(path: str | os.PathLike, limit: int | None = None) -> list[Question]:
    """Questions of a ``.jsonl`` question file or a LLaVA conversation ``.json``, in file order;
    the first ``limit`` when given. Question ids must be unique (answers are keyed by them)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        questions = [q for i, record in enumerate(json.loads(text)) for q in _from_conversation(record, i)]
    else:
        questions = [_from_jsonl_line(json.loads(line), n) for n, line in enumerate(text.splitlines(), 1)
                     if line.strip()]
    if limit is not None:
        questions = questions[:limit]
    seen = set()
    for q in questions:
        if key_of(q.question_id) in seen:
            raise ValueError(f"{path}: question_id {q.question_id!r} appears twice")
        seen.add(key_of(q.question_id))
    return questions


def key_of(question_id: object) -> str:
    """A hashable, type-stable key of a question id (ints and strings from JSON)."""
    return json.dumps(question_id)
