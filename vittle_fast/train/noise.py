"""Noise-stream addressing for the bottleneck (docs/DESIGN.md §5).

The noise of every bottleneck call is a pure function of (run seed, step, micro-batch, rank,
call), so a resumed run redraws exactly the same noise without saving any RNG state.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
RANK_SHIFT = 44  # offset = rank << 44; the model adds call << 38, leaving 2**38 counters (2**40 normals) per call


def splitmix64(x: int) -> int:
    """One round of the splitmix64 finalizer on a 64-bit unsigned integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(run_seed: int, step: int, micro_batch: int) -> int:
    """64-bit Philox key in [0, 2**64) for (run seed, step, micro-batch)."""
    x = splitmix64(run_seed & _MASK64)
    x = splitmix64(x ^ (step & _MASK64))
    return splitmix64(x ^ (micro_batch & _MASK64))


def noise_offset(rank: int) -> int:
    """Philox counter base of a data-parallel rank: ranks never share noise."""
    if not 0 <= rank < 1 << (63 - RANK_SHIFT):
        raise ValueError(f"rank must be in [0, 2**{63 - RANK_SHIFT}), got {rank}")
    return rank << RANK_SHIFT


class DeviceScalars:
    """The model's per-micro-batch scalars -- alpha, noise seed, noise offset -- as 0-dim tensors on
    the training device, advanced in place (``fill_``) before every forward (``parallel.cuda_graphs``).

    A CUDA graph captured around the step (or ``torch.compile(mode="reduce-overhead")``) bakes Python
    scalars into its launches and would replay the same noise and alpha every step; kernels that read
    these tensors from memory see each step's values. ``fill_`` with a Python number needs no host
    sync. The seed tensor holds the key's 64 bits (seed 2**63 + 5 is -(2**63) + 5, ops/scalars.py).
    Results are bitwise those of Python scalars. The op saves the tensors for backward, so each
    micro-batch's backward must run before the next ``set`` (as ``train_step`` does)."""

    def __init__(self, device: torch.device, rank: int):
        self.alpha = torch.zeros((), dtype=torch.float32, device=device)
        self.seed = torch.zeros((), dtype=torch.int64, device=device)
        self.offset = torch.full((), noise_offset(rank), dtype=torch.int64, device=device)

    def set(self, alpha: float, seed: int) -> dict[str, torch.Tensor]:
        """Write this micro-batch's values; returns the model's keyword arguments."""
        self.alpha.fill_(alpha)
        self.seed.fill_(seed - (1 << 64) if seed >= 1 << 63 else seed)
        return {"vittle_alpha": self.alpha, "noise_seed": self.seed, "noise_offset": self.offset}
