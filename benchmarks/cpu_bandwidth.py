"""Achieved memory bandwidth of the C++ CPU kernel beside a plain copy of the same bytes.

For each thread count, dtype, N (rows of D elements) and direction, one round times, back to back:
the op on its AVX-512 row loops, the op on its portable row loops (VITTLE_FAST_CPU_AVX512=0: the
code before the AVX-512 loops existed, so "before" and "after" share the run), `dst.copy_(src)`
moving the same number of bytes (half read, half written, dst preallocated), and the allocation
plus first touch of the op's outputs (the op allocates them on every call; torch's CPU allocator
has no cache, so large outputs come back as fresh pages from the kernel). The order rotates every
round and the table reports medians over rounds, so load from other processes on a shared machine
hits every column alike.

Bytes of the op: forward reads h and stats and writes z_hat and kl; backward reads grad_z_hat,
grad_kl and stats and writes grad_h and grad_stats. GB/s = those bytes / median wall time.

    python -m benchmarks.cpu_bandwidth [--threads 1 2] [--n 4096 16384] [--d 4096] [--rounds 7]
        [--repeat 1] [--out benchmarks/results/cpu_bandwidth]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.results_io import command_line, write_results
from vittle_fast.ops import cpp

SWITCH = "VITTLE_FAST_CPU_AVX512"
CLAMP = (-2.3025, 2.3025)


def _case(n: int, d: int, dtype: torch.dtype, direction: str):
    """(op thunk, op bytes moved, output shapes) for one configuration."""
    g = torch.Generator().manual_seed(0)
    stats = torch.cat([torch.randn(n, d, generator=g), 3 * torch.randn(n, d, generator=g)], dim=-1).to(dtype)
    scalars = (0.5, 1234, 0, torch.empty(0), torch.empty(0), *CLAMP, 1.0, True)  # empty priors: the fixed prior
    size = torch.tensor([], dtype=dtype).element_size()
    if direction == "fwd":
        h = torch.randn(n, d, generator=g).to(dtype)
        moved = n * d * size * 4 + n * 4  # h + stats (2D) in, z_hat + kl out
        return (lambda: cpp.vib_sample_kl.forward(h, stats, *scalars)), moved, [((n, d), dtype), ((n,), torch.float32)]
    grad_z = torch.randn(n, d, generator=g).to(dtype)
    grad_kl = torch.randn(n, generator=g)
    moved = n * d * size * 6 + n * 4  # grad_z + stats + grad_kl in, grad_h + grad_stats out
    return (lambda: cpp.vib_sample_kl.backward(grad_z, grad_kl, stats, *scalars)), moved, [((n, d), dtype), ((n, 2 * d), dtype)]


def _median_seconds(fns: dict, rounds: int, repeat: int) -> tuple[dict, dict]:
    """Median wall seconds and median process CPU seconds (all threads) per call of each function,
    timing ``repeat`` back-to-back calls per round."""
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        for name in names[r % len(names):] + names[: r % len(names)]:
            os.environ[SWITCH] = "0" if name == "portable" else "1"
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(repeat):
                fns[name]()
            if r:
                wall[name].append((time.perf_counter() - start) / repeat)
                cpu[name].append((time.process_time() - start_cpu) / repeat)
    os.environ.pop(SWITCH, None)
    return ({name: statistics.median(t) for name, t in wall.items()},
            {name: statistics.median(t) for name, t in cpu.items()})


def measure(threads: int, n: int, d: int, dtype: torch.dtype, direction: str, rounds: int, repeat: int = 1) -> dict:
    torch.set_num_threads(threads)
    op, moved, outputs = _case(n, d, dtype, direction)
    src = torch.empty(moved // 2, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    fns = {
        "avx512": op,
        "portable": op,
        "copy": lambda: dst.copy_(src),
        "alloc": lambda: [torch.empty(shape, dtype=dt).fill_(0) for shape, dt in outputs],
    }
    seconds, cpu_seconds = _median_seconds(fns, rounds, repeat)
    gbs = {name: moved / s / 1e9 for name, s in seconds.items() if name != "alloc"}
    # the same over CPU time per thread: what the code achieves on cores of its own
    cpu_gbs = {name: moved / (s / threads) / 1e9 for name, s in cpu_seconds.items() if name != "alloc"}
    return dict(
        threads=threads, n=n, d=d, dtype=str(dtype).removeprefix("torch."), direction=direction, bytes=moved,
        ms={k: round(v * 1e3, 2) for k, v in seconds.items()}, gbs={k: round(v, 2) for k, v in gbs.items()},
        cpu_ms={k: round(v * 1e3, 2) for k, v in cpu_seconds.items()},
        cpu_gbs={k: round(v, 2) for k, v in cpu_gbs.items()},
        avx512_vs_copy_cpu=round(cpu_gbs["avx512"] / cpu_gbs["copy"], 3),
        ns_per_element={k: round(v / (n * d) * 1e9, 3) for k, v in seconds.items()},
        avx512_vs_copy=round(gbs["avx512"] / gbs["copy"], 3), speedup=round(seconds["portable"] / seconds["avx512"], 2),
    )


def to_markdown(rows: list[dict], command: str) -> str:
    head = (
        f"Measured with `{command}` on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} CPUs), torch {torch.__version__}; medians over interleaved rounds, on a machine shared "
        "with other jobs (compare columns within a row).\n\n"
        "GB/s = op bytes / median wall time; in parentheses, over CPU time per thread (what the code gets on "
        "cores of its own).\n\n"
        "| threads | dtype | dir | N x D | AVX-512 GB/s | portable GB/s | speed-up | copy GB/s | AVX-512 / copy | "
        "AVX-512 ns/elem | output alloc+touch ms | AVX-512 ms |\n"
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['threads']} | {r['dtype']} | {r['direction']} | {r['n']}x{r['d']} | {r['gbs']['avx512']:.2f} "
        f"({r['cpu_gbs']['avx512']:.2f}) | {r['gbs']['portable']:.2f} ({r['cpu_gbs']['portable']:.2f}) | "
        f"{r['speedup']:.2f}x | {r['gbs']['copy']:.1f} ({r['cpu_gbs']['copy']:.1f}) | "
        f"{100 * r['avx512_vs_copy']:.0f}% ({100 * r['avx512_vs_copy_cpu']:.0f}%) | "
        f"{r['ns_per_element']['avx512']:.2f} | {r['ms']['alloc']:.1f} | {r['ms']['avx512']:.1f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=1,
                        help="calls per timing (small N: outputs below 32 MiB are reused by malloc, no page faults)")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if not cpp.is_available():
        raise SystemExit(cpp.load_error())
    rows = []
    for threads in args.threads:
        for dtype in args.dtypes:
            for n in args.n:
                for direction in ("fwd", "bwd"):
                    row = measure(threads, n, args.d, getattr(torch, dtype), direction, args.rounds, args.repeat)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    table = to_markdown(rows, command_line("benchmarks.cpu_bandwidth", argv))
    print(table)
    if args.out:
        write_results(args.out, rows, table)


if __name__ == "__main__":
    main()
