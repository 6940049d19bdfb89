"""``python -m vittle_fast.ops``: show which backends work here and run the fused op once.

Prints the per-token KL and the statistics of the noise the op drew (recovered exactly by running
with h = 0, mu = 0, log-variance = 0 and alpha = 1, where z_hat is the noise itself).
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import available_backends, vib_sample_kl
from .backends import BACKENDS, REGISTRY, unavailable_reason


def _noise_statistics(eps: torch.Tensor) -> str:
    eps = eps.double().flatten()
    centred = eps - eps.mean()
    kurtosis = (centred**4).mean() / eps.var() ** 2
    neighbour_corr = torch.corrcoef(torch.stack([eps[:-1], eps[1:]]))[0, 1]
    return (f"mean {eps.mean():+.4f} (0), variance {eps.var():.4f} (1), kurtosis {kurtosis:.3f} (3), "
            f"neighbour correlation {neighbour_corr:+.4f} (0)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vittle_fast.ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="number of tokens N (default 4096)")
    parser.add_argument("--dim", type=int, default=256, help="hidden size D (default 256)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="op backend (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="Philox key (default 0)")
    parser.add_argument("--check", action="store_true", help="one-line installation check, tiny shapes")
    args = parser.parse_args(argv)
    if args.check:
        args.tokens, args.dim = 8, 16

    if not args.check:
        for name in REGISTRY:
            reason = unavailable_reason(name)
            print(f"backend {name:9s}: {'importable' if not reason else 'unavailable - ' + reason}")
        print(f"backends usable on CPU tensors: {available_backends('cpu')}")

    n, d = args.tokens, args.dim
    h = torch.zeros(n, d)
    stats = torch.zeros(n, 2 * d)
    eps, _ = vib_sample_kl(h, stats, 1.0, seed=args.seed, backend=args.backend)

    generator = torch.Generator().manual_seed(args.seed)
    h = torch.randn(n, d, generator=generator, requires_grad=True)
    stats = (0.5 * torch.randn(n, 2 * d, generator=generator)).requires_grad_()
    z_hat, kl = vib_sample_kl(h, stats, 0.5, seed=args.seed, backend=args.backend)
    (z_hat.square().mean() + kl.mean()).backward()

    if args.check:
        ok = bool(torch.isfinite(kl).all() and torch.isfinite(stats.grad).all())
        print(f"vittle_fast.ops check: {'ok' if ok else 'FAILED'} (backends on CPU: {available_backends('cpu')})")
        return 0 if ok else 1
    print(f"\nvib_sample_kl on [{n}, {d}] float32, alpha 0.5, backend {args.backend!r}:")
    print(f"  per-token KL: mean {kl.mean():.4f}, min {kl.min():.4f}, max {kl.max():.4f}")
    print(f"  noise ({eps.numel()} draws): {_noise_statistics(eps)}")
    print(f"  grad norms: h {h.grad.norm():.4f}, stats {stats.grad.norm():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
