"""The per-call scalars of the noise-drawing ops: ``alpha``, ``seed``, ``offset`` (docs/DESIGN.md §2b).

Convention, the same for every op of ``vittle_fast.ops`` that draws the contract's noise:

=========  ===========================================  ==============================================
argument   Python scalar                                0-dim tensor on the op's device
=========  ===========================================  ==============================================
alpha      float in [0, 1]                              float32
seed       int in [0, 2**64) (the Philox key)           int64 holding the key's 64 bits (two's
                                                        complement: seed 2**63 + 5 is -(2**63) + 5)
offset     int in [0, 2**63) (the Philox counter base)  int64
=========  ===========================================  ==============================================

Each may independently be either. A Python scalar travels as a plain argument of the custom op and
the kernel launch (no host-to-device copy); a tensor is read by the kernels from memory, so a
captured CUDA graph or a compiled step takes new values without recompiling or re-capturing
(advance them in place: ``seed_t.fill_(s)``, ``offset_t.add_(n)``). Both give bitwise the same
results: kernels compute in float32, and a Python alpha is rounded to float32 as a float32 tensor
would be.

The custom ops take each scalar as a pair ``(value, tensor or None)`` (:class:`ScalarArgs`): a
schema has one type per argument. Under ``torch.compile`` a Python ``alpha`` is turned into a
tensor (``ones * alpha`` in the graph), because a ``float`` argument of a custom op makes Dynamo
specialise the graph on its value (one recompile per alpha); Python ints become dynamic ``SymInt``s
and need nothing (but a seed >= 2**63 is outside int64 and stays a constant: pass a tensor).

Tensor values are not range-checked: that would need a host synchronisation (and break CUDA-graph
capture). Keeping ``alpha_t`` in [0, 1] and ``offset_t`` >= 0 is the caller's job. The tensors are
saved for backward (which regenerates the noise from them): advancing one in place between a
forward and its backward makes autograd raise; advance them after the backward, as a step does.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

UINT64_RANGE = 2**64
INT64_RANGE = 2**63


class ScalarArgs(NamedTuple):
    """What a custom op takes: the Python values (placeholders 0 when a tensor is given) and the
    tensors (None when a Python value is given)."""

    alpha: float
    seed: int
    offset: int
    alpha_t: torch.Tensor | None
    seed_t: torch.Tensor | None
    offset_t: torch.Tensor | None


def _check_tensor_scalar(name: str, value: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if value.dtype != dtype:
        raise TypeError(f"{name} as a tensor must be {dtype}, got {value.dtype}")
    if value.dim() != 0:
        raise ValueError(f"{name} as a tensor must be 0-dim, got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} as a tensor must be on the op's device {device}, got {value.device}")


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int or a 0-dim int64 tensor, got {type(value).__name__}")
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")


def scalar_args(alpha, seed, offset, device: torch.device) -> ScalarArgs:
    """Validate ``alpha``, ``seed``, ``offset`` (module docstring) and return the custom-op arguments.

    A Python seed is passed on as its int64 view (same 64 bits). Raises TypeError / ValueError
    naming the argument.
    """
    if isinstance(alpha, torch.Tensor):
        _check_tensor_scalar("alpha", alpha, torch.float32, device)
        alpha_value, alpha_t = 0.0, alpha
    else:
        if isinstance(alpha, bool) or not isinstance(alpha, (float, int)):
            raise TypeError(f"alpha must be a Python float or a 0-dim float32 tensor, got {type(alpha).__name__}")
        if not 0.0 <= alpha <= 1.0:  # also rejects NaN; no math.isfinite: Dynamo can't trace it
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if torch.compiler.is_compiling():  # a float op argument would specialise the graph on alpha
            # ones * alpha, not torch.full: Dynamo turns a multiplication by a symbolic float into
            # tensor arithmetic (float32(alpha), as a launch rounds it) but specialises a fill value.
            alpha_value, alpha_t = 0.0, torch.ones((), dtype=torch.float32, device=device) * alpha
        else:
            alpha_value, alpha_t = float(alpha), None

    if isinstance(seed, torch.Tensor):
        _check_tensor_scalar("seed", seed, torch.int64, device)
        seed_value, seed_t = 0, seed
    else:
        _check_int("seed", seed, 0, UINT64_RANGE)
        seed_value, seed_t = (seed - UINT64_RANGE if seed >= INT64_RANGE else seed), None

    if isinstance(offset, torch.Tensor):
        _check_tensor_scalar("offset", offset, torch.int64, device)
        offset_value, offset_t = 0, offset
    else:
        _check_int("offset", offset, 0, INT64_RANGE)
        offset_value, offset_t = offset, None
    return ScalarArgs(alpha_value, seed_value, offset_value, alpha_t, seed_t, offset_t)


def value_or_tensor(value, tensor: torch.Tensor | None):
    """One scalar of a :class:`ScalarArgs` pair as the launchers take it: the tensor if given, else the value."""
    return value if tensor is None else tensor


def split_scalar(scalar) -> tuple[int | float, torch.Tensor | None]:
    """The inverse of :func:`value_or_tensor`: ``(value, None)`` or ``(0, tensor)`` for a kernel launch."""
    return (0, scalar) if isinstance(scalar, torch.Tensor) else (scalar, None)
