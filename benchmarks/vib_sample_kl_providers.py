"""The implementations of Vittle's sample + interpolate + KL step that the benchmarks compare.

- ``eager``: written the way the released code does it (chunk, exp, randn, multiply, add, KL
  expression), one PyTorch op at a time.
- ``compile``: ``torch.compile`` of that same function.
- ``cpp``: the fused C++ kernel through the public op ``vib_sample_kl(..., backend="cpp")``.
"""
from __future__ import annotations

import functools
import os

import torch

from vittle_fast.ops import vib_sample_kl

ALPHA = 0.5
LOGVAR_CLAMP = (-2.3025, 2.3025)
QUICK = os.environ.get("VITTLE_BENCH_QUICK") == "1"
# Issue 3's grid; the quick mode (CI) keeps one small shape so the run takes seconds.
SHAPES = [(256, 512)] if QUICK else [(4096, 1024), (4096, 4096), (16384, 1024), (16384, 4096)]
DTYPES = [torch.bfloat16, torch.float32]
MODES = ["fwd", "fwd+bwd"]
PROVIDERS = ["eager", "compile", "cpp"]


def eager_released(h: torch.Tensor, stats: torch.Tensor, alpha: float = ALPHA):
    """Released-code style: every line is a separate op with its own intermediate tensor."""
    mu, logvar = stats.chunk(2, dim=-1)
    logvar = torch.clamp(logvar, *LOGVAR_CLAMP)
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    z_tilde = mu + std * eps
    z_hat = (1 - alpha) * h + alpha * z_tilde
    kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
    return z_hat, kl


@functools.cache
def _compiled():
    return torch.compile(eager_released, dynamic=False)


def fused_cpp(h: torch.Tensor, stats: torch.Tensor, alpha: float = ALPHA):
    return vib_sample_kl(h, stats, alpha, seed=1234, offset=0, logvar_clamp=LOGVAR_CLAMP, backend="cpp")


def provider_fn(name: str):
    return {"eager": eager_released, "compile": _compiled(), "cpp": fused_cpp}[name]


def make_inputs(n: int, d: int, dtype: torch.dtype, device: str = "cpu", requires_grad: bool = False):
    """(h, stats, grad_z_hat, grad_kl) with the log-variances partly outside the clamp."""
    g = torch.Generator(device="cpu").manual_seed(0) if device == "cpu" else None
    def randn(*shape, scale=1.0):
        if device == "meta":
            return torch.empty(*shape, device="meta", dtype=dtype)
        return (scale * torch.randn(*shape, generator=g)).to(dtype)
    h = randn(n, d).requires_grad_(requires_grad)
    stats = torch.cat([randn(n, d), randn(n, d, scale=2.0)], dim=-1).requires_grad_(requires_grad)
    grad_z = randn(n, d)
    grad_kl = torch.empty(n, device=device) if device == "meta" else torch.randn(n, generator=g)
    return h, stats, grad_z, grad_kl


def run_step(fn, mode: str, h, stats, grad_z, grad_kl):
    """One forward (``mode="fwd"``, no autograd graph) or forward + backward."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(h, stats)
    h.grad = stats.grad = None
    z_hat, kl = fn(h, stats)
    torch.autograd.backward((z_hat, kl), (grad_z, grad_kl))
    return z_hat, kl
