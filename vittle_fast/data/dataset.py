"""LLaVA instruction-tuning records -> samples (token ids, labels, pixel values) or skip markers."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from .conversation import (
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    VICUNA_V1_SYSTEM,
    parse_conversation,
    render_chat_template,
    render_vicuna_v1,
    tokenize_rendered,
    truncate,
)
from .errors import BadRecordError, check_int
from .image import CLIP_MEAN, CLIP_STD, preprocess_image

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """One tokenized conversation; ``pixel_values`` is ``[n_images, 3, S, S]`` (n may be 0)."""

    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, -100 where ignored
    pixel_values: torch.Tensor  # [n_images, 3, S, S] float32


@dataclass(frozen=True)
class Skipped:
    """Marker returned instead of a Sample for a bad record; the collator counts it by kind."""

    index: int
    kind: str
    reason: str


class LlavaDataset(Dataset):
    """LLaVA instruction JSON (``id``, optional ``image``, ``conversations``) as a map-style dataset.

    ``__getitem__`` returns a ``Sample``, or for a bad record a ``Skipped`` marker (or raises
    ``BadRecordError`` when ``strict``). Markers travel through DataLoader workers to the collator,
    which turns them into per-kind counts, so the counts are right whatever the number of workers.
    Picklable (records, tokenizer and settings only), so worker processes work.
    """

    def __init__(
        self,
        data: str | os.PathLike | Sequence[dict],
        tokenizer,
        *,
        image_folder: str | os.PathLike | None = None,
        template: str = "vicuna_v1",
        system_prompt: str | None = None,
        image_size: int = 336,
        patch_size: int = 14,
        image_token_id: int | None = None,
        max_length: int = 2048,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        strict: bool = False,
    ):
        self.records, default_folder = _load_records(data)
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("tokenizer must be a fast (tokenizers-backed) tokenizer: offsets are needed")
        if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat_template' needs a tokenizer with a chat_template")
        if template == "vicuna_v1" and (tokenizer.eos_token is None or tokenizer.bos_token_id is None):
            raise ValueError("template='vicuna_v1' needs a tokenizer with bos and eos tokens")
        check_int("image_size", image_size)
        check_int("patch_size", patch_size)
        check_int("max_length", max_length)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
            if image_token_id is None or image_token_id == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {IMAGE_PLACEHOLDER} token; pass image_token_id")
        self.tokenizer = tokenizer
        self.image_folder = os.fspath(image_folder) if image_folder is not None else default_folder
        self.template = template
        self.system_prompt = (VICUNA_V1_SYSTEM if system_prompt is None and template == "vicuna_v1"
                              else system_prompt)
        self.image_size = image_size
        self.num_image_tokens = (image_size // patch_size) ** 2
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.strict = strict
        self.is_multimodal = [isinstance(r, dict) and r.get("image") is not None for r in self.records]
        self.lengths = [self._estimate_length(r) for r in self.records]
        self._warned_kinds: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | Skipped:
        try:
            return self._load(self.records[index])
        except BadRecordError as error:
            if self.strict:
                raise BadRecordError(error.kind, f"record {index}: {error.message}") from None
            if error.kind not in self._warned_kinds:
                self._warned_kinds.add(error.kind)
                logger.warning("skipping record %d (%s); further %s records are only counted",
                               index, error, error.kind)
            return Skipped(index=index, kind=error.kind, reason=error.message)

    def _estimate_length(self, record) -> int:
        """Cheap token-count estimate for length grouping (words + image tokens), as LLaVA does."""
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            return 0
        words = sum(len(str(m.get("value", "")).split())
                    for m in record["conversations"] if isinstance(m, dict))
        return words + self.num_image_tokens * len(_image_paths(record.get("image")) or ())

    def _load(self, record) -> Sample:
        if not isinstance(record, dict):
            raise BadRecordError("malformed", f"record must be a JSON object, got {type(record).__name__}")
        turns = parse_conversation(record.get("conversations"))
        images = _image_paths(record.get("image"))
        if images is None:
            raise BadRecordError("malformed", f"'image' must be a path or a list of paths: "
                                              f"{record.get('image')!r:.80}")
        n_placeholders = sum(human.count(IMAGE_PLACEHOLDER) for human, _ in turns)
        if n_placeholders != len(images):
            raise BadRecordError("malformed", f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders "
                                              f"for {len(images)} images")
        input_ids, labels = self._tokenize(turns)
        # Images are read last: an over-long or malformed record never costs a disk read.
        pixel_values = torch.stack([self._load_image(path) for path in images]) if images else \
            torch.zeros(0, 3, self.image_size, self.image_size)
        return Sample(torch.tensor(input_ids, dtype=torch.int64),
                      torch.tensor(labels, dtype=torch.int64), pixel_values)

    def _tokenize(self, turns):
        if self.template == "vicuna_v1":
            text, spans = render_vicuna_v1(turns, self.system_prompt, self.tokenizer.eos_token)
        else:
            text, spans = render_chat_template(turns, self.tokenizer, self.system_prompt)
        input_ids, labels = tokenize_rendered(
            text, spans, self.tokenizer, image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens, add_bos=self.template == "vicuna_v1")
        return truncate(input_ids, labels, self.max_length, self.image_token_id)

    def _load_image(self, relative_path: str) -> torch.Tensor:
        path = os.path.join(self.image_folder, relative_path)
        if not os.path.isfile(path):
            raise BadRecordError("missing_image", f"no file {path}")
        try:
            with Image.open(path) as image:
                image.load()
                return preprocess_image(image, self.image_size, self.image_mean, self.image_std)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise BadRecordError("corrupt_image", f"{path}: {error}") from None


def _load_records(data) -> tuple[list, str]:
    """(records, default image folder): a JSON file's directory, or the working directory."""
    if isinstance(data, (str, os.PathLike)):
        with open(data, encoding="utf-8") as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ValueError(f"data file {data} must hold a JSON list of records")
        return records, os.path.dirname(os.path.abspath(data))
    if isinstance(data, Sequence):
        return list(data), os.getcwd()
    raise TypeError(f"data must be a JSON path or a list of records, got {type(data).__name__}")


def _image_paths(image) -> list[str] | None:
    """The record's image paths ([] for text-only), or None when ``image`` is not path-like."""
    if image is None:
        return []
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        return None
    return paths
