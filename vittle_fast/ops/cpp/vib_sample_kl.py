"""C++ / CUDA launchers of ``vib_sample_kl`` (csrc/vib_sample_kl_*; interface: docs/interfaces.md §A)."""
from __future__ import annotations

import torch

from . import schema_scalars


def forward(h, stats, alpha, seed, offset, prior_mu, prior_logvar, clamp_lo, clamp_hi, kl_logvar_coef, sample):
    """``(z_hat [N, D] h.dtype, kl [N] float32)``; arguments as in docs/interfaces.md §A."""
    return torch.ops.vittle_fast.fused_sample_kl_fwd(
        h, stats, *schema_scalars(alpha, seed, offset), prior_mu, prior_logvar, clamp_lo, clamp_hi,
        kl_logvar_coef, sample,
    )


def backward(grad_z_hat, grad_kl, stats, alpha, seed, offset, prior_mu, prior_logvar, clamp_lo, clamp_hi,
             kl_logvar_coef, sample):
    """``(grad_h, grad_stats, grad_prior_mu, grad_prior_logvar)``; empty prior gradients for the fixed prior."""
    return torch.ops.vittle_fast.fused_sample_kl_bwd(
        grad_z_hat, grad_kl, stats, *schema_scalars(alpha, seed, offset), prior_mu, prior_logvar,
        clamp_lo, clamp_hi, kl_logvar_coef, sample,
    )


