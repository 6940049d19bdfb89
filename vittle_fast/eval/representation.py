"""Representation shift between clean and perturbed inputs, at the bottleneck layer.

Per sample: the cosine distance ``1 - cos(r_clean, r_perturbed)`` of the prompt-mean representation
(posterior mean ``z`` for Vittle, the layer output ``h`` for any model, from ``--dump-hidden``).
Between the two sets: a Jensen-Shannon divergence estimate, in nats (0 ... ln 2). The estimator:
project both sets onto the top ``k`` principal directions of their union (``k <= 16``), fit one
Gaussian to each (sample mean and covariance + a small ridge), and Monte-Carlo-integrate
``JSD = 1/2 E_P[log p/m] + 1/2 E_Q[log q/m]``, ``m = (p + q)/2``, with ``n_draws`` fixed-seed draws
from each fitted Gaussian. It measures the shift of the first two moments only (not of the finer
shape of the distributions), and is deterministic.

    python -m vittle_fast.eval.representation CLEAN_OUT_DIR PERTURBED_OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from .questions import key_of


def cosine_distance(clean, perturbed) -> np.ndarray:
    """Per-row ``1 - cos`` of two [N, D] arrays (rows paired)."""
    a, b = np.asarray(clean, dtype=np.float64), np.asarray(perturbed, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"clean and perturbed must be paired [N, D] arrays, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return 1.0 - (a * b).sum(1) / np.maximum(norms, 1e-12)


def _gaussian_logpdf(x, mean, cov):
    chol = np.linalg.cholesky(cov)
    solved = np.linalg.solve(chol, (x - mean).T)
    return -0.5 * (solved ** 2).sum(0) - np.log(np.diag(chol)).sum() - 0.5 * mean.size * math.log(2 * math.pi)


def gaussian_jsd(p_samples, q_samples, *, max_dim: int = 16, n_draws: int = 20000, ridge: float = 1e-6,
                 seed: int = 0) -> float:
    """Jensen-Shannon divergence (nats) between Gaussian fits of two sample sets [N, D], [M, D]
    (module docstring); ``ridge`` times the mean variance is added to each covariance's diagonal."""
    p, q = np.asarray(p_samples, dtype=np.float64), np.asarray(q_samples, dtype=np.float64)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1] or min(len(p), len(q)) < 2:
        raise ValueError(f"need two [N>=2, D] sample sets with the same D, got {p.shape} and {q.shape}")
    union = np.concatenate([p, q])
    centre = union.mean(0)
    k = max(1, min(max_dim, p.shape[1], len(union) - 1))
    _, _, vt = np.linalg.svd(union - centre, full_matrices=False)
    basis = vt[:k].T
    p, q = (p - centre) @ basis, (q - centre) @ basis
    scale = max(float(np.concatenate([p, q]).var(0).mean()), 1e-30)
    fits = [(x.mean(0), np.atleast_2d(np.cov(x, rowvar=False)) + ridge * scale * np.eye(k)) for x in (p, q)]
    rng = np.random.default_rng(seed)
    total = 0.0
    for own in range(2):
        draws = rng.multivariate_normal(*fits[own], size=n_draws, method="cholesky")
        logs = [_gaussian_logpdf(draws, *fit) for fit in fits]
        log_m = np.logaddexp(logs[0], logs[1]) - math.log(2)
        total += 0.5 * float(np.mean(logs[own] - log_m))
    return min(max(total, 0.0), math.log(2))


def compare_hidden(clean_path, perturbed_path) -> dict:
    """Cosine distance (mean, std over the paired questions) and JSD, per representation in both
    ``hidden.pt`` files (``h``, and ``z`` for Vittle)."""
    clean, shifted = torch.load(clean_path), torch.load(perturbed_path)
    index = {key_of(qid): i for i, qid in enumerate(shifted["question_id"])}
    pairs = [(i, index[key_of(qid)]) for i, qid in enumerate(clean["question_id"]) if key_of(qid) in index]
    if len(pairs) < 2:
        raise ValueError(f"{clean_path} and {perturbed_path} share fewer than 2 question ids")
    rows_a, rows_b = map(list, zip(*pairs))
    result = {"n": len(pairs)}
    for name in sorted(set(clean) & set(shifted) - {"question_id"}):
        a, b = clean[name][rows_a].double().numpy(), shifted[name][rows_b].double().numpy()
        distance = cosine_distance(a, b)
        result[name] = {"cosine_distance": float(distance.mean()), "cosine_distance_std": float(distance.std()),
                        "jsd": gaussian_jsd(a, b)}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Representation shift between two eval outputs made with --dump-hidden.")
    parser.add_argument("clean", help="eval output directory (or hidden.pt) of the clean run")
    parser.add_argument("perturbed", help="eval output directory (or hidden.pt) of the perturbed run")
    args = parser.parse_args(argv)
    paths = [Path(p) / "hidden.pt" if Path(p).is_dir() else Path(p) for p in (args.clean, args.perturbed)]
    print(json.dumps(compare_hidden(*paths), indent=1))


if __name__ == "__main__":
    main()
