"""Launcher of the compiled C++ (CPU) / CUDA backend of ``vib_sample_kl`` (docs/interfaces.md §A).

The kernels live in the extension ``vittle_fast._C`` (built by ``setup.py`` from ``csrc/``), which
registers ``torch.ops.vittle_fast.fused_sample_kl_fwd`` / ``fused_sample_kl_bwd``. Importing this
module never fails: when the extension is missing, ``is_available()`` is False and
``load_error()`` says why and how to build it. ``VITTLE_FAST_OPS_LIBRARY=/path/to/lib.so`` loads a
library built by CMake instead.
"""
from __future__ import annotations

import importlib
import os

import torch

from .scalars import split_scalar

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) "
    "from the repository root; a C++17 compiler is needed, plus nvcc for the CUDA kernel"
)
_FWD_OP = "vittle_fast::fused_sample_kl_fwd"
_OPS = ("fused_sample_kl_fwd", "fused_sample_kl_bwd", "vib_bottleneck_fwd", "vib_bottleneck_bwd")


def _load() -> str:
    """Load the extension once; return '' on success or the reason it cannot be used."""
    library = os.environ.get("VITTLE_FAST_OPS_LIBRARY")
    try:
        if library:
            torch.ops.load_library(library)
        else:
            importlib.import_module("vittle_fast._C")
    except (ImportError, OSError) as exc:
        source = library or "vittle_fast._C"
        return f"the C++ extension ({source}) could not be loaded: {exc}; {_BUILD_HINT}"
    missing = [op for op in _OPS if not hasattr(torch.ops.vittle_fast, op)]
    if missing:  # e.g. a build older than the sources
        return f"the C++ extension loaded but did not register {missing}; rebuild it: {_BUILD_HINT}"
    return ""


_LOAD_ERROR = _load()


def is_available() -> bool:
    """True when the compiled ops are registered (at least the CPU kernel)."""
    return not _LOAD_ERROR


def load_error() -> str:
    """Why the extension is unavailable ('' when it is available)."""
    return _LOAD_ERROR


def has_cuda() -> bool:
    """True when the extension was built with its CUDA kernel."""
    return is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(_FWD_OP, "CUDA")


def _schema_scalars(alpha, seed, offset) -> tuple:
    """The C++ schema's ``alpha, seed, offset, alpha_t, seed_t, offset_t`` (ops/scalars.py)."""
    (alpha, alpha_t), (seed, seed_t), (offset, offset_t) = map(split_scalar, (alpha, seed, offset))
    return float(alpha), seed, offset, alpha_t, seed_t, offset_t


def forward(h, stats, alpha, seed, offset, prior_mu, prior_logvar, clamp_lo, clamp_hi, kl_logvar_coef, sample):
    """``(z_hat [N, D] h.dtype, kl [N] float32)``; arguments as in docs/interfaces.md §A."""
    return torch.ops.vittle_fast.fused_sample_kl_fwd(
        h, stats, *_schema_scalars(alpha, seed, offset), prior_mu, prior_logvar, clamp_lo, clamp_hi,
        kl_logvar_coef, sample,
    )


def backward(grad_z_hat, grad_kl, stats, alpha, seed, offset, prior_mu, prior_logvar, clamp_lo, clamp_hi,
             kl_logvar_coef, sample):
    """``(grad_h, grad_stats, grad_prior_mu, grad_prior_logvar)``; prior gradients are None for the fixed prior."""
    grad_h, grad_stats, grad_prior_mu, grad_prior_logvar = torch.ops.vittle_fast.fused_sample_kl_bwd(
        grad_z_hat, grad_kl, stats, *_schema_scalars(alpha, seed, offset), prior_mu, prior_logvar,
        clamp_lo, clamp_hi, kl_logvar_coef, sample,
    )
    if prior_mu is None:
        return grad_h, grad_stats, None, None
    return grad_h, grad_stats, grad_prior_mu, grad_prior_logvar


def _bottleneck_scalars(alpha, seed, offsets) -> tuple:
    """The C++ schema's ``alpha, seed, offsets, alpha_t, seed_t, offsets_t`` (ops/scalars.py); offsets
    is a list of ints or an int64 [groups] tensor."""
    alpha, seed, _, alpha_t, seed_t, _ = _schema_scalars(alpha, seed, 0)
    if isinstance(offsets, torch.Tensor):
        return alpha, seed, [0] * offsets.numel(), alpha_t, seed_t, offsets
    return alpha, seed, offsets, alpha_t, seed_t, None


def vib_bottleneck_forward(h, order, group_sizes, w1s, b1s, w2s, b2s, alpha, seed, offsets, prior_mus,
                           prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef, sample, recompute):
    """``(out, kl, preact, stats)`` of the fused bottleneck (csrc/vib_bottleneck_cpu.cpp)."""
    return torch.ops.vittle_fast.vib_bottleneck_fwd(
        h, order, group_sizes, w1s, b1s, w2s, b2s, *_bottleneck_scalars(alpha, seed, offsets), prior_mus,
        prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef, sample, recompute,
    )


def vib_bottleneck_backward(grad_out, grad_kl, h, order, group_sizes, w1s, b1s, w2s, b2s, alpha, seed, offsets,
                            prior_mus, prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef, sample, recompute,
                            preact, stats):
    """``(grad_h, grad_w1s, grad_b1s, grad_w2s, grad_b2s, grad_prior_mus, grad_prior_logvars)``."""
    return torch.ops.vittle_fast.vib_bottleneck_bwd(
        grad_out, grad_kl, h, order, group_sizes, w1s, b1s, w2s, b2s, *_bottleneck_scalars(alpha, seed, offsets),
        prior_mus, prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef, sample, recompute, preact, stats,
    )
