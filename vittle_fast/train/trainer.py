"""The training loop, top to bottom: distributed setup -> data -> model -> FSDP -> optimizer ->
resume -> steps (accumulate, clip, guarded update, log, checkpoint) -> export and plot.

Run it as `torchrun --nproc_per_node N -m vittle_fast.train --config configs/demo.yaml`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..data import SKIP_KINDS
from ..models.llava import IGNORE_INDEX, causal_lm_targets
from .build import (
    build_data,
    build_model,
    build_validator,
    check_config,
    current_alpha,
    load_tokenizer,
    resolve_demo_data,
    trainable_parameters,
)
from .checkpoint import (
    CheckpointError,
    export_pretrained,
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    remove_stale_tmp,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig, apply_overrides, parse_args, save_yaml, to_dict
from .lifecycle import ParentWatch, lock_output_dir, signals_as_exceptions
from .metrics import (
    SKIP_FIELDS,
    GpuTelemetry,
    MetricsLogger,
    StepAccumulator,
    StepProfiler,
    TrainingFlops,
    Throughput,
    gpu_peak_flops,
    plot_metrics,
)
from .noise import DeviceScalars, noise_offset, noise_seed
from .parallel import (DistInfo, apply_activation_checkpointing, apply_fsdp, build_mesh, init_distributed,
                       shutdown_distributed)
from .schedules import warmup_cosine_lr_factor

MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "cu_seqlens", "max_seqlen")


def main(argv: list[str] | None = None) -> dict:
    """The command line: a config problem prints one line per problem (rank 0 only, so torchrun's
    ranks do not repeat it) and exits with status 2 before anything is written."""
    try:
        return train(parse_args(argv))
    except ConfigError as err:
        if int(os.environ.get("RANK", 0)) == 0:
            for line in err.errors:
                print(f"[vittle_fast.train] error: {line}", file=sys.stderr, flush=True)
        sys.exit(2)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training job; returns where its outputs went. Collective over all ranks.

    Everything that can be refused is refused first, before any output or process group exists:
    config problems, and a resume that would change the run's schedules. A run already at its
    last step (``max_steps``, or ``stop_at_step``) does nothing.

    Shutdown is the same on every exit path (success, error, SIGTERM/SIGINT): NVML, the metrics
    sinks (TensorBoard and tqdm threads), the DataLoader workers, the output-directory lock, then
    -- after a barrier when the job succeeded, so no rank tears down a connection a peer still
    uses -- the process groups, whose worker threads end before the interpreter does
    (`shutdown_distributed`)."""
    check_config(cfg)
    done = finished_step(cfg)
    if done is not None:
        if int(os.environ.get("RANK", 0)) == 0:
            where = "complete" if done >= cfg.max_steps else f"past stop_at_step={cfg.stop_at_step}"
            print(f"[vittle_fast.train] {cfg.output_dir}: already {where} at step {done}; nothing to do", flush=True)
        return {"output_dir": cfg.output_dir, "complete_at_step": str(done)}
    info = init_distributed()
    mesh = None
    succeeded = False
    try:
        mesh = build_mesh(info, cfg.parallel.replicate)
        with signals_as_exceptions(), contextlib.ExitStack() as cleanup:
            outputs = _train(cfg, info, mesh, cleanup)
        succeeded = True
        return outputs
    finally:
        if succeeded:
            dist.barrier()
        shutdown_distributed(mesh)


# Options that shape the LR and alpha schedules: a resumed run must keep them (or say it changes them).
SCHEDULE_OPTIONS = ("max_steps", "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio", "vittle.enabled",
                    "vittle.alpha_schedule", "vittle.alpha_end", "vittle.alpha_k", "vittle.alpha_t0")


def schedule_options(cfg: TrainConfig) -> dict:
    flat = to_dict(cfg)
    values = {}
    for name in SCHEDULE_OPTIONS:
        value = flat
        for part in name.split("."):
            value = value[part]
        values[name] = value
    return values


