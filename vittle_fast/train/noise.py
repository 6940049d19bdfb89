"""Noise-stream addressing for the bottleneck (docs/DESIGN.md §5).

The noise of every bottleneck call is a pure function of (run seed, step, micro-batch, rank,
call), so a resumed run redraws exactly the same noise without saving any RNG state.
"""

from __future__ import annotations

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
