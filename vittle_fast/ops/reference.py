"""The paper's math in plain PyTorch: the oracle every kernel is tested against.

Vittle (Oh et al., NeurIPS 2025), for one token hidden state ``h`` with bottleneck statistics
``stats = [mu, lv]`` (``lv = log sigma^2``):

    lv~   = clamp(lv, lo, hi)                 straight-through: the gradient ignores the clamp
    z~    = mu + exp(lv~ / 2) * eps           reparameterised sample (eps ~ N(0, I))
          = mu                                posterior mean (``sample=False``, inference)
    z^    = (1 - alpha) * h + alpha * z~      interpolation (replaces h for the layers above)
    KL    = mean_j KL(N(mu_j, e^lv~_j) || N(mu_p_j, e^lv~_p_j))     (Eq. 8, averaged over D)
          = mean_j 0.5 * (c * (lv~_p - lv~) + (e^lv~ + (mu - mu_p)^2) / e^lv~_p - 1),   c = 1

The fixed prior is N(0, I) (mu_p = 0, lv_p = 0); the learnable prior's log-variance gets the same
clamp. ``kl_form="released"`` (c = 1/2) reproduces the released code (vittle_llama.py
``vib_kld_loss_lp``): ``-0.5 * (1 + (logsigma - logsigma_prior) - (mu - mu_p)^2 / e^lv_p - e^lv / e^lv_p)``
with ``logsigma = lv / 2`` and ``logsigma_prior = lv_p / 2``: both log-variances are halved.

Everything is computed in float32 (the kernels' register precision); ``z^`` is returned in
``h.dtype`` and the KL in float32. Noise is an explicit argument so tests can feed the same
``eps`` to the reference and to a kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KL_LOGVAR_COEF = {"standard": 1.0, "released": 0.5}


class _StraightThroughClamp(torch.autograd.Function):
    """``clamp`` forward, identity backward. Not ``x + (clamp(x) - x).detach()``: that rounds
    (``1e7 + (2.3 - 1e7)`` is 2.0 in float32) and turns +-inf into NaN."""

    @staticmethod
    def forward(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return x.clamp(low, high)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def clamp_straight_through(x: torch.Tensor, bounds: tuple[float, float] | None) -> torch.Tensor:
    """Clamp in the forward pass, identity in the backward pass (as the released code does)."""
    if bounds is None:
        return x
    return _StraightThroughClamp.apply(x, float(bounds[0]), float(bounds[1]))


def vib_sample_kl_reference(
    h: torch.Tensor,
    stats: torch.Tensor,
    alpha: float | torch.Tensor,
    noise: torch.Tensor | None,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    logvar_clamp: tuple[float, float] | None = (-2.3025, 2.3025),
    kl_form: str = "standard",
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``(z_hat [..., D] in h.dtype, kl [...] float32)``; differentiable in every tensor.

    ``noise`` is ``eps`` with ``h``'s shape (any float dtype), ignored when ``sample`` is False;
    ``alpha`` a Python float or a 0-dim float32 tensor.
    """
    d = h.shape[-1]
    # float32 alpha, as the kernels use it (a CPU 0-dim tensor also serves CUDA tensors, uncopied)
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    mu, logvar = stats.float().split(d, dim=-1)
    logvar = clamp_straight_through(logvar, logvar_clamp)
    if sample:
        z_tilde = mu + torch.exp(0.5 * logvar) * noise.float()
    else:
        z_tilde = mu
    z_hat = (1.0 - alpha) * h.float() + alpha * z_tilde

    if prior_mu is None:
        prior_mu_f = torch.zeros((), device=h.device)
        prior_logvar_f = torch.zeros((), device=h.device)
    else:
        prior_mu_f = prior_mu.float()
        prior_logvar_f = clamp_straight_through(prior_logvar.float(), logvar_clamp)
    coef = KL_LOGVAR_COEF[kl_form]
    kl_per_dim = 0.5 * (
        coef * (prior_logvar_f - logvar)
        + (torch.exp(logvar) + (mu - prior_mu_f) ** 2) * torch.exp(-prior_logvar_f)
        - 1.0
    )
    return z_hat.to(h.dtype), kl_per_dim.mean(dim=-1)


def bottleneck_stats_reference(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                               b2: torch.Tensor) -> torch.Tensor:
    """The bottleneck MLP as nn.Sequential computes it: ``Linear(D, D) -> GELU (erf) -> Linear(D, 2D)``."""
    return F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)


def vib_bottleneck_grouped_reference(
    h: torch.Tensor,
    order: torch.Tensor,
    group_sizes: list[int],
    weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    alpha: float,
    noises: list[torch.Tensor | None],
    priors: list[tuple[torch.Tensor, torch.Tensor] | None],
    logvar_clamp: tuple[float, float] | None = (-2.3025, 2.3025),
    kl_form: str = "standard",
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole bottleneck, unfused: per group, gather its rows ``order[...]``, run the MLP and the
    reference tail with that group's ``noises[g]`` (``[size_g, D]``), write ``z_hat`` back to those
    rows (the other rows of ``h`` pass unchanged). Returns ``(out [N, D], kl [M] in order's order)``."""
    z_parts, kl_parts = [], []
    for rows, (w1, b1, w2, b2), noise, prior in zip(order.split(group_sizes), weights, noises, priors):
        tokens = h.index_select(0, rows)
        prior_mu, prior_logvar = prior if prior is not None else (None, None)
        z_hat, kl = vib_sample_kl_reference(tokens, bottleneck_stats_reference(tokens, w1, b1, w2, b2), alpha,
                                            noise, prior_mu, prior_logvar, logvar_clamp, kl_form, sample)
        z_parts.append(z_hat)
        kl_parts.append(kl)
    z_all = torch.cat(z_parts) if z_parts else h.new_empty((0, h.shape[-1]))
    kl_all = torch.cat(kl_parts) if kl_parts else h.new_empty((0,), dtype=torch.float32)
    return h.index_copy(0, order, z_all), kl_all