def finished_step(cfg: TrainConfig) -> int | None:
    """The checkpoint step when the run in ``output_dir`` is already where this launch would stop,
    else None. Raises a :class:`ConfigError` when resuming would silently change the schedules: both
    span ``max_steps``, so e.g. extending a finished 100-step run to 150 steps drops alpha at step 100
    from 0.500 to 0.438 and lifts the LR from its floor (``--allow_schedule_change`` accepts that)."""
    latest = latest_checkpoint(Path(cfg.output_dir) / "checkpoints") if cfg.checkpoint.resume else None
    if latest is None:
        return None
    try:
        state = read_trainer_state(latest)
    except CheckpointError:
        return None  # a damaged checkpoint: the resume verifies it and falls back
    step, saved = state["step"], state.get("schedule")
    current = schedule_options(cfg)
    changed = {name: (saved[name], current[name]) for name in current
               if saved is not None and name in saved and saved[name] != current[name]}
    if changed and not cfg.allow_schedule_change:
        old_cfg = apply_overrides(cfg, saved)
        diffs = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
        lr_old = warmup_cosine_lr_factor(step, old_cfg.optim.warmup_steps, old_cfg.max_steps,
                                         old_cfg.optim.min_lr_ratio) * old_cfg.optim.lr
        lr_new = warmup_cosine_lr_factor(step, cfg.optim.warmup_steps, cfg.max_steps,
                                         cfg.optim.min_lr_ratio) * cfg.optim.lr
        raise ConfigError([
            f"{cfg.output_dir} holds a run checkpointed at step {step} with other schedule options ({diffs}): "
            f"resuming would recompute the LR and alpha schedules over the new span (at step {step}: alpha "
            f"{current_alpha(old_cfg, step):.3f} -> {current_alpha(cfg, step):.3f}, LR {lr_old:.3g} -> {lr_new:.3g}); "
            "pass --allow_schedule_change to accept that, or use a new output_dir"
        ])
    end_step = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    return step if step >= end_step else None


