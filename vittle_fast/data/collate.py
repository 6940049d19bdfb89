"""Collator: samples -> the batch dict of docs/interfaces.md B (right padding or packing)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .conversation import IGNORE_INDEX
from .dataset import LlavaDataset, Sample, Skipped
from .errors import SKIP_KINDS, check_int

PAD, TEXT, VISUAL = 0, 1, 2  # modality ids


class LlavaCollator:
    """Build ``input_ids, labels, attention_mask, position_ids, pixel_values, modality_ids``,
    ``n_skipped`` (int64 ``[len(SKIP_KINDS)]``, bad records per kind in ``SKIP_KINDS`` order; all
    kinds but ``truncated`` were dropped) and the attention layout ``cu_seqlens`` (int32) /
    ``max_seqlen`` (int) of :func:`varlen_metadata`, so the model's attention needs no host sync to
    find the sequence boundaries.

    ``pack=False``: one right-padded row per sample. ``pack=True``: all samples concatenated into
    one row whose ``position_ids`` restart at 0 at each sample (the model must keep attention
    within a sample). No target crosses a boundary: every sample starts with a prompt token, whose
    label is ignored. Padding positions continue the last sample's positions. When every record of
    the batch was skipped the batch has zero rows.
    """

    def __init__(self, *, pad_token_id: int, image_token_id: int, image_size: int,
                 pack: bool = False, pad_to_multiple_of: int = 1):
        check_int("pad_token_id", pad_token_id, minimum=0)
        check_int("image_token_id", image_token_id, minimum=0)
        check_int("image_size", image_size)
        check_int("pad_to_multiple_of", pad_to_multiple_of)
        if pad_token_id == image_token_id:
            raise ValueError("pad_token_id must differ from image_token_id")
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        self.image_size = image_size
        self.pack = pack
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_dataset(cls, dataset: LlavaDataset, *, pack: bool = False,
                     pad_to_multiple_of: int = 1) -> LlavaCollator:
        """Collator matching ``dataset``'s tokenizer padding, image token and image size."""
        pad_token_id = dataset.tokenizer.pad_token_id
        if pad_token_id is None:
            raise ValueError("the dataset's tokenizer has no pad token")
        return cls(pad_token_id=pad_token_id, image_token_id=dataset.image_token_id,
                   image_size=dataset.image_size, pack=pack, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, items: Sequence[Sample | Skipped]) -> dict[str, torch.Tensor]:
        n_skipped = torch.zeros(len(SKIP_KINDS), dtype=torch.int64)
        samples = []
        for item in items:
            if isinstance(item, Skipped):
                n_skipped[SKIP_KINDS.index(item.kind)] += 1
            elif isinstance(item, Sample):
                samples.append(item)
                n_skipped[SKIP_KINDS.index("truncated")] += item.truncated
            else:
                raise TypeError(f"items must be Sample or Skipped, got {type(item).__name__}")
        rows = [samples] if self.pack and samples else [[sample] for sample in samples]
        lengths = [sum(len(s.input_ids) for s in row) for row in rows]
        multiple = self.pad_to_multiple_of
        width = -(-max(lengths, default=0) // multiple) * multiple
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.int64)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        position_ids = torch.zeros((len(rows), width), dtype=torch.int64)
        for r, row in enumerate(rows):
            input_ids[r, :lengths[r]] = torch.cat([s.input_ids for s in row])
            labels[r, :lengths[r]] = torch.cat([s.labels for s in row])
            attention_mask[r, :lengths[r]] = True
            positions = [torch.arange(len(s.input_ids)) for s in row]
            last = positions[-1]
            positions.append(torch.arange(len(last), len(last) + width - lengths[r]))
            position_ids[r] = torch.cat(positions)
        cu_seqlens, max_seqlen = varlen_metadata([[len(s.input_ids) for s in row] for row in rows], width)
        modality_ids = torch.where(input_ids == self.image_token_id, VISUAL, TEXT)
        modality_ids = torch.where(attention_mask, modality_ids, PAD).to(torch.int8)
        pixel_values = torch.cat([s.pixel_values for s in samples]) if samples else \
            torch.zeros(0, 3, self.image_size, self.image_size)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "pixel_values": pixel_values,
            "modality_ids": modality_ids,
            "n_skipped": n_skipped,
            "cu_seqlens": cu_seqlens,
            "max_seqlen": max_seqlen,
        }


def varlen_metadata(row_lengths: list[list[int]], width: int) -> tuple[torch.Tensor, int]:
    """flash-attn varlen metadata (``vittle_fast.models.llama.Varlen``) of rows of ``width`` tokens
    holding sequences of ``row_lengths`` each, then padding: every sequence and every row's padding
    run is a segment of the flattened batch. Returns (``cu_seqlens`` int32 [segments + 1], the
    longest segment)."""
    segments = []
    for lengths in row_lengths:
        segments += lengths
        if width > sum(lengths):
            segments.append(width - sum(lengths))
    cu_seqlens = torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32)
    return cu_seqlens, max(segments, default=0)
