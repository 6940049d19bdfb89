"""The paper's math in plain PyTorch: the oracle every kernel is tested against.

Vittle (Oh et al., NeurIPS 2025), for one token hidden state ``h`` with bottleneck statistics
``stats = [mu, lv]`` (``lv = log sigma^2``):

    lv~   = clamp(lv, lo, hi)                 straight-through: the gradient ignores the clamp
    z~    = mu + exp(lv~ / 2) * eps           reparameterised sample (eps ~ N(0, I))
          = mu                                posterior mean (``sample=False``, inference)
    z^    = (1 - alpha) * h + alpha * z~      interpolation (replaces h for the layers above)
    KL    = mean_j KL(N(mu_j, e^lv~_j) || N(mu_p_j, e^lv~_p_j))     (Eq. 8, averaged over D)
          = mean_j 0.5 * (lv~_p - lv~ + (e^lv~ + (mu - mu_p)^2) / e^lv~_p - 1)

The fixed prior is N(0, I) (mu_p = 0, lv_p = 0); the learnable prior's log-variance gets the same
clamp. ``kl_form="released"`` reproduces the released code, whose KL has ``1 + lv/2`` where Eq. 8
has ``1 + lv``: the ``-lv~`` term above becomes ``-lv~ / 2``.

Everything is computed in float32 (the kernels' register precision); ``z^`` is returned in
``h.dtype`` and the KL in float32. Noise is an explicit argument so tests can feed the same
``eps`` to the reference and to a kernel.
"""
from __future__ import annotations

import torch

KL_LOGVAR_COEF = {"standard": 1.0, "released": 0.5}


def clamp_straight_through(x: torch.Tensor, bounds: tuple[float, float] | None) -> torch.Tensor:
    """Clamp in the forward pass, identity in the backward pass (as the released code does)."""
    if bounds is None:
        return x
    return x + (x.clamp(bounds[0], bounds[1]) - x).detach()


def vib_sample_kl_reference(
    h: torch.Tensor,
    stats: torch.Tensor,
    alpha: float,
    noise: torch.Tensor | None,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    logvar_clamp: tuple[float, float] | None = (-2.3025, 2.3025),
    kl_form: str = "standard",
    sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``(z_hat [..., D] in h.dtype, kl [...] float32)``; differentiable in every tensor.

    ``noise`` is ``eps`` with ``h``'s shape (any float dtype), ignored when ``sample`` is False.
    """
    d = h.shape[-1]
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
        prior_logvar_f
        - coef * logvar
        + (torch.exp(logvar) + (mu - prior_mu_f) ** 2) * torch.exp(-prior_logvar_f)
        - 1.0
    )
    return z_hat.to(h.dtype), kl_per_dim.mean(dim=-1)
