"""Length-grouped, modality-aware distributed sampler with an exact resume position."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import check_int


class LengthGroupedSampler(Sampler[int]):
    """Shard a dataset over data-parallel ranks in micro-batches of similar length and one modality.

    Per epoch (a pure function of ``seed`` and ``epoch``, identical on every rank): the image and
    the text-only samples are shuffled separately; each list is wrapped around (or cut, with
    ``drop_last``) to a multiple of the global batch ``batch_size * num_replicas``; cut into
    mega-batches of ``mega_batch_mult`` global batches, each sorted by length; then all global
    batches are shuffled together. Rank ``r`` takes slice ``r`` of every global batch, so all ranks
    get the same number of samples, each step's micro-batches hold one modality (as LLaVA's
    ``group_by_modality_length``), and padding stays small.

    Resume: the trainer calls ``advance()`` after each consumed micro-batch (the DataLoader
    prefetches, so the sampler cannot tell consumption itself) and saves ``state_dict()``; after
    ``load_state_dict()`` the iterator continues exactly where the saved run stopped. Call
    ``set_epoch`` at the start of every epoch (it keeps the position when the epoch is unchanged).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        is_multimodal: Sequence[bool],
        *,
        batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        mega_batch_mult: int = 8,
        drop_last: bool = False,
    ):
        if len(lengths) != len(is_multimodal):
            raise ValueError(f"lengths ({len(lengths)}) and is_multimodal ({len(is_multimodal)}) "
                             "must have the same length")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        check_int("batch_size", batch_size)
        check_int("num_replicas", num_replicas)
        check_int("mega_batch_mult", mega_batch_mult)
        check_int("seed", seed, minimum=0)
        check_int("rank", rank, minimum=0)
        if rank >= num_replicas:
            raise ValueError(f"rank must be < num_replicas={num_replicas}, got {rank}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.is_multimodal = np.asarray(is_multimodal, dtype=bool)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.drop_last = drop_last
        self.global_batch = batch_size * num_replicas
        n_image = int(self.is_multimodal.sum())
        self.num_samples = (self._fitted_size(n_image) + self._fitted_size(len(lengths) - n_image)) \
            // num_replicas
        self.epoch = 0
        self.position = 0

    def _fitted_size(self, n: int) -> int:
        full, rest = divmod(n, self.global_batch)
        return (full + (rest > 0 and not self.drop_last)) * self.global_batch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's whole index sequence for ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        global_batches = []
        for modality in (self.is_multimodal, ~self.is_multimodal):
            indices = rng.permutation(np.flatnonzero(modality))
            indices = np.resize(indices, self._fitted_size(len(indices)))  # wrap around or cut
            mega = self.global_batch * self.mega_batch_mult
            for start in range(0, len(indices), mega):
                chunk = indices[start:start + mega]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                global_batches += list(chunk.reshape(-1, self.global_batch))
        if not global_batches:
            return np.zeros(0, dtype=np.int64)
        ordered = np.stack(global_batches)[rng.permutation(len(global_batches))]
        return ordered[:, self.rank * self.batch_size:(self.rank + 1) * self.batch_size].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.position:].tolist())

    def __len__(self) -> int:
        """Samples the next iteration yields (the rest of the epoch after a resume)."""
        return self.num_samples - self.position

    def set_epoch(self, epoch: int) -> None:
        check_int("epoch", epoch, minimum=0)
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self, num_batches: int = 1) -> None:
        """Record that the trainer consumed ``num_batches`` more micro-batches of this epoch."""
        check_int("num_batches", num_batches, minimum=0)
        position = self.position + num_batches * self.batch_size
        if position > self.num_samples:
            raise ValueError(f"num_batches={num_batches} would move past the epoch's "
                             f"{self.num_samples} samples (at {self.position})")
        self.position = position

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore epoch and position; the seed and shard size must match the saved run's."""
        if state["seed"] != self.seed or state["num_samples"] != self.num_samples:
            raise ValueError(
                f"sampler state (seed={state['seed']}, num_samples={state['num_samples']}) does not "
                f"match this sampler (seed={self.seed}, num_samples={self.num_samples}): "
                "different data, batch size or world size")
        if not 0 <= state["position"] <= self.num_samples:
            raise ValueError(f"state position {state['position']} outside [0, {self.num_samples}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