def _train(cfg: TrainConfig, info: DistInfo, mesh: DeviceMesh, cleanup: contextlib.ExitStack) -> dict:
    cfg = resolve_demo_data(cfg, info.is_main)
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    cleanup.callback(lock_output_dir(out_dir, info.is_main).release)  # one job per output directory
    if info.is_main:
        for stale in remove_stale_tmp(ckpt_root):
            print(f"[vittle_fast.train] removed {stale} (an interrupted save)", flush=True)
        save_yaml(cfg, out_dir / "config.yaml")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (FSDP shards them)

    data = build_data(cfg, info.rank, info.world_size)
    cleanup.callback(data.close)
    model = build_model(cfg, vocab_size=data.vocab_size, image_token_id=data.image_token_id)
    model.validate_inputs = False  # the collator expands <image> itself; the check costs a host sync
    model.fused_cross_entropy = cfg.model.fused_cross_entropy  # the LM head on target tokens only
    flop_count = TrainingFlops(model)
    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing, cfg.parallel.ac_every_k)
    apply_fsdp(model, mesh, cfg.parallel.param_dtype, cfg.parallel.reduce_dtype)
    model.train()

    params = trainable_parameters(model)
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            warmup_cosine_lr_factor,
            warmup_steps=cfg.optim.warmup_steps,
            total_steps=cfg.max_steps,
            min_ratio=cfg.optim.min_lr_ratio,
        ),
    )

    start_step = 0
    started = time.perf_counter()
    resume_from = find_resumable(ckpt_root, cfg.checkpoint.fallback) if cfg.checkpoint.resume else None
    if resume_from is not None:
        verified = time.perf_counter()
        state = load_checkpoint(resume_from, model, optimizer)
        if info.is_main:
            print(f"[vittle_fast.train] resuming from {resume_from}: verified in {verified - started:.2f} s, "
                  f"loaded in {time.perf_counter() - verified:.2f} s", flush=True)
        scheduler.load_state_dict(state["scheduler"])
        data.load_state_dict(state["data"])
        start_step = state["step"]

    logger = MetricsLogger(out_dir, info.is_main, cfg.max_steps, start_step,
                           cfg.logging.progress_bar, cfg.logging.tensorboard)
    cleanup.callback(logger.close)
    acc = StepAccumulator(info.device)
    scalars = DeviceScalars(info.device, info.rank) if cfg.parallel.cuda_graphs else None
    telemetry = GpuTelemetry(info.device)
    cleanup.callback(telemetry.close)
    agent = ParentWatch()
    clock = Throughput()
    peak = gpu_peak_flops(info.device)

    validator = build_validator(cfg, info.rank, info.world_size)
    end_step = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    profiler = StepProfiler(cfg.logging.profile_steps, out_dir, info.rank, info.device)
    for step in range(start_step, end_step):
        agent.check()  # orphaned by a dead torchrun agent: stop before a relaunch trains beside us
        profiler.step_begins(step + 1)
        alpha = current_alpha(cfg, step)
        waited = time.perf_counter()
        micro_batches = [data.next_batch(info.device) for _ in range(cfg.data.grad_accum_steps)]
        acc.add(data_wait_s=time.perf_counter() - waited,
                flops=sum(flop_count.micro_batch(mb, count_targets(mb)) for mb in micro_batches))
        train_step(model, optimizer, params, micro_batches, step, alpha, cfg, info, acc, scalars)
        scheduler.step()
        done = step + 1
        profiler.step_ends(done)

        val = {}
        if validator is not None and (done % cfg.eval.every == 0 or done == end_step):
            val = validator(model, alpha, info.device)
        if done % cfg.logging.log_every == 0 or done == end_step or val:
            totals = acc.reduce_and_reset(info.world_size)
            elapsed = clock.lap()
            tokens_per_s = totals["tokens"] / elapsed
            logger.log({
                "step": done,
                **{name: totals[name] for name in ("loss", "ce", "kl_v", "kl_t")},
                "alpha": alpha,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": totals["grad_norm"],
                "tokens_per_s": tokens_per_s,
                "tflops_per_s": totals["flops"] / elapsed / info.world_size / 1e12,  # per rank
                "mfu": None if peak is None else totals["flops"] / elapsed / (peak * info.world_size),
                "data_wait_ms": 1e3 * totals["data_wait_s"],
                "skipped_steps": totals["skipped_steps"],
                "empty_steps": totals["empty_steps"],
                "skipped_records": totals["skipped_records"],
                **{name: totals[name] for name in SKIP_FIELDS},
                **peak_memory(info.device),
                **telemetry.read(),
                **val,
            })

        interval = cfg.checkpoint.interval
        if (interval and done % interval == 0) or done == end_step:
            save_checkpoint(ckpt_root, done, model, optimizer,
                            {"scheduler": scheduler.state_dict(), "data": data.state_dict(),
                             "schedule": schedule_options(cfg)},
                            cfg.checkpoint.keep_last)
    profiler.finish()
    logger.close()

    outputs = {"output_dir": str(out_dir), "metrics": str(logger.path),
               "checkpoint": str(latest_checkpoint(ckpt_root)), "resumed_from": str(resume_from or "")}
    if cfg.checkpoint.export_safetensors and end_step == cfg.max_steps:
        export_pretrained(model, out_dir / "export", to_dict(cfg))
        if info.is_main:  # the export answers questions on its own (python -m vittle_fast.eval)
            load_tokenizer(cfg).save_pretrained(out_dir / "export")
        outputs["export"] = str(out_dir / "export")
    if info.is_main and cfg.logging.plot and logger.path.is_file():
        outputs["plot"] = str(plot_metrics(logger.path, out_dir / "metrics.png"))
    if info.is_main:
        for name, where in outputs.items():
            print(f"[vittle_fast.train] {name}: {where}", flush=True)
    return outputs


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused kernel (CUDA and CPU): it alone takes `found_inf`, which lets a non-finite step
    be skipped on the device without a host sync. Matrices get weight decay; vectors (norms,
    biases, learnable priors) do not."""
    o = cfg.optim
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)


def count_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Target tokens of a micro-batch, by the model's own rule, known before any forward pass."""
    return (causal_lm_targets(batch["labels"], batch["position_ids"]) != IGNORE_INDEX).sum()


