"""Batched evaluation of an exported model: answers (LLaVA's format), metrics, optional hidden states.

Per batch of questions: one teacher-forced forward over prompt + reference (per-token NLL of the
reference, and the bottleneck-layer representations for ``dump_hidden``), then posterior-mean
generation from the left-padded prompts with the KV cache. Under ``torchrun`` every rank answers the
questions ``rank::world_size`` and appends them to its own part file as it goes; rank 0 merges the
parts in question order. Rerunning into the same directory skips answered question ids.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from PIL import Image

from vittle_fast.data.conversation import (
    IGNORE_INDEX,
    VICUNA_V1_SYSTEM,
    render_chat_template,
    render_vicuna_v1,
    tokenize_rendered,
)
from vittle_fast.data.image import preprocess_image
from vittle_fast.models import LlavaVittle, llava_from_hf

from .metrics import reference_scores, summarize
from .perturb import Perturbation, perturb_image, perturb_text
from .questions import Question, key_of, load_questions

ANSWERS_FILE = "answers.jsonl"
METRICS_FILE = "metrics.json"
HIDDEN_FILE = "hidden.pt"


@dataclass
class ExportedModel:
    """An exported model directory, ready to answer: model (eval mode), tokenizer, prompt template,
    the inference alpha and the id written into the answers."""

    model: LlavaVittle
    tokenizer: object
    template: str
    alpha: float
    model_id: str

    @classmethod
    def load(cls, model_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
             alpha: float | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "ExportedModel":
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        model = llava_from_hf(model_dir, dtype, device=device).eval()
        train_config = _training_config(model_dir)
        tokenizer_dir = tokenizer_dir or model_dir
        if not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
            raise ValueError(f"{tokenizer_dir} holds no tokenizer: export with this version of the trainer "
                             "(it bundles the tokenizer) or pass a tokenizer directory")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        template = train_config.get("data", {}).get("template", "vicuna_v1")
        if alpha is None:  # the export's final training alpha (VittleConfig.alpha)
            alpha = model.bottleneck.config.alpha if model.bottleneck is not None else 0.0
        return cls(model, tokenizer, template, float(alpha), model_dir.resolve().name)

    @property
    def device(self) -> torch.device:
        return self.model.projector.linear_1.weight.device

    def encode(self, question: Question) -> tuple[list[int], list[int]]:
        """(prompt ids ending where the assistant reply starts, reference ids incl. the end token);
        both come from one tokenization of the full conversation, exactly as in training."""
        turns = list(question.turns)
        if self.template == "vicuna_v1":
            text, spans = render_vicuna_v1(turns, VICUNA_V1_SYSTEM, self.tokenizer.eos_token)
        else:
            text, spans = render_chat_template(turns, self.tokenizer, None)
        settings = dict(image_token_id=self.model.image_token_id, num_image_tokens=self.model.num_image_tokens,
                        add_bos=self.template == "vicuna_v1")
        if question.reference is None:
            ids, _ = tokenize_rendered(text[:spans[-1][0]], [], self.tokenizer, **settings)
            return ids, []
        ids, labels = tokenize_rendered(text, spans[-1:], self.tokenizer, **settings)
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        return ids[:first], ids[first:]


def _training_config(model_dir: Path) -> dict:
    path = model_dir / "training_config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L], attention mask [B, L] bool), each row right-aligned."""
    length = max(map(len, sequences))
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq):] = torch.tensor(seq)
            mask[row, length - len(seq):] = True
    return ids, mask


