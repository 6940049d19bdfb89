"""LLaVA instruction-tuning records -> samples (token ids, labels, pixel values) or skip markers."""

from __future__ import annotations

import json
import logging
import os
import warnings
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
from .errors import BadRecordError, SkipWarnings, check_int
from .image import CLIP_MEAN, CLIP_STD, preprocess_image

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """One tokenized conversation; ``pixel_values`` is ``[n_images, 3, S, S]`` (n may be 0)."""

    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, -100 where ignored
    pixel_values: torch.Tensor  # [n_images, 3, S, S] float32
    truncated: bool = False  # cut to max_length (truncation="truncate"); counted as kind "truncated"


@dataclass(frozen=True)
class Skipped:
    """Marker returned instead of a Sample for a bad record; the collator counts it by kind."""

    index: int
    kind: str
    reason: str


# Pillow's own decompression-bomb warning threshold (about 9459 x 9459 pixels).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
TRUNCATION = ("skip", "truncate")


class LlavaDataset(Dataset):
    """LLaVA instruction data (``id``, optional ``image``, ``conversations``) as a map-style dataset,
    from a JSON list, a JSONL file (one record per line) or a list of dicts.

    ``__getitem__`` returns a ``Sample``, or for a bad record a ``Skipped`` marker (or raises
    ``BadRecordError`` naming the record when ``strict``). Any exception while turning one record
    into a sample (structure, template, tokenizer, image) is a bad record, so no single record can
    stop a run. Markers travel through DataLoader workers to the collator, which turns them into
    per-kind counts, so the counts are right whatever the number of workers. Over-long records are
    skipped (``truncation="skip"``) or cut and counted (``"truncate"``); images with more than
    ``max_image_pixels`` pixels are refused from their header (decompression bombs).
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
        truncation: str = "skip",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.records, self.lines, default_folder = _load_records(data)
        self.source = os.fspath(data) if isinstance(data, (str, os.PathLike)) else None
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("tokenizer must be a fast (tokenizers-backed) tokenizer: offsets are needed")
        if template == "chat_template":
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("template='chat_template' needs a tokenizer with a chat_template")
            # A template that does not render incrementally fails on every record: a config error.
            render_chat_template([("a", "b"), ("c", "d")], tokenizer, system_prompt)
        if template == "vicuna_v1" and (tokenizer.eos_token is None or tokenizer.bos_token_id is None):
            raise ValueError("template='vicuna_v1' needs a tokenizer with bos and eos tokens")
        check_int("image_size", image_size)
        check_int("patch_size", patch_size)
        check_int("max_length", max_length)
        check_int("max_image_pixels", max_image_pixels)
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
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
        self.truncation = truncation
        self.max_image_pixels = max_image_pixels
        self.is_multimodal = [isinstance(r, dict) and r.get("image") is not None for r in self.records]
        self.lengths = [self._estimate_length(r) for r in self.records]
        self._warnings = SkipWarnings(logger)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | Skipped:
        try:
            sample = self._load(self.records[index])
        except Exception as error:  # noqa: BLE001 -- any failure of one record skips that record
            if not isinstance(error, BadRecordError):
                error = BadRecordError("malformed", f"{type(error).__name__}: {error}")
            if self.strict:
                raise BadRecordError(error.kind, f"{self.where(index)}: {error.message}") from None
            self._warnings.warn(self.where(index), error)
            return Skipped(index=index, kind=error.kind, reason=error.message)
        if sample.truncated:
            self._warnings.warn(self.where(index), BadRecordError(
                "truncated", f"cut to max_length={self.max_length} tokens"), action="truncating")
        return sample

    def where(self, index: int) -> str:
        """``record 12 (id '000123') of data.jsonl:13``: what a warning or error names."""
        record = self.records[index]
        text = f"record {index}"
        if isinstance(record, dict) and "id" in record:
            text += f" (id {record['id']!r:.60})"
        if self.source is not None:
            text += f" of {self.source}" + (f":{self.lines[index]}" if self.lines else "")
        return text

    def _estimate_length(self, record) -> int:
        """Cheap token-count estimate for length grouping (words + image tokens), as LLaVA does."""
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            return 0
        words = sum(len(str(m.get("value", "")).split())
                    for m in record["conversations"] if isinstance(m, dict))
        return words + self.num_image_tokens * len(_image_paths(record.get("image")) or ())

    def _load(self, record) -> Sample:
        if isinstance(record, _InvalidLine):
            raise BadRecordError("malformed", f"invalid JSON: {record.message}")
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
        try:
            input_ids, labels = self._tokenize(turns)
        except BadRecordError:
            raise
        except Exception as error:  # noqa: BLE001 -- e.g. a lone surrogate the tokenizer rejects
            raise BadRecordError("bad_text", f"{type(error).__name__}: {error}") from None
        truncated = len(input_ids) > self.max_length
        if truncated:
            if self.truncation == "skip":
                raise BadRecordError("too_long", f"{len(input_ids)} tokens > max_length={self.max_length}")
            input_ids, labels = truncate(input_ids, labels, self.max_length, self.image_token_id)
        # Images are read last: an over-long or malformed record never costs a disk read.
        pixel_values = torch.stack([self._load_image(path) for path in images]) if images else \
            torch.zeros(0, 3, self.image_size, self.image_size)
        return Sample(torch.tensor(input_ids, dtype=torch.int64),
                      torch.tensor(labels, dtype=torch.int64), pixel_values, truncated)

    def _tokenize(self, turns):
        if self.template == "vicuna_v1":
            text, spans = render_vicuna_v1(turns, self.system_prompt, self.tokenizer.eos_token)
        else:
            text, spans = render_chat_template(turns, self.tokenizer, self.system_prompt)
        return tokenize_rendered(
            text, spans, self.tokenizer, image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens, add_bos=self.template == "vicuna_v1")

    def _load_image(self, relative_path: str) -> torch.Tensor:
        path = os.path.join(self.image_folder, relative_path)
        if not os.path.isfile(path):
            raise BadRecordError("missing_image", f"no file {path}")
        try:
            with warnings.catch_warnings():  # the pixel limit below decides, not Pillow's warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(path)
            with image:
                width, height = image.size  # from the header: nothing is decoded yet
                if width * height > self.max_image_pixels:
                    raise BadRecordError("image_too_large", f"{path}: {width}x{height} pixels > "
                                                            f"max_image_pixels={self.max_image_pixels}")
                image.load()
                return preprocess_image(image, self.image_size, self.image_mean, self.image_std)
        except BadRecordError:
            raise
        except Image.DecompressionBombError as error:
            raise BadRecordError("image_too_large", f"{path}: {error}") from None
        except Exception as error:  # noqa: BLE001 -- whatever Pillow raises on a bad file
            raise BadRecordError("corrupt_image", f"{path}: {type(error).__name__}: {error}") from None


@dataclass(frozen=True)
class _InvalidLine:
    """A JSONL line that does not parse: a bad record (counted as malformed), not a bad file."""

    message: str


def _load_records(data) -> tuple[list, list[int] | None, str]:
    """(records, JSONL line numbers or None, default image folder: the file's directory or the
    working directory). A JSON file that does not parse raises naming the file, line and column."""
    if isinstance(data, (str, os.PathLike)):
        folder = os.path.dirname(os.path.abspath(data))
        try:
            with open(data, encoding="utf-8") as f:
                if os.fspath(data).endswith(".jsonl"):
                    return *_parse_jsonl(f), folder
                records = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{os.fspath(data)}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"{os.fspath(data)}: not UTF-8 text (byte {error.start}): {error.reason}") from None
        if not isinstance(records, list):
            raise ValueError(f"data file {os.fspath(data)} must hold a JSON list of records "
                             f"(or be a .jsonl file with one record per line)")
        return records, None, folder
    if isinstance(data, Sequence):
        return list(data), None, os.getcwd()
    raise TypeError(f"data must be a JSON/JSONL path or a list of records, got {type(data).__name__}")


def _parse_jsonl(lines) -> tuple[list, list[int]]:
    records, numbers = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            records.append(_InvalidLine(f"column {error.colno}: {error.msg}"))
        numbers.append(number)
    return records, numbers


def _image_paths(image) -> list[str] | None:
    """The record's image paths ([] for text-only), or None when ``image`` is not path-like."""
    if image is None:
        return []
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        return None
    return paths
