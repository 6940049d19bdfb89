"""Tables of the whole-bottleneck benchmark: measured CPU times + saved-for-backward bytes from a
pytest-benchmark JSON, predicted H100 cost for the issue's grid (benchmarks/bottleneck_providers.py).

    python -m benchmarks.bottleneck_report out.json   # measured + predicted
    python -m benchmarks.bottleneck_report            # predicted only; keeps the committed measured tables

Writes benchmarks/results/vib_bottleneck_cpu.md and the section between the markers of
docs/benchmarks.md.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.bottleneck_providers import GEMM_EFFICIENCY, PROVIDERS, predicted

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "vib_bottleneck_cpu.md"
MARKERS = ("<!-- bottleneck:start -->", "<!-- bottleneck:end -->")
GRID = [(n, d) for n in (4096, 16384) for d in (1024, 4096)]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def measured_table(path: Path) -> str:
    runs, paired = {}, []
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench["extra_info"]
        key = (info["dtype"], info["n"], info["d"])
        if info["provider"] == "paired":
            ms = info["median_ms"]
            paired.append(f"| {key[0]} | {key[1]} x {key[2]} | {ms['eager']:.0f} | {ms['module']:.0f} | "
                          f"{ms['fused']:.0f} | {info['fused_vs_eager']:.2f}x | {info['fused_vs_module']:.2f}x |")
            continue
        runs.setdefault(key, {})[info["provider"]] = (statistics.median(bench["stats"]["data"]) * 1e3,
                                                      info["saved_bytes"], info["saved_extra_bytes"])
    lines = ["| dtype | N x D | provider | CPU ms (median) | vs eager | vs module | saved for bwd MiB (beyond inputs) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for (dtype, n, d), by_provider in sorted(runs.items()):
        for provider in PROVIDERS:
            if provider not in by_provider:
                continue
            ms, saved, extra = by_provider[provider]
            lines.append(f"| {dtype} | {n} x {d} | {provider} | {ms:.0f} | {by_provider['eager'][0] / ms:.2f}x | "
                         f"{by_provider['module'][0] / ms:.2f}x | {saved / 2**20:.1f} ({extra / 2**20:.1f}) |")
    paired_lines = ["| dtype | N x D | eager ms | module ms | fused ms | fused vs eager | fused vs module |",
                    "|---|---|---:|---:|---:|---:|---:|", *paired]
    return ("Paired rounds (the three providers round-robin in each round; medians):\n\n" + "\n".join(paired_lines)
            + "\n\nPer-provider runs (one provider after the other) and saved-for-backward bytes:\n\n"
            + "\n".join(lines))


def predicted_table() -> str:
    lines = ["| dtype | N x D | provider | non-GEMM MiB | launches | GEMM floor µs | predicted µs | / floor |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for dtype_name, dtype in DTYPES.items():
        for n, d in GRID:
            for provider in [*PROVIDERS, "bound"]:
                cost = predicted(provider, n, d, dtype)
                lines.append(f"| {dtype_name} | {n} x {d} | {provider} | {cost['bytes'] / 2**20:.0f} | "
                             f"{cost['launches'] or '-'} | {cost['gemm_floor_us']:.0f} | {cost['h100_us']:.0f} | "
                             f"{cost['h100_us'] / cost['gemm_floor_us']:.2f} |")
    return "\n".join(lines)


PREDICTED_HEADER = "Predicted on an H100"


def main() -> None:
    if len(sys.argv) > 1:
        measured = ("Measured on CPU (forward + backward, one pytest-benchmark run):\n\n"
                    f"{measured_table(Path(sys.argv[1]))}\n\n")
    else:  # prediction only: keep the committed measurement
        measured = RESULTS.read_text().split(PREDICTED_HEADER)[0]
    model = (f"per-kernel roofline: GEMMs at {GEMM_EFFICIENCY:.0%} of the dense peak, every other pass at "
             "3.35 TB/s,\na fused epilogue hidden under its GEMM's FLOP time; `bound`: the floor plus the one pass "
             "any design with a materialised dstats\nmakes -- benchmarks/bottleneck_providers.py")
    text = f"{measured}{PREDICTED_HEADER} (not measured; {model}):\n\n{predicted_table()}\n"
    RESULTS.write_text(text)
    doc = DOCS.read_text()
    start, end = doc.index(MARKERS[0]) + len(MARKERS[0]), doc.index(MARKERS[1])
    DOCS.write_text(doc[:start] + "\n" + text + doc[end:])
    print(text)


if __name__ == "__main__":
    main()
