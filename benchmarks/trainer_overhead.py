"""Vittle's overhead inside our trainer, against its FLOP share, on CPU (issue 10 §2).

The trainer's own step (``vittle_fast.train.trainer.train_step``: FSDP2 model, world size 1, gloo,
fused AdamW, the configured loss path) runs for two models built from one config, ``vittle.enabled``
true and false, same init seed, fed the same micro-batches. Steps alternate in interleaved pairs
(the order flips every round, after warm-up rounds); the overhead is the median over rounds of
t_on / t_off - 1, with its interquartile range, so drifts of a shared machine cancel. The FLOP share
is ``TrainingFlops`` (the MFU numerator) of the Vittle model over the baseline's on the same
batches, minus 1: the floor any implementation of the bottleneck pays.

    python -m benchmarks.trainer_overhead --scale demo [--rounds 20] [--json out.json] [key=value ...]

``--free-op`` replaces the fused bottleneck op by a stand-in that costs almost nothing (rows unchanged,
KL zero, every MLP weight still in the graph): the overhead left is what surrounds the op
(FSDP hooks, row lists, KL masks and means, loss terms, optimizer), so two runs split the total.

Scales: ``demo`` = configs/demo.yaml (d = 64); ``d512`` = d 512, 4 blocks, vocab 32,000, 2 x 704
tokens per step (676 image tokens per sample). Extra ``key=value`` overrides apply to both models.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from benchmarks.step_overhead import quartiles
from benchmarks.results_io import command_line, write_json
from vittle_fast.nn import bottleneck as bottleneck_module
from vittle_fast.train.build import build_data, build_model, resolve_demo_data, trainable_parameters
from vittle_fast.train.config import apply_overrides, load_yaml
from vittle_fast.train.metrics import StepAccumulator, TrainingFlops
from vittle_fast.train.parallel import apply_fsdp, build_mesh, init_distributed
from vittle_fast.train.trainer import build_optimizer, count_targets, train_step

SCALES = {
    "demo": {},
    "d512": {"model.hidden_size": 512, "model.intermediate_size": 1376, "model.num_layers": 4,
             "model.num_heads": 8, "model.num_kv_heads": 8, "model.vocab_size": 32000,
             "model.image_size": 208, "model.patch_size": 8, "model.max_position_embeddings": 1024,
             "data.max_length": 1024, "data.micro_batch_size": 2, "data.demo_num_samples": 64},
}


def _free_op(h, order, group_sizes, weights, alpha, **_):
    """Stand-in for ``vib_bottleneck_grouped``: ``(h, zero KL)``, with every weight in the graph (a zero
    term) so FSDP and the optimizer see the same parameters and gradients as with the real op."""
    zero = sum(w.sum() for group in weights for w in group) * 0.0
    return h + zero, torch.zeros(order.numel(), device=h.device) + zero


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="demo")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: less exposed to a shared machine)")
    parser.add_argument("--json", default="")
    parser.add_argument("--free-op", action="store_true", help="a near-free stand-in for the fused op (see doc)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for both models")
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.overrides)
    extra = {k: json.loads(v) if v[:1] in "[{0123456789-" or v in ("true", "false") else v for k, v in extra.items()}

    torch.set_num_threads(args.threads)
    if args.free_op:
        bottleneck_module.vib_bottleneck_grouped = _free_op
    cfg = load_yaml("configs/demo.yaml")
    cfg = apply_overrides(cfg, {**SCALES[args.scale], **extra, "data.demo_dir": os.path.join(
        tempfile.gettempdir(), f"vittle_bench_demo_{args.scale}")})
    info = init_distributed()
    cfg = resolve_demo_data(cfg, True)
    data = build_data(cfg, 0, 1)
    runs = {}
    for enabled in (True, False):
        run_cfg = apply_overrides(cfg, {"vittle.enabled": enabled})
        torch.manual_seed(run_cfg.seed)
        model = build_model(run_cfg, vocab_size=data.vocab_size, image_token_id=data.image_token_id)
        model.validate_inputs = False
        model.fused_cross_entropy = run_cfg.model.fused_cross_entropy
        flops = TrainingFlops(model)
        apply_fsdp(model, build_mesh(info, 1), run_cfg.parallel.param_dtype, run_cfg.parallel.reduce_dtype)
        model.train()
        params = trainable_parameters(model)
        runs[enabled] = dict(cfg=run_cfg, model=model, params=params, optimizer=build_optimizer(params, run_cfg),
                             acc=StepAccumulator(info.device), flops=flops, times=[], flop_sum=0.0)

    ratios, tokens = [], []
    for r in range(args.warmup + args.rounds):
        micro_batches = [data.next_batch(info.device) for _ in range(cfg.data.grad_accum_steps)]
        tokens.append(sum(int(mb["attention_mask"].sum()) for mb in micro_batches))
        order = (True, False) if r % 2 == 0 else (False, True)
        for enabled in order:
            run = runs[enabled]
            start = time.perf_counter()
            train_step(run["model"], run["optimizer"], run["params"], micro_batches, r, 0.5, run["cfg"], info,
                       run["acc"])
            elapsed = time.perf_counter() - start
            if r >= args.warmup:
                run["times"].append(elapsed)
                run["flop_sum"] += float(sum(run["flops"].micro_batch(mb, count_targets(mb)) for mb in micro_batches))
        if r >= args.warmup:
            ratios.append(runs[True]["times"][-1] / runs[False]["times"][-1])
    dist.destroy_process_group()

    q1, median, q3 = quartiles(ratios)
    flop_share = runs[True]["flop_sum"] / runs[False]["flop_sum"] - 1
    result = {
        "scale": args.scale, "rounds": args.rounds, "free_op": args.free_op, "overrides": extra,
        "threads": torch.get_num_threads(),
        "d": cfg.model.hidden_size, "tokens_per_step": statistics.median(tokens),
        "step_s_vittle": statistics.median(runs[True]["times"]), "step_s_baseline": statistics.median(runs[False]["times"]),
        "overhead": median - 1, "overhead_iqr": [q1 - 1, q3 - 1], "flop_share": flop_share,
        "command": command_line("benchmarks.trainer_overhead", argv),
    }
    print(f"{args.scale}: baseline step {result['step_s_baseline'] * 1e3:.0f} ms, Vittle step "
          f"{result['step_s_vittle'] * 1e3:.0f} ms; overhead {100 * result['overhead']:+.1f}% "
          f"[IQR {100 * result['overhead_iqr'][0]:+.1f}, {100 * result['overhead_iqr'][1]:+.1f}] over {args.rounds} "
          f"interleaved pairs; FLOP share {100 * flop_share:+.1f}%; overhead - FLOP share = "
          f"{100 * (result['overhead'] - flop_share):+.1f} points", flush=True)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
