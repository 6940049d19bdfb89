"""The paper's robustness claim at demo scale: baseline LLaVA vs Vittle (F) vs Vittle (L), several
seeds, evaluated clean and under every perturbation kind x severity, on CPU.

For each method and seed: train on the demo set (configs/demo.yaml with the method's overrides,
`torchrun` on NPROC processes), then evaluate the export on the demo's image-dependent contrast
questions (the same question about two images with different answers, so a model that ignores the
image scores at most 50%) clean and under each shift, dumping the bottleneck-layer representations
(z for Vittle, the layer output h for the baseline) to measure their shift. Writes
benchmarks/results/robustness.{json,md,png}: accuracy clean, accuracy under shift averaged per
kind, relative drop, representation distance (cosine, JSD) -- mean +- std over seeds.

    python -m benchmarks.robustness [--seeds 0 1 2] [--severities 1 2 3 4 5] [--kinds all] [--work outputs/robustness]

Everything is cached in --work (trained exports, eval outputs), so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "baseline": ["vittle.enabled=false"],
    "vittle_f": ["vittle.prior=fixed"],
    "vittle_l": ["vittle.prior=learnable"],
}
LABELS = {"baseline": "LLaVA (baseline)", "vittle_f": "Vittle (F)", "vittle_l": "Vittle (L)"}
METRICS = ("accuracy", "cosine", "jsd", "h_cosine", "h_jsd")  # cosine/jsd: z for Vittle, h for the baseline
DATA_SEED = 0  # one demo set for every run: seeds vary the model init, data order and noise only


def train(method: str, seed: int, data, work: Path, extra: list[str], nproc: int) -> Path:
    out = work / f"{method}_seed{seed}"
    if (out / "export" / "model.safetensors").is_file() and (out / "export" / "tokenizer_config.json").is_file():
        return out / "export"
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--output_dir", str(out), f"seed={seed}",
            "data.demo=false", f"data.data_path={data.train_json}", f"data.image_folder={data.image_folder}",
            f"data.tokenizer={data.tokenizer_dir}", "logging.progress_bar=false", "logging.tensorboard=false",
            "checkpoint.interval=0", f"data.micro_batch_size={16 // nproc}", *METHODS[method], *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "vittle_fast.train", *args]
    started = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"training {method} seed {seed} failed:\n{result.stderr[-3000:]}")
    print(f"[robustness] trained {method} seed {seed} in {time.time() - started:.0f} s", flush=True)
    return out / "export"


def evaluate_all(export: Path, data, work: Path, perturbations: list[str | None]) -> dict:
    """Metrics and representation shift of one export, clean and under each perturbation."""
    from vittle_fast.eval import ExportedModel, evaluate
    from vittle_fast.eval.representation import compare_hidden

    exported = ExportedModel.load(export)
    results = {}
    clean_dir = None
    for spec in perturbations:
        out = work / "eval" / export.parent.name / (spec or "clean").replace(":", "_")
        metrics_file = out / "metrics.json"
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
        else:
            metrics = evaluate(export, data.contrast_questions, data.image_folder, out, perturb=spec,
                               batch_size=64, max_new_tokens=4, dump_hidden=True, exported=exported,
                               progress=False)
        entry = {"accuracy": metrics["exact_match"], "nll": metrics["nll_per_token"]}
        if spec is None:
            clean_dir = out
        else:
            shift = compare_hidden(clean_dir / "hidden.pt", out / "hidden.pt")
            rep = shift["z"] if "z" in shift else shift["h"]  # Vittle: posterior mean; baseline: hidden state
            entry.update(cosine=rep["cosine_distance"], jsd=rep["jsd"], h_cosine=shift["h"]["cosine_distance"],
                         h_jsd=shift["h"]["jsd"])
        results[spec or "clean"] = entry
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over seeds (NaN -- e.g. a relative drop from 0 clean accuracy -- propagates)."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summarize(raw: dict, kinds: list[str], severities: list[int]) -> dict:
    """Per method: per-seed clean accuracy, per-kind accuracy (mean over severities), relative drop,
    distances; and the curves accuracy / distance vs severity averaged over visual and text kinds."""
    from vittle_fast.eval.perturb import KINDS

    summary = {}
    for method, seeds in raw.items():
        per_seed = []
        for result in seeds.values():
            clean = result["clean"]["accuracy"]
            row = {"clean": clean, "kinds": {}, "curves": {}}
            for kind in kinds:
                entries = [result[f"{kind}:{s}"] for s in severities]
                row["kinds"][kind] = {name: statistics.fmean(e[name] for e in entries) for name in METRICS}
            for group in ("visual", "text"):
                members = [k for k in kinds if KINDS[k] == group]
                if members:
                    row["curves"][group] = {name: [statistics.fmean(result[f"{k}:{s}"][name] for k in members)
                                                   for s in severities] for name in METRICS}
            shifted = statistics.fmean(row["kinds"][k]["accuracy"] for k in kinds)
            row["shifted"] = shifted
            row["relative_drop"] = (clean - shifted) / clean if clean > 0 else math.nan
            per_seed.append(row)
        summary[method] = per_seed
    return summary


def write_table(summary: dict, kinds: list[str], path: Path, meta: dict) -> None:
    """Markdown tables. Distances: h = output of the bottleneck's decoder block (the same quantity in
    every model, comparable across methods); z = Vittle's posterior mean (its own scale)."""
    def over_kinds(rows, name):
        return [statistics.fmean(r["kinds"][k][name] for k in kinds) for r in rows]

    lines = [f"Demo contrast questions ({meta['n_questions']} questions; 50% is the most a model that ignores "
             f"the image can score); seeds {meta['seeds']}; severities {meta['severities']}; mean ± std over seeds. "
             "Shifted = mean over every kind and severity; relative drop = (clean - shifted) / clean.",
             "", "| method | clean acc % | shifted acc % | relative drop % | h cosine dist. | h JSD (nats) | z cosine dist. | z JSD (nats) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, rows in summary.items():
        z = (f"{fmt(over_kinds(rows, 'cosine'), 1, 4)} | {fmt(over_kinds(rows, 'jsd'), 1, 3)}"
             if method != "baseline" else "– | –")
        lines.append(f"| {LABELS[method]} | {fmt([r['clean'] for r in rows])} | {fmt([r['shifted'] for r in rows])} | "
                     f"{fmt([r['relative_drop'] for r in rows])} | {fmt(over_kinds(rows, 'h_cosine'), 1, 4)} | "
                     f"{fmt(over_kinds(rows, 'h_jsd'), 1, 3)} | {z} |")
    for title, name, scale, digits in (("Accuracy % under each kind (mean over severities)", "accuracy", 100.0, 1),
                                       ("h cosine distance, clean vs shifted (mean over severities)", "h_cosine", 1.0, 4),
                                       ("h JSD (nats), clean vs shifted (mean over severities)", "h_jsd", 1.0, 3)):
        lines += ["", f"{title}:", "", "| kind | " + " | ".join(LABELS[m] for m in summary) + " |",
                  "|---|" + "---:|" * len(summary)]
        for kind in kinds:
            lines.append(f"| {kind} | " + " | ".join(fmt([r["kinds"][kind][name] for r in rows], scale, digits)
                                                  for rows in summary.values()) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(summary: dict, severities: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("visual", "text") if all(g in r["curves"] for rows in summary.values() for r in rows)]
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 7), squeeze=False)
    for col, group in enumerate(groups):
        for row, (name, label) in enumerate((("accuracy", "accuracy"), ("h_cosine", "h cosine distance to clean"))):
            ax = axes[row][col]
            for method, rows in summary.items():
                curves = [[r["clean"]] + r["curves"][group]["accuracy"] if name == "accuracy"
                          else [0.0] + r["curves"][group][name] for r in rows]
                xs = [0] + list(severities)
                means = [statistics.fmean(c[i] for c in curves) for i in range(len(xs))]
                stds = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in range(len(xs))]
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=LABELS[method])
            ax.set_xlabel("severity (0 = clean)")
            ax.set_ylabel(label)
            ax.set_title(f"{group} shifts (mean over kinds)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results: Path) -> None:
    """Tables and plots from robustness.json (methods with the same seeds as the first one)."""
    saved = json.loads((results / "robustness.json").read_text())
    meta, raw = saved["meta"], saved["raw"]
    first = next(iter(raw.values()))
    done = {m: runs for m, runs in raw.items() if runs.keys() == first.keys()}
    summary = summarize(done, meta["kinds"], meta["severities"])
    saved["summary"] = summary
    (results / "robustness.json").write_text(json.dumps(saved, indent=1))
    write_table(summary, meta["kinds"], results / "robustness.md", meta)
    plot(summary, meta["severities"], results / "robustness.png")


def main(argv: list[str] | None = None) -> None:
    from vittle_fast.data.demo import make_demo_dataset
    from vittle_fast.eval.perturb import KINDS, SEVERITIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--kinds", nargs="+", default=["all"], help=f"'all' or some of {sorted(KINDS)}")
    parser.add_argument("--severities", type=int, nargs="+", default=list(SEVERITIES))
    parser.add_argument("--work", default="outputs/robustness", help="trained models and eval outputs (cache)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where robustness.* go")
    parser.add_argument("--nproc", type=int, default=1,
                        help="training processes per run (the global batch stays the demo's 16)")
    parser.add_argument("--train_args", nargs="*", default=[], help="extra trainer overrides, e.g. max_steps=100")
    parser.add_argument("--report_only", action="store_true",
                        help="only rewrite robustness.md/png from the raw results in robustness.json")
    args = parser.parse_args(argv)
    if args.report_only:
        report(Path(args.results))
        return
    kinds = sorted(KINDS) if args.kinds == ["all"] else args.kinds
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = make_demo_dataset(work / "data", seed=DATA_SEED)
    perturbations = [None] + [f"{k}:{s}" for k in kinds for s in args.severities]
    n_questions = sum(1 for line in Path(data.contrast_questions).read_text().splitlines() if line.strip())
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    raw: dict = {}
    started = time.time()
    for seed in args.seeds:  # seed-major: an interrupted run still has every method at the seeds it finished
        for method in args.methods:
            export = train(method, seed, data, work, args.train_args, args.nproc)
            raw.setdefault(method, {})[str(seed)] = evaluate_all(export, data, work, perturbations)
            print(f"[robustness] {method} seed {seed}: clean accuracy {raw[method][str(seed)]['clean']['accuracy']:.3f} "
                  f"({time.time() - started:.0f} s so far)", flush=True)
            meta = {"seeds": [int(s) for s in raw[args.methods[0]]], "severities": args.severities, "kinds": kinds,
                    "n_questions": n_questions, "train_args": args.train_args, "nproc": args.nproc,
                    "wall_s": round(time.time() - started)}
            (results / "robustness.json").write_text(json.dumps({"meta": meta, "raw": raw}, indent=1))
            report(results)
    print((results / "robustness.md").read_text())


if __name__ == "__main__":
    main()
