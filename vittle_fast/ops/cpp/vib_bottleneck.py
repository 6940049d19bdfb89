"""C++ launchers of ``vib_bottleneck`` (csrc/vib_bottleneck_*; interface: docs/ops.md)."""
from __future__ import annotations

import torch

from . import schema_scalars


def _schema_scalars(alpha, seed, offsets) -> tuple:
    """The C++ schema's ``alpha, seed, offsets, alpha_t, seed_t, offsets_t`` (ops/scalars.py); offsets
    is a list of ints or an int64 [groups] tensor."""
    alpha, seed, _, alpha_t, seed_t, _ = schema_scalars(alpha, seed, 0)
    if isinstance(offsets, torch.Tensor):
        return alpha, seed, [0] * offsets.numel(), alpha_t, seed_t, offsets
    return alpha, seed, offsets, alpha_t, seed_t, None


def forward(h, order, group_sizes, w1s, b1s, w2s, b2s, alpha, seed, offsets, prior_mus, prior_logvars,
            clamp_lo, clamp_hi, kl_logvar_coef, sample, recompute):
    """``(out, kl, preact, stats)`` of the fused bottleneck (csrc/vib_bottleneck_blocks.cpp)."""
    return torch.ops.vittle_fast.vib_bottleneck_fwd(
        h, order, group_sizes, w1s, b1s, w2s, b2s, *_schema_scalars(alpha, seed, offsets), prior_mus,
        prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef, sample, recompute,
    )


def backward(grad_out, grad_kl, h, order, group_sizes, w1s, b1s, w2s, b2s, alpha, seed, offsets, prior_mus,
             prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef, sample, recompute, preact, stats):
    """``(grad_h, grad_w1s, grad_b1s, grad_w2s, grad_b2s, grad_prior_mus, grad_prior_logvars)``."""
    return torch.ops.vittle_fast.vib_bottleneck_bwd(
        grad_out, grad_kl, h, order, group_sizes, w1s, b1s, w2s, b2s, *_schema_scalars(alpha, seed, offsets),
        prior_mus, prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef, sample, recompute, preact, stats,
    )
