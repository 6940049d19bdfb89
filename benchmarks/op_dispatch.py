"""What the Python layer around a fused op costs per call, on CPU (ops/eager.py).

Forward + backward of ``vib_bottleneck_grouped`` (two groups, the C++ backend, one thread), three ways,
interleaved in every round (order rotated): the public function on its eager route (what training runs), the same
call forced through the ``torch.library`` custom-op route (what ``torch.compile`` traces; the only
route before ops/eager.py), and the C++ launchers alone (no validation, no autograd: the floor).
Medians over rounds, per shape.

    python -m benchmarks.op_dispatch [--rounds 300] [--out benchmarks/results/op_dispatch]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from benchmarks.results_io import command_line, write_results
from vittle_fast.ops import vib_bottleneck_grouped
from vittle_fast.ops.cpp import vib_bottleneck as launchers

# (N, D, visual rows): the demo's micro-batch (8 x 61 tokens, 8 x 16 image tokens) and d = 512 of
# benchmarks/trainer_overhead.py's d512 scale (2 x 704 tokens, 2 x 676 image tokens).
SHAPES = [(488, 64, 128), (1408, 512, 1352)]
ROUTES = ("eager route", "custom-op route", "launchers only")


def _case(n: int, d: int, visual: int):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    weights = [tuple((torch.randn(*shape, generator=g) / d**0.5).requires_grad_()
                     for shape in ((d, d), (d,), (2 * d, d), (2 * d,))) for _ in range(2)]
    order = torch.randperm(n, generator=g)
    return h, order, [visual, n - visual], weights


def _calls(h, order, sizes, weights):
    def public():
        out, kl = vib_bottleneck_grouped(h, order, sizes, weights, 0.5, seed=1, offsets=[0, 1 << 38], backend="cpp")
        torch.autograd.backward((out, kl), (torch.ones_like(out), torch.ones_like(kl)))
        for t in (h, *[t for w in weights for t in w]):
            t.grad = None  # as zero_grad(set_to_none=True) between steps

    def custom_op():
        with mock.patch.object(sys.modules["vittle_fast.ops.vib_bottleneck"], "use_custom_op", lambda *t: True):
            public()

    no_prior = torch.empty(0)
    w1s, b1s, w2s, b2s = ([w[i].detach() for w in weights] for i in range(4))
    args = (order, sizes, w1s, b1s, w2s, b2s, 0.5, 1, [0, 1 << 38], [no_prior] * 2, [no_prior] * 2, -2.3025, 2.3025,
            1.0, True, False)

    def floor():
        out, kl, preact, stats = launchers.forward(h.detach(), *args)
        launchers.backward(torch.ones_like(out), torch.ones_like(kl), h.detach(), *args, preact, stats)

    return dict(zip(ROUTES, (public, custom_op, floor)))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for n, d, visual in SHAPES:
        calls = _calls(*_case(n, d, visual))
        times = {route: [] for route in ROUTES}
        for r in range(args.warmup + args.rounds):
            for route in ROUTES[r % 3:] + ROUTES[:r % 3]:  # rotated: no route always runs first
                fn = calls[route]
                start = time.perf_counter()
                fn()
                if r >= args.warmup:
                    times[route].append(time.perf_counter() - start)
        medians = {route: statistics.median(t) * 1e3 for route, t in times.items()}
        rows.append({"n": n, "d": d, "groups": [visual, n - visual], "ms": medians})
        print(f"N={n} D={d}: " + ", ".join(f"{route} {ms:.3f} ms" for route, ms in medians.items()), flush=True)
    table = [f"Forward + backward of `vib_bottleneck_grouped` (2 groups, C++ backend, 1 thread), median of "
             f"{args.rounds} interleaved rounds. Command: `{command_line('benchmarks.op_dispatch', argv)}`", "",
             "| N x D | " + " | ".join(f"{r} ms" for r in ROUTES) + " | custom-op route over launchers | eager route over launchers |",
             "|---|" + "---:|" * (len(ROUTES) + 2)]
    for row in rows:
        ms = row["ms"]
        floor = ms["launchers only"]
        table.append(f"| {row['n']} x {row['d']} | " + " | ".join(f"{ms[r]:.3f}" for r in ROUTES)
                     + f" | {ms['custom-op route'] - floor:+.3f} ms | {ms['eager route'] - floor:+.3f} ms |")
    text = "\n".join(table) + "\n"
    print(text)
    if args.out:
        write_results(Path(args.out), rows, text)
    return rows


if __name__ == "__main__":
    main()
