"""The trainer's periodic validation (``eval.every``): loss and accuracy on a LLaVA JSON file.

One teacher-forced forward per micro-batch, no generation, so every rank runs the same number of
FSDP forwards (each rank's shard is padded to the same length with zero-weight repeats). Reported:
``val_loss``, the mean NLL per reference token (the training CE restricted to the validation
replies), and ``val_accuracy``, the fraction of records whose every reply token is the argmax --
exactly the records greedy decoding answers word for word (up to ties).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from vittle_fast.data import LlavaCollator, LlavaDataset
from vittle_fast.models.llava import causal_lm_targets

from .metrics import reference_scores


class Validator:
    def __init__(self, data_path: str, tokenizer, *, image_folder: str | None, template: str, image_size: int,
                 patch_size: int, max_length: int, max_samples: int, batch_size: int, rank: int, world_size: int):
        self.dataset = LlavaDataset(data_path, tokenizer, image_folder=image_folder, template=template,
                                    image_size=image_size, patch_size=patch_size, max_length=max_length)
        n = min(max_samples, len(self.dataset)) if max_samples > 0 else len(self.dataset)
        if n == 0:
            raise ValueError(f"eval.data_path {data_path!r} holds no records")
        per_rank = -(-n // world_size)
        indices = list(range(rank, n, world_size))
        self.shard = [(i, 1.0) for i in indices] + [(indices[0] if indices else 0, 0.0)] * (per_rank - len(indices))
        self.collate = LlavaCollator.from_dataset(self.dataset)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, model, alpha: float, device: torch.device) -> dict[str, float]:
        """Collective: every rank calls it at the same step. Posterior mean (eval mode) at ``alpha``."""
        was_training = model.training
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # nll, tokens, correct, records
        try:
            for start in range(0, len(self.shard), self.batch_size):
                chunk = self.shard[start:start + self.batch_size]
                samples = [self.dataset[i] for i, _ in chunk]
                weights = torch.tensor([w for (_, w), s in zip(chunk, samples) if not hasattr(s, "kind")],
                                       dtype=torch.float64, device=device)
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.collate(samples).items()}
                out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
                            vittle_alpha=alpha)
                targets = causal_lm_targets(batch["labels"], batch["position_ids"])
                nll, count, correct = reference_scores(out.logits[:, :-1], targets)
                totals += torch.stack([(nll.double() * weights).sum(), (count.double() * weights).sum(),
                                       (correct.double() * weights).sum(), weights.sum()])
        finally:
            model.train(was_training)
        if dist.is_initialized():
            dist.all_reduce(totals)
        nll, tokens, correct, records = totals.tolist()
        return {"val_loss": nll / max(tokens, 1.0), "val_accuracy": correct / max(records, 1.0)}
