"""Evaluation: answer LLaVA question files with an exported model, score them, perturb them.

    python -m vittle_fast.eval --model DIR --questions FILE --images DIR --out OUT_DIR \
        [--perturb KIND:SEVERITY] [--batch_size B] [--max_new_tokens K] [--limit N]

docs/robustness.md describes the outputs, the perturbation suite and the representation metrics.
"""
from .metrics import pope_scores, pope_yes_no, summarize
from .perturb import KINDS, Perturbation, perturb_image, perturb_text
from .questions import Question, load_questions
from .representation import cosine_distance, gaussian_jsd
from .runner import ExportedModel, evaluate

__all__ = ["KINDS", "ExportedModel", "Perturbation", "Question", "cosine_distance", "evaluate",
           "gaussian_jsd", "load_questions", "perturb_image", "perturb_text", "pope_scores", "pope_yes_no",
           "summarize"]