class Evaluator:
    """Answers batches of questions with one :class:`ExportedModel` (optionally perturbed inputs)."""

    def __init__(self, exported: ExportedModel, images_dir: str | os.PathLike | None, *,
                 perturbation: Perturbation | None = None, perturb_seed: int = 0, max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0, hidden_layer: int | None = None):
        self.exported = exported
        self.images_dir = Path(images_dir) if images_dir is not None else None
        self.perturbation, self.perturb_seed = perturbation, perturb_seed
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.generator = torch.Generator(exported.device).manual_seed(seed)
        model = exported.model
        bottleneck = model.bottleneck
        depth = len(model.language_model.layers)
        self.hidden_layer = hidden_layer if hidden_layer is not None else (
            bottleneck.config.layer_t if bottleneck is not None else (depth * 3) // 4)
        if not 0 <= self.hidden_layer < depth:
            raise ValueError(f"hidden_layer must be in [0, {depth}), got {self.hidden_layer}")

    def prepare(self, question: Question) -> tuple[Question, Image.Image | None]:
        """The question and its image with the perturbation applied (deterministic per question id)."""
        p = self.perturbation
        if p is not None and p.is_text:
            question = question.with_human_text(
                lambda text: perturb_text(text, p.kind, p.severity, seed=self.perturb_seed, key=question.question_id))
        image = None
        if question.image is not None:
            if self.images_dir is None:
                raise ValueError(f"question {question.question_id!r} has an image but no --images folder was given")
            path = self.images_dir / question.image
            if not path.is_file():
                raise FileNotFoundError(f"question {question.question_id!r}: no image file {path}")
            with Image.open(path) as raw:
                image = raw.convert("RGB")
            if p is not None and not p.is_text:
                image = perturb_image(image, p.kind, p.severity, seed=self.perturb_seed, key=question.question_id)
        return question, image

    @torch.no_grad()
    def answer(self, questions: list[Question], dump_hidden: bool = False) -> tuple[list[dict], dict | None]:
        """LLaVA answer records for ``questions`` (one batch), and their pooled hidden states."""
        ex, model = self.exported, self.exported.model
        prepared = [self.prepare(q) for q in questions]
        encoded = [ex.encode(q) for q, _ in prepared]
        images = [preprocess_image(img, model.vision_tower.config.image_size) for _, img in prepared if img is not None]
        pixel_values = torch.stack(images).to(ex.device, model.projector.linear_1.weight.dtype) if images else None
        pad_id = ex.tokenizer.pad_token_id if ex.tokenizer.pad_token_id is not None else ex.tokenizer.eos_token_id

        scores, hidden = self._score(encoded, pixel_values, pad_id, dump_hidden)
        prompt_ids, prompt_mask = left_pad([p for p, _ in encoded], pad_id)
        new_tokens = model.generate(prompt_ids.to(ex.device), pixel_values, attention_mask=prompt_mask.to(ex.device),
                                    max_new_tokens=self.max_new_tokens, vittle_alpha=ex.alpha,
                                    temperature=self.temperature, eos_token_id=ex.tokenizer.eos_token_id,
                                    generator=self.generator)
        records = []
        perturb = None if self.perturbation is None else str(self.perturbation)
        for (question, _), tokens, score in zip(prepared, new_tokens.tolist(), scores):
            if ex.tokenizer.eos_token_id in tokens:
                tokens = tokens[:tokens.index(ex.tokenizer.eos_token_id)]
            text = ex.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            answer_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{ex.model_id}/{key_of(question.question_id)}/{perturb}").hex
            records.append({"question_id": question.question_id, "prompt": question.prompt, "text": text,
                            "answer_id": answer_id, "model_id": ex.model_id,
                            "metadata": {"reference": question.reference, "category": question.category,
                                         "perturb": perturb, "alpha": ex.alpha, **score}})
        if hidden is not None:
            hidden["question_id"] = [q.question_id for q in questions]
        return records, hidden

    def _score(self, encoded, pixel_values, pad_id, dump_hidden):
        """Teacher-forced pass over prompt + reference: per-question NLL sum, reference token count,
        whether every reference token is the argmax; pooled prompt representations if asked."""
        ex, model = self.exported, self.exported.model
        ids, mask = left_pad([p + a for p, a in encoded], pad_id)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, (_, answer) in enumerate(encoded):
            if answer:
                labels[row, ids.shape[1] - len(answer):] = torch.tensor(answer)
        ids, mask, labels = ids.to(ex.device), mask.to(ex.device), labels.to(ex.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        captured: dict[int, torch.Tensor] = {}
        layers = {self.hidden_layer}
        if dump_hidden and model.bottleneck is not None:
            layers |= {model.bottleneck.config.layer_v, model.bottleneck.config.layer_t}
        handles = [model.language_model.layers[i].register_forward_hook(
            lambda _m, _i, out, i=i: captured.__setitem__(i, out)) for i in (layers if dump_hidden else ())]
        try:
            logits = model(ids, attention_mask=mask, position_ids=positions, pixel_values=pixel_values,
                           vittle_alpha=ex.alpha).logits[:, :-1]
        finally:
            for handle in handles:
                handle.remove()
        nll, counted, correct = reference_scores(logits, labels[:, 1:], IGNORE_INDEX)
        scores = [{"nll_sum": float(n), "n_ref_tokens": int(c), "tf_correct": bool(ok)}
                  for n, c, ok in zip(nll.tolist(), counted.tolist(), correct.tolist())]
        hidden = self._pool(captured, ids, self._pooled_tokens(ids, mask & (labels == IGNORE_INDEX))) if dump_hidden else None
        return scores, hidden

    def _pooled_tokens(self, ids, prompt_mask):
        """The prompt tokens from the first image token on (image + question), or the whole prompt when
        a row has no image: the system prompt before the image is the same for every question, and its
        states (causal attention) would only add a common vector to every representation."""
        seen_image = (ids == self.exported.model.image_token_id).long().cumsum(1) > 0
        has_image = seen_image[:, -1:]
        return prompt_mask & (seen_image | ~has_image)

    def _pool(self, captured, ids, prompt_mask) -> dict[str, torch.Tensor]:
        """Mean over each question's pooled tokens (``_pooled_tokens``) of the layer's output h and,
        with a bottleneck, of its posterior mean z = mu (the MLP's first half, per modality)."""
        model = self.exported.model
        weights = prompt_mask.unsqueeze(-1).float()
        count = weights.sum(1).clamp(min=1)
        pooled = {"h": (captured[self.hidden_layer].float() * weights).sum(1) / count}
        if model.bottleneck is not None:
            cfg, dim = model.bottleneck.config, captured[self.hidden_layer].shape[-1]
            mu_v = model.bottleneck.mlp("visual")(captured[cfg.layer_v])[..., :dim]
            mu_t = model.bottleneck.mlp("text")(captured[cfg.layer_t])[..., :dim]
            mu = torch.where((ids == model.image_token_id).unsqueeze(-1), mu_v, mu_t)
            pooled["z"] = (mu.float() * weights).sum(1) / count
        return {name: value.cpu() for name, value in pooled.items()}


def _read_answers(paths) -> dict[str, dict]:
    answers = {}
    for path in paths:
        if Path(path).is_file():
            for line in Path(path).read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    answers[key_of(record["question_id"])] = record
    return answers


def _part_files(out_dir: Path, pattern: str) -> list[Path]:
    return sorted(out_dir.glob(pattern))


def _dist_setup(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group) under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), world, True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    return 0, 1, False


def evaluate(model_dir: str | os.PathLike, questions_path: str | os.PathLike, images_dir: str | os.PathLike | None,
             out_dir: str | os.PathLike, *, perturb: str | None = None, batch_size: int = 8,
             max_new_tokens: int = 32, limit: int | None = None, temperature: float = 0.0, seed: int = 0,
             perturb_seed: int = 0, dump_hidden: bool = False, hidden_layer: int | None = None,
             alpha: float | None = None, device: str | None = None, dtype: torch.dtype = torch.float32,
             tokenizer_dir: str | os.PathLike | None = None, progress: bool = True,
             exported: ExportedModel | None = None) -> dict | None:
    """Answer every question not yet answered in ``out_dir``; write ``answers.jsonl`` and
    ``metrics.json`` (and ``hidden.pt`` with ``dump_hidden``). Returns the metrics on rank 0.
    ``exported`` reuses a loaded model (several perturbations in one process)."""
    if batch_size < 1 or max_new_tokens < 1 or (limit is not None and limit < 0):
        raise ValueError(f"batch_size and max_new_tokens must be >= 1 and limit >= 0, got "
                         f"{batch_size}, {max_new_tokens}, {limit}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, owns_group = _dist_setup(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    try:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        questions = load_questions(questions_path, limit)
        perturbation = Perturbation.parse(perturb) if perturb else None
        if exported is None:
            exported = ExportedModel.load(model_dir, tokenizer_dir=tokenizer_dir, alpha=alpha, device=device, dtype=dtype)
        evaluator = Evaluator(exported, images_dir, perturbation=perturbation, perturb_seed=perturb_seed,
                              max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + rank,
                              hidden_layer=hidden_layer)
        done = _read_answers([out / ANSWERS_FILE, *_part_files(out, "answers.part*.jsonl")])
        mine = [q for q in questions[rank::world] if key_of(q.question_id) not in done]
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(mine) * world, desc="eval", dynamic_ncols=True)
        part = out / f"answers.part{rank:05d}.jsonl"
        hidden_dir = out / "hidden_parts"
        with open(part, "a", encoding="utf-8") as f:
            for start in range(0, len(mine), batch_size):
                batch = mine[start:start + batch_size]
                records, hidden = evaluator.answer(batch, dump_hidden)
                if hidden is not None:  # written before the answers: an answered id always has its hidden state
                    hidden_dir.mkdir(exist_ok=True)
                    torch.save(hidden, hidden_dir / f"{uuid.uuid4().hex}.pt")
                f.writelines(json.dumps(r) + "\n" for r in records)
                f.flush()
                if bar is not None:
                    bar.update(len(batch) * world)
        if bar is not None:
            bar.close()
        if world > 1:
            dist.barrier()
        if rank != 0:
            return None
        return _merge(out, questions, dump_hidden, {"model_id": exported.model_id, "alpha": exported.alpha,
                                                     "perturb": perturb, "questions": str(questions_path)})
    finally:
        if owns_group:
            dist.barrier()
            dist.destroy_process_group()


def _merge(out: Path, questions: list[Question], dump_hidden: bool, info: dict) -> dict:
    """answers.jsonl in question order (answers of ids no longer asked kept after them), metrics.json,
    hidden.pt; part files are removed once merged."""
    parts = _part_files(out, "answers.part*.jsonl")
    answers = _read_answers([out / ANSWERS_FILE, *parts])
    order = {key_of(q.question_id): i for i, q in enumerate(questions)}
    ordered = sorted(answers.values(), key=lambda a: order.get(key_of(a["question_id"]), len(order)))
    tmp = out / (ANSWERS_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(a) + "\n" for a in ordered))
    tmp.replace(out / ANSWERS_FILE)
    for part in parts:
        part.unlink()
    asked = [a for a in ordered if key_of(a["question_id"]) in order]
    metrics = {**info, **summarize(asked)}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    if dump_hidden:
        _merge_hidden(out, order)
    return metrics


def _merge_hidden(out: Path, order: dict[str, int]) -> None:
    chunks = [torch.load(out / HIDDEN_FILE)] if (out / HIDDEN_FILE).is_file() else []
    shard_files = sorted((out / "hidden_parts").glob("*.pt")) if (out / "hidden_parts").is_dir() else []
    chunks += [torch.load(path) for path in shard_files]
    if not chunks:
        return
    rows: dict[str, tuple[object, dict[str, torch.Tensor]]] = {}
    for chunk in chunks:
        for i, qid in enumerate(chunk["question_id"]):
            rows[key_of(qid)] = (qid, {name: chunk[name][i] for name in chunk if name != "question_id"})
    keys = sorted(rows, key=lambda k: order.get(k, len(order)))
    merged = {"question_id": [rows[k][0] for k in keys]}
    for name in rows[keys[0]][1]:
        merged[name] = torch.stack([rows[k][1][name] for k in keys])
    torch.save(merged, out / HIDDEN_FILE)
    for path in shard_files:
        path.unlink()
