"""Turn a pytest-benchmark JSON of ``test_bench_vib_sample_kl.py`` into the results: a long CSV (one
row per kernel/provider/mode/metric/shape/dtype), a PNG plot and the markdown table of
docs/benchmarks.md (between its ``results`` markers), adding the GPU predictions of gpu_model.py.

    python -m benchmarks.report benchmarks/results/vib_sample_kl_cpu.json
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.gpu_model import PREDICTORS
from benchmarks.vib_sample_kl_providers import PROVIDERS

KERNEL = "vib_sample_kl"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
MARKERS = ("<!-- results:start -->", "<!-- results:end -->")
SMOKE_LABEL = ("SMOKE RUN, NOT A MEASUREMENT: one small shape, 2 rounds each, on a possibly shared machine. "
               "It checks that the benchmark pipeline runs; do not quote these times or ratios "
               "(the full run, bash benchmarks/run_all.sh, is the measurement).")


def load_timings(path: Path) -> dict[tuple, tuple[float, float]]:
    """(provider, mode, dtype, n, d) -> (min, median) CPU time in ms. The minimum is the headline:
    on a shared machine it is the round least disturbed by other processes, for every provider."""
    timings = {}
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench["extra_info"]
        key = (info["provider"], info["mode"], info["dtype"], info["n"], info["d"])
        timings[key] = (bench["stats"]["min"] * 1e3, bench["stats"]["median"] * 1e3)
    return timings


def build_rows(timings: dict[tuple, tuple[float, float]]) -> list[dict]:
    rows = []
    for (provider, mode, dtype, n, d), (ms, median_ms) in sorted(timings.items()):
        shape = f"{n}x{d}"
        eager_ms = timings.get(("eager", mode, dtype, n, d), (None,))[0]
        cost = PREDICTORS[provider](n, d, getattr(torch, dtype), mode)
        eager_cost = PREDICTORS["eager"](n, d, getattr(torch, dtype), mode)
        metrics = [
            ("cpu_time_min", ms, "ms"),
            ("cpu_time_median", median_ms, "ms"),
            ("cpu_speedup_vs_eager", eager_ms / ms if eager_ms else float("nan"), "x"),
            ("gpu_bytes", cost.bytes, "B"),
            ("gpu_bytes_vs_eager", cost.bytes / eager_cost.bytes, "fraction"),
            ("gpu_launches", cost.launches, "count"),
            ("gpu_saved_for_backward", cost.saved_bytes, "B"),
            ("gpu_saved_for_backward_non_input", cost.saved_extra_bytes, "B"),
            ("h100_predicted_time", cost.h100_us, "us"),
        ]
        for metric, value, unit in metrics:
            rows.append(dict(kernel=KERNEL, provider=provider, mode=mode, metric=metric, shape=shape, dtype=dtype,
                             value=value, unit=unit))
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def pivot(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    table = defaultdict(dict)
    for r in rows:
        table[(r["mode"], r["dtype"], r["shape"], r["provider"])][r["metric"]] = r["value"]
    return table


def markdown_table(rows: list[dict]) -> str:
    table = pivot(rows)
    lines = [
        "| mode | dtype | N x D | provider | CPU ms (min / median) | CPU speed-up vs eager | GPU MiB moved (pred.) "
        "| vs eager | launches | saved for bwd MiB (non-input) | H100 µs (pred.) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {p: i for i, p in enumerate(PROVIDERS)}
    for key in sorted(table, key=lambda k: (k[0], k[1], [int(x) for x in k[2].split("x")], order[k[3]])):
        mode, dtype, shape, provider = key
        m = table[key]
        saved = f"{m['gpu_saved_for_backward'] / 2**20:.0f} ({m['gpu_saved_for_backward_non_input'] / 2**20:.0f})"
        lines.append(
            f"| {mode} | {dtype} | {shape} | {provider} | {m['cpu_time_min']:.0f} / {m['cpu_time_median']:.0f} | "
            f"{m['cpu_speedup_vs_eager']:.2f} | {m['gpu_bytes'] / 2**20:.1f} | {m['gpu_bytes_vs_eager']:.2f} | "
            f"{m['gpu_launches']:.0f} | {saved} | {m['h100_predicted_time']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, smoke: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pivot(rows)
    modes = sorted({k[0] for k in table})
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(6 * (len(modes) + 1), 4.5))
    groups = sorted({(k[1], k[2]) for k in table}, key=lambda g: (g[0], [int(x) for x in g[1].split("x")]))
    labels = [f"{dtype}\n{shape}" for dtype, shape in groups]
    width = 0.8 / len(PROVIDERS)
    for ax, mode in zip(axes, modes):
        for i, provider in enumerate(PROVIDERS):
            values = [table.get((mode, dtype, shape, provider), {}).get("cpu_speedup_vs_eager", 0) for dtype, shape in groups]
            ax.bar([g + i * width for g in range(len(groups))], values, width, label=provider)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"CPU speed-up vs eager ({mode}, higher is better)")
        ax.set_xticks([g + width for g in range(len(groups))], labels, fontsize=7)
        ax.legend()
    ax = axes[-1]
    for i, provider in enumerate(PROVIDERS):
        values = [table.get(("fwd+bwd", dtype, shape, provider), {}).get("gpu_bytes", 0) / 2**30 for dtype, shape in groups]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=provider)
    ax.set_title("Predicted GPU bytes, fwd+bwd (GiB, lower is better)")
    ax.set_xticks([g + width for g in range(len(groups))], labels, fontsize=7)
    ax.legend()
    if smoke:
        fig.suptitle("SMOKE RUN, NOT A MEASUREMENT (2 rounds, one small shape)", color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def update_docs(table: str, header: str) -> None:
    if not DOCS.exists():
        return
    text = DOCS.read_text()
    start, end = MARKERS
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    DOCS.write_text(pattern.sub(lambda _: f"{start}\n{header}\n\n{table}\n{end}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/benchmarks.md")
    parser.add_argument("--smoke", action="store_true",
                        help="a VITTLE_BENCH_QUICK run: label every output 'smoke, not a measurement' (implies --no-docs)")
    args = parser.parse_args()
    rows = build_rows(load_timings(args.json))
    stem = args.json.with_suffix("")
    write_csv(rows, stem.with_suffix(".csv"))
    plot(rows, stem.with_suffix(".png"), smoke=args.smoke)
    table = markdown_table(rows)
    if args.smoke:
        table = SMOKE_LABEL + "\n\n" + table
    stem.with_suffix(".md").write_text(table + "\n")
    machine = json.loads(args.json.read_text())["machine_info"]
    header = (f"Measured on {machine.get('cpu', {}).get('brand_raw', 'a CPU')} "
              f"({torch.get_num_threads()} threads), torch {torch.__version__}; source: `{args.json.name}`.")
    if not (args.no_docs or args.smoke):
        update_docs(table, header)
    print(table)


if __name__ == "__main__":
    main()
