"""Loss memory and time of the LM head + cross-entropy, fused (chunked, ``fused_linear_cross_entropy``)
vs unfused (``F.cross_entropy(F.linear(h, W).float(), t)``), forward + backward, on CPU.

Memory: each (implementation, vocab, tokens) runs once in a fresh subprocess with
``MALLOC_MMAP_THRESHOLD_=65536`` (every large buffer is its own mmap, returned to the OS on free);
the loss memory is the peak resident set (VmHWM) during forward + backward minus the resident set
just before, with the inputs allocated and touched. It includes the two gradients both ways.
Time: in one process, interleaved pairs (fused, unfused, order alternating per round), medians.
Cases whose unfused run would need more than ``--max-gb`` are not run; their unfused memory is
predicted from the bytes per logit measured on the largest case that ran, and marked so.

    python -m benchmarks.fused_ce [--hidden 256] [--rounds 3] [--json benchmarks/results/fused_ce.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from vittle_fast.ops import fused_linear_cross_entropy

CASES = [(32000, 4096), (32000, 16384), (152064, 1024), (152064, 4096), (152064, 16384)]


def make_inputs(vocab: int, tokens: int, hidden: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), generator=g)
    return h, w, t


def run_loss(impl: str, h, w, t) -> None:
    if impl == "fused":
        loss = fused_linear_cross_entropy(h, w, t)
    else:
        loss = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
    loss.backward()
    h.grad = w.grad = None


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def measure_memory_here(impl: str, vocab: int, tokens: int, hidden: int, dtype: str) -> int:
    """Peak RSS increase (bytes) of one forward + backward, in this (fresh) process."""
    torch.set_num_threads(1)  # memory only; one thread keeps the child off the other agents' core
    h, w, t = make_inputs(vocab, tokens, hidden, getattr(torch, dtype))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS:")
    run_loss(impl, h, w, t)
    return _status("VmHWM:") - before


def measure_memory(impl: str, vocab: int, tokens: int, hidden: int, dtype: str) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    code = (f"from benchmarks.fused_ce import measure_memory_here as m; "
            f"print(m({impl!r}, {vocab}, {tokens}, {hidden}, {dtype!r}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def measure_time(vocab: int, tokens: int, hidden: int, dtype: str, rounds: int, run_unfused: bool) -> dict:
    h, w, t = make_inputs(vocab, tokens, hidden, getattr(torch, dtype))
    times = {"fused": [], "unfused": []}
    for r in range(rounds):
        order = ["fused", "unfused"] if r % 2 == 0 else ["unfused", "fused"]
        for impl in order:
            if impl == "unfused" and not run_unfused:
                continue
            start = time.perf_counter()
            run_loss(impl, h, w, t)
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(v) if v else None for impl, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-gb", type=float, default=5.0, help="skip unfused runs predicted above this")
    parser.add_argument("--cases", default=",".join(f"{v}x{t}" for v, t in CASES), help="VOCABxTOKENS,...")
    parser.add_argument("--bytes-per-logit", type=float, default=16.0,
                        help="unfused bytes per logit for predictions until a case measures it")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]

    rows, bytes_per_logit = [], args.bytes_per_logit  # replaced once a case measures it
    for vocab, tokens in cases:
        run_unfused = bytes_per_logit * vocab * tokens / 1e9 <= args.max_gb
        mem = {"fused": measure_memory("fused", vocab, tokens, args.hidden, args.dtype)}
        if run_unfused:
            mem["unfused"] = measure_memory("unfused", vocab, tokens, args.hidden, args.dtype)
            bytes_per_logit = mem["unfused"] / (vocab * tokens)
        else:
            mem["unfused"] = bytes_per_logit * vocab * tokens
        secs = measure_time(vocab, tokens, args.hidden, args.dtype, args.rounds, run_unfused)
        row = {"vocab": vocab, "tokens": tokens, "hidden": args.hidden, "dtype": args.dtype,
               "fused_gb": mem["fused"] / 1e9, "unfused_gb": mem["unfused"] / 1e9, "unfused_measured": run_unfused,
               "memory_ratio": mem["unfused"] / mem["fused"], "fused_s": secs["fused"], "unfused_s": secs["unfused"],
               "rounds": args.rounds}
        rows.append(row)
        print(json.dumps(row), flush=True)

    print("\n| vocab | tokens | unfused loss memory | fused loss memory | ratio | unfused time | fused time |"
          "\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        mark = "" if r["unfused_measured"] else " (predicted)"
        unfused_s = f"{r['unfused_s']:.2f} s" if r["unfused_s"] is not None else "not run"
        print(f"| {r['vocab']:,} | {r['tokens']:,} | {r['unfused_gb']:.2f} GB{mark} | {r['fused_gb']:.3f} GB | "
              f"{r['memory_ratio']:.1f}x | {unfused_s} | {r['fused_s']:.2f} s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