def train_step(model, optimizer, params, micro_batches, step, alpha, cfg: TrainConfig, info: DistInfo,
               acc: StepAccumulator, scalars: DeviceScalars | None = None) -> None:
    """One optimizer step over `micro_batches` (this rank's share of the global batch). `scalars`
    (`parallel.cuda_graphs`): pass alpha/seed/offset to the model as device tensors updated in place.

    Loss normalisation: CE is a sum over target tokens divided by the global target count of the
    step (all-reduced before any backward), times the world size because FSDP averages gradients
    over ranks -- so accumulation and data parallelism give the gradient of the global mean. The
    KL terms are per-micro-batch means, averaged over micro-batches (here) and ranks (by FSDP).
    """
    num_micro = len(micro_batches)
    global_targets = sum(count_targets(mb) for mb in micro_batches).to(torch.float64)
    dist.all_reduce(global_targets)
    ce_scale = info.world_size / global_targets.clamp(min=1.0)

    ce_part = torch.zeros((), dtype=torch.float64, device=info.device)
    vittle_part = torch.zeros_like(ce_part)
    kl_v = torch.zeros_like(ce_part)
    kl_t = torch.zeros_like(ce_part)
    tokens = torch.zeros_like(ce_part)
    for micro, batch in enumerate(micro_batches):
        set_gradient_sync(model, micro == num_micro - 1 or not cfg.parallel.reduce_once_per_step)
        seed = noise_seed(cfg.seed, step, micro)
        noise = (dict(vittle_alpha=alpha, noise_seed=seed, noise_offset=noise_offset(info.rank)) if scalars is None
                 else scalars.set(alpha, seed))
        out = model(**{name: batch[name] for name in MODEL_INPUTS}, **noise)
        loss = out.ce_sum * ce_scale.to(out.ce_sum.dtype) + out.vittle_loss / num_micro
        loss.backward()
        ce_part += out.ce_sum.detach().double() / global_targets
        vittle_part += out.vittle_loss.detach().double() / num_micro
        kl_v += out.kl_v.detach().double() / num_micro
        kl_t += out.kl_t.detach().double() / num_micro
        tokens += batch["attention_mask"].sum()

    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    local_loss = ce_part + vittle_part / info.world_size
    non_finite = (~torch.isfinite(grad_norm) | ~torch.isfinite(local_loss)).float()
    dist.all_reduce(non_finite, op=dist.ReduceOp.MAX)  # every rank skips together
    # An empty step (every record of the global batch was bad: no target anywhere) must not move
    # the weights either: its zero gradient would still apply AdamW's momentum.
    empty = (global_targets == 0).double()  # global_targets is already all-reduced
    optimizer.found_inf = torch.maximum(non_finite, empty.float())  # fused AdamW: 1 = leave untouched
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    skips = sum(batch["n_skipped"] for batch in micro_batches).to(ce_part)
    acc.add_skips(skips)
    acc.add(loss=torch.nan_to_num(local_loss), ce=torch.nan_to_num(ce_part),
            kl_v=kl_v, kl_t=kl_t, grad_norm=torch.nan_to_num(grad_norm.double()), tokens=tokens,
            skipped_records=skips.sum() - skips[SKIP_KINDS.index("truncated")],  # truncated ones were kept
            skipped_steps=non_finite * (1 - empty) / info.world_size, empty_steps=empty / info.world_size,
            steps=1.0 / info.world_size)


def set_gradient_sync(model, sync: bool) -> None:
    """Whether this micro-batch's backward reduce-scatters (and reshards) the gradients. Off for all
    but the last micro-batch of a step: FSDP2 then accumulates unsharded gradients locally and keeps
    the parameters gathered for the next forward, so a step costs one reduction per unit, not one
    per micro-batch."""
    model.set_requires_gradient_sync(sync)
    model.set_reshard_after_backward(sync)


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    return {"max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
