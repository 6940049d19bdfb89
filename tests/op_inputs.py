"""Random inputs of the fused op, shared by every op test file."""
import torch


def make_inputs(lead_shape, d, dtype, learnable_prior, generator_seed=0):
    """``h, stats, (prior_mu, prior_logvar), grad_z, grad_kl`` from a seeded generator; the
    log-variances (and the learnable prior's) spread well outside the clamp, so it is exercised both
    ways."""
    g = torch.Generator().manual_seed(generator_seed)
    h = torch.randn(*lead_shape, d, generator=g).to(dtype)
    mu = torch.randn(*lead_shape, d, generator=g)
    logvar = 3.0 * torch.randn(*lead_shape, d, generator=g)
    stats = torch.cat([mu, logvar], dim=-1).to(dtype)
    priors = (None, None)
    if learnable_prior:
        priors = (0.5 * torch.randn(d, generator=g), 3.0 * torch.randn(d, generator=g))
    grad_z = torch.randn(*lead_shape, d, generator=g).to(dtype)
    grad_kl = torch.randn(*lead_shape, generator=g)
    return h, stats, priors, grad_z, grad_kl


def launcher_priors(prior_mu, prior_logvar):
    """The priors as the launchers and custom ops take them: the fixed prior is an empty [0] tensor
    ("no prior" below the public API, docs/ops.md)."""
    return tuple(torch.empty(0) if p is None else p for p in (prior_mu, prior_logvar))
