"""Philox4x32-10 noise of the op contract, in plain PyTorch.

This is the noise oracle every backend is checked against (docs/DESIGN.md §2). It reproduces Triton's
``tl.randint4x`` / ``tl.randn4x`` exactly: counter ``(c & 0xffffffff, c >> 32, 0, 0)``, key
``(seed & 0xffffffff, seed >> 32)``, ten rounds, Triton's uint -> uniform mapping and its Box-Muller.

32-bit unsigned arithmetic is emulated in int64 tensors (values kept in [0, 2**32)); the 32x32-bit
products are split into 16-bit halves so nothing overflows int64.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53  # Philox multipliers (Salmon et al. 2011), as in Triton's random.py
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9  # Weyl key increments
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float: 1 / 2**31, rounded as Triton has it


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of constant ``a`` and uint32 tensor ``b``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t = a_hi * b  # < 2**48
    u = a_lo * b  # < 2**48
    hi = (t + (u >> 16)) >> 16
    lo = ((t & 0xFFFF) << 16) + u
    return hi & _MASK32, lo & _MASK32


def philox_uint32(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The four uint32 Philox4x32-10 outputs for each 64-bit counter, as int64 ``[len, 4]``.

    ``seed`` is the 64-bit key, a Python int or a 0-dim int64 tensor (negative values are read as
    their two's complement); ``counters`` is an int64 tensor of counter values ``c`` (wrapping
    mod 2**64 like Triton's uint64 math).
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mulhilo32(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float``: bitcast to int32, fold negatives with ``~x``, scale."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def uniform_to_normal(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's ``pair_uniform_to_normal`` (Box-Muller) in float32."""
    u1 = torch.clamp(u1, min=1.0e-7)
    theta = 6.283185307179586 * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(theta), r * torch.sin(theta)


def normal_noise(seed: int | torch.Tensor, offset: int | torch.Tensor, n: int, d: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The contract's noise for an ``[n, d]`` call: element ``k = i*d + j`` takes lane ``k % 4`` of
    counter ``offset + k // 4`` (``seed``, ``offset``: Python ints or 0-dim int64 tensors on
    ``device``). Returns float32 ``[n, d]``."""
    numel = n * d
    n_counters = -(-numel // 4)
    counters = offset + torch.arange(n_counters, dtype=torch.int64, device=device)
    u = uint32_to_uniform(philox_uint32(seed, counters))
    n1, n2 = uniform_to_normal(u[:, 0], u[:, 1])
    n3, n4 = uniform_to_normal(u[:, 2], u[:, 3])
    lanes = torch.stack([n1, n2, n3, n4], dim=-1).reshape(-1)
    return lanes[:numel].reshape(n, d)
