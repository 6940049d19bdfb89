"""Public fused op: Vittle's reparameterised sampling + interpolation + per-token KL.

Layers, Liger-Kernel style: backend launchers (``triton/vib_sample_kl.py``, ``cpp/vib_sample_kl.py``,
chosen through ``backends.py``) -> two
``torch.library.custom_op``s (forward, backward) wired with ``register_autograd`` -> the functional
API ``vib_sample_kl`` that validates arguments and picks a backend. The contract is docs/DESIGN.md §2.
Plain eager calls skip the custom-op layer: the same launchers and autograd functions run through
``ops/eager.py`` (bitwise the same results, less Python per call).

Only ``stats``, the priors and the scalars (ops/scalars.py) are saved for backward: the noise is
regenerated from ``(seed, offset)`` and ``h`` is not needed because ``dL/dh = (1 - alpha) * dL/dz_hat``.
"""
from __future__ import annotations

import math

import torch

from . import backends
from .backends import resolve_backend
from .eager import OpRoute, run_eager, use_custom_op
from .philox import normal_noise
from .reference import KL_LOGVAR_COEF, vib_sample_kl_reference
from .scalars import scalar_args, value_or_tensor

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# Custom ops (what torch.compile and autograd see), each wrapping its launcher function itself;
# the eager route (ops/eager.py) calls the same function directly.
# --------------------------------------------------------------------------------------------
def _launch_forward(
    h: torch.Tensor,
    stats: torch.Tensor,
    alpha: float,
    seed: int,
    offset: int,
    alpha_t: torch.Tensor | None,
    seed_t: torch.Tensor | None,
    offset_t: torch.Tensor | None,
    prior_mu: torch.Tensor,
    prior_logvar: torch.Tensor,
    clamp_lo: float,
    clamp_hi: float,
    kl_logvar_coef: float,
    sample: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalars as ``(value, tensor or None)`` pairs (ops/scalars.py); the launchers take either."""
    return backends.module(backend).vib_sample_kl.forward(
        h, stats, value_or_tensor(alpha, alpha_t), value_or_tensor(seed, seed_t), value_or_tensor(offset, offset_t),
        prior_mu, prior_logvar, clamp_lo, clamp_hi, kl_logvar_coef, sample,
    )


_fused_forward = torch.library.custom_op("vittle_fast::vib_sample_kl", mutates_args=())(_launch_forward)


@_fused_forward.register_fake
def _fused_forward_fake(h, stats, *args):
    return torch.empty_like(h), h.new_empty(h.shape[:-1], dtype=torch.float32)


def _launch_backward(
    grad_z_hat: torch.Tensor,
    grad_kl: torch.Tensor,
    stats: torch.Tensor,
    alpha: float,
    seed: int,
    offset: int,
    alpha_t: torch.Tensor | None,
    seed_t: torch.Tensor | None,
    offset_t: torch.Tensor | None,
    prior_mu: torch.Tensor,
    prior_logvar: torch.Tensor,
    clamp_lo: float,
    clamp_hi: float,
    kl_logvar_coef: float,
    sample: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_h, grad_stats, grad_prior_mu, grad_prior_logvar); the prior gradients are
    empty ``[0]`` tensors for the fixed prior (whose priors are empty tensors too)."""
    return backends.module(backend).vib_sample_kl.backward(
        grad_z_hat, grad_kl, stats,
        value_or_tensor(alpha, alpha_t), value_or_tensor(seed, seed_t), value_or_tensor(offset, offset_t),
        prior_mu, prior_logvar, clamp_lo, clamp_hi, kl_logvar_coef, sample,
    )


_fused_backward = torch.library.custom_op("vittle_fast::vib_sample_kl_backward", mutates_args=())(_launch_backward)


@_fused_backward.register_fake
def _fused_backward_fake(grad_z_hat, grad_kl, stats, alpha, seed, offset, alpha_t, seed_t, offset_t, prior_mu,
                         *args):
    prior_shape = prior_mu.shape
    return (
        torch.empty_like(grad_z_hat),
        torch.empty_like(stats),
        stats.new_empty(prior_shape, dtype=torch.float32),
        stats.new_empty(prior_shape, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    h, stats, alpha, seed, offset, alpha_t, seed_t, offset_t, prior_mu, prior_logvar, *options = inputs
    ctx.save_for_backward(stats, alpha_t, seed_t, offset_t, prior_mu, prior_logvar)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None (zeros made below only then)
    ctx.scalars = (alpha, seed, offset)
    ctx.options = options
    ctx.h_dtype = h.dtype


def _backward(ctx, grad_z_hat, grad_kl):
    return _gradients(ctx, (grad_z_hat, grad_kl), _fused_backward)


def _gradients(ctx, grads, launch_backward):
    """One gradient per forward input, computed by ``launch_backward`` (the backward custom op, or
    its launcher on the eager route: ops/eager.py)."""
    grad_z_hat, grad_kl = grads
    stats, *scalar_tensors, prior_mu, prior_logvar = ctx.saved_tensors
    n_tokens, d = stats.shape[0], stats.shape[1] // 2
    if grad_z_hat is None:
        grad_z_hat = stats.new_zeros((n_tokens, d), dtype=ctx.h_dtype)
    if grad_kl is None:
        grad_kl = stats.new_zeros((n_tokens,), dtype=torch.float32)
    grad_h, grad_stats, grad_mu_p, grad_lv_p = launch_backward(
        grad_z_hat.contiguous(), grad_kl.float().contiguous(), stats, *ctx.scalars, *scalar_tensors,
        prior_mu, prior_logvar, *ctx.options,
    )
    if not prior_mu.numel():
        grad_mu_p = grad_lv_p = None
    return (grad_h, grad_stats) + (None,) * 6 + (grad_mu_p, grad_lv_p) + (None,) * len(ctx.options)


_fused_forward.register_autograd(_backward, setup_context=_setup_context)
_EAGER_ROUTE = OpRoute(_launch_forward, _setup_context, _gradients, _launch_backward)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
def _check_tensor(name: str, value, *, float_only: bool = True) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if float_only and value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {value.dtype}")


def _validate(h, stats, prior_mu, prior_logvar, logvar_clamp, kl_form, sample) -> None:
    """Tensor and option arguments (the scalars: ``scalar_args``)."""
    _check_tensor("h", h)
    _check_tensor("stats", stats)
    if h.dim() < 1 or h.shape[-1] < 1:
        raise ValueError(f"h must have shape [..., D] with D >= 1, got {tuple(h.shape)}")
    d = h.shape[-1]
    expected = (*h.shape[:-1], 2 * d)
    if tuple(stats.shape) != expected:
        raise ValueError(
            f"stats must have shape [..., 2*D] = {expected} to match h {tuple(h.shape)}, got {tuple(stats.shape)}"
        )
    if stats.dtype != h.dtype:
        raise TypeError(f"stats must have h's dtype {h.dtype}, got {stats.dtype}")
    if stats.device != h.device:
        raise ValueError(f"stats must be on h's device {h.device}, got {stats.device}")
    if (prior_mu is None) != (prior_logvar is None):
        raise ValueError("prior_mu and prior_logvar must be given together (learnable prior) or both be None")
    for name, prior in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if prior is None:
            continue
        _check_tensor(name, prior)
        if tuple(prior.shape) != (d,):
            raise ValueError(f"{name} must have shape [D] = ({d},), got {tuple(prior.shape)}")
        if prior.device != h.device:
            raise ValueError(f"{name} must be on h's device {h.device}, got {prior.device}")
    _validate_tail_options(logvar_clamp, kl_form, sample)


def _validate_tail_options(logvar_clamp, kl_form, sample) -> None:
    """The options shared by every op with the sampling/KL tail."""
    if logvar_clamp is not None:
        if not (isinstance(logvar_clamp, (tuple, list)) and len(logvar_clamp) == 2):
            raise TypeError(f"logvar_clamp must be None or a (low, high) pair, got {logvar_clamp!r}")
        low, high = logvar_clamp
        if not float(low) <= float(high):
            raise ValueError(f"logvar_clamp must have low <= high, got {logvar_clamp!r}")
    if kl_form not in KL_LOGVAR_COEF:
        raise ValueError(f"kl_form must be one of {tuple(KL_LOGVAR_COEF)}, got {kl_form!r}")
    if not isinstance(sample, bool):
        raise TypeError(f"sample must be a bool, got {type(sample).__name__}")


def vib_sample_kl(
    h: torch.Tensor,
    stats: torch.Tensor,
    alpha: float | torch.Tensor,
    *,
    seed: int | torch.Tensor,
    offset: int | torch.Tensor = 0,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    logvar_clamp: tuple[float, float] | None = (-2.3025, 2.3025),
    kl_form: str = "standard",
    sample: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vittle's bottleneck step for every token: ``z_hat = (1-alpha) h + alpha (mu + e^(lv/2) eps)``
    and the per-token closed-form KL to the prior, averaged over D.

    Args:
        h: ``[..., D]`` pre-bottleneck hidden states (float32 / bfloat16 / float16).
        stats: ``[..., 2D]`` bottleneck MLP output, ``mu = stats[..., :D]``, ``lv = stats[..., D:]``.
        alpha: interpolation weight in [0, 1]: a Python float or a 0-dim float32 tensor on h's device.
        seed: Philox key: a Python int in [0, 2**64) or a 0-dim int64 tensor holding its 64 bits.
        offset: Philox counter base (Python int in [0, 2**63) or 0-dim int64 tensor); calls whose
            offsets differ by >= ceil(N*D/4) never share noise.
        prior_mu, prior_logvar: ``[D]`` learnable prior (both) or None for N(0, I).
        logvar_clamp: straight-through clamp of the log-variances, None to disable.
        kl_form: ``"standard"`` (Eq. 8) or ``"released"`` (the released code's KL, which halves both
            log-variance terms: ``1 + (lv - lv_p)/2``).
        sample: False gives the posterior mean (inference): ``z~ = mu``.
        backend: ``"reference" | "triton" | "cpp" | "auto"``.

    Tensor scalars are read by the kernels from memory (CUDA-graph safe; their values are not
    range-checked): the convention of ``vittle_fast.ops.scalars``. Results are bitwise the same
    for a Python scalar and the equal tensor.

    Returns:
        ``z_hat`` ``[..., D]`` in ``h.dtype`` and ``kl`` ``[...]`` float32.
    """
    _validate(h, stats, prior_mu, prior_logvar, logvar_clamp, kl_form, sample)
    scalars = scalar_args(alpha, seed, offset, h.device)
    backend = resolve_backend(backend, h.device.type)
    lead_shape, d = h.shape[:-1], h.shape[-1]
    if prior_mu is not None:  # the kernels read fp32 priors; autograd casts the gradient back
        prior_mu, prior_logvar = prior_mu.float().contiguous(), prior_logvar.float().contiguous()
    elif backend != "reference":  # "no prior" below the public API: an empty tensor (docs/ops.md)
        prior_mu = prior_logvar = h.new_empty((0,), dtype=torch.float32)

    if backend == "reference":
        noise = None
        if sample:
            noise = normal_noise(value_or_tensor(scalars.seed, scalars.seed_t),
                                 value_or_tensor(scalars.offset, scalars.offset_t),
                                 h.numel() // d, d, device=h.device).reshape(h.shape)
        return vib_sample_kl_reference(
            h, stats, value_or_tensor(scalars.alpha, scalars.alpha_t), noise, prior_mu, prior_logvar,
            logvar_clamp, kl_form, sample,
        )

    clamp_lo, clamp_hi = (-math.inf, math.inf) if logvar_clamp is None else map(float, logvar_clamp)
    inputs = (h.reshape(-1, d).contiguous(), stats.reshape(-1, 2 * d).contiguous(), *scalars, prior_mu, prior_logvar,
              clamp_lo, clamp_hi, KL_LOGVAR_COEF[kl_form], sample, backend)
    z_hat, kl = (_fused_forward(*inputs) if use_custom_op(h, stats, prior_mu, prior_logvar)
                 else run_eager(_EAGER_ROUTE, inputs))
    return z_hat.reshape(h.shape), kl.reshape(lead_shape)
