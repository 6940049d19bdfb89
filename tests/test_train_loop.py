"""The training loop end to end on tiny models (gloo, CPU): data-parallel exactness, bitwise
kill-and-resume, a crash in the middle of a checkpoint write, the non-finite-step guard."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.distributed as dist

import vittle_fast.train.checkpoint as checkpoint_module
import vittle_fast.train.trainer as trainer_module
from test_train_fixtures import tiny_args, torchrun
from tolerances import TOL
from vittle_fast.data.collate import varlen_metadata
from vittle_fast.train.config import parse_args
from vittle_fast.train.metrics import read_metrics
from vittle_fast.train.trainer import count_targets, main

def losses(output_dir, key="loss"):
    return {r["step"]: r[key] for r in read_metrics(output_dir / "metrics.jsonl")}


class Interrupt(Exception):
    """Stands in for a kill signal at a chosen point of the run."""


def test_two_process_fsdp_matches_one_process(data_dir, tmp_path):
    """Same global batch (2 samples per step): 2 ranks x 1 sample vs 1 rank x 2 samples.

    alpha_end=0 keeps the bottleneck (and its KL gradients) in the run while removing the noise,
    which by design differs per rank (DESIGN §5). All records have one token structure, so the
    per-micro-batch KL means average to the same global value both ways."""
    common = ["--max_steps", "4", "vittle.alpha_end=0.0", "checkpoint.interval=2"]
    main(tiny_args(data_dir, tmp_path / "one", *common, "data.micro_batch_size=2"))
    result = torchrun(2, tiny_args(data_dir, tmp_path / "two", *common))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(list(two.values())), torch.tensor(list(one.values())),
                               **TOL["fp32_sum"])
    for key in ("kl_v", "kl_t", "grad_norm"):
        torch.testing.assert_close(torch.tensor(list(losses(tmp_path / "two", key).values())),
                                   torch.tensor(list(losses(tmp_path / "one", key).values())),
                                   **TOL["fp32_sum"])
    assert one[4] < one[1]  # it trains

    # Kill-and-resume with 2 ranks: drop the step-4 checkpoint, rerun, steps 3-4 come back bitwise.
    resumed = tmp_path / "two_resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    result = torchrun(2, tiny_args(data_dir, resumed, *common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed_from: " + str(resumed / "checkpoints" / "step_00000002") in result.stdout
    again = losses(resumed)
    assert [again[s] for s in (3, 4)] == [two[s] for s in (3, 4)]

    # bf16 mixed precision (fp32 master weights and reductions) stays close to the fp32 run.
    result = torchrun(2, tiny_args(data_dir, tmp_path / "bf16", *common, "parallel.param_dtype=bfloat16"))
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(list(losses(tmp_path / "bf16").values())),
                               torch.tensor(list(one.values())), **TOL["bf16_training_loss"])


def test_activation_checkpointing_changes_nothing(data_dir, tmp_path):
    """Recomputing blocks in backward (non-reentrant) gives the losses of storing activations."""
    common = ["--max_steps", "3"]
    main(tiny_args(data_dir, tmp_path / "off", *common))
    reference = torch.tensor(list(losses(tmp_path / "off").values()))
    for mode in (["parallel.activation_checkpointing=full"],
                 ["parallel.activation_checkpointing=every_k", "parallel.ac_every_k=2"]):
        main(tiny_args(data_dir, tmp_path / mode[0][-5:], *common, *mode))
        torch.testing.assert_close(torch.tensor(list(losses(tmp_path / mode[0][-5:]).values())), reference,
                                   **TOL["fp32_sum"])


def test_accumulation_equals_one_big_micro_batch(data_dir, tmp_path):
    """One optimizer step over micro-batches [a], [b] == one over [a, b]: same loss, same gradients
    (the CE is normalised by the step's global target count before any backward).

    Gradients, not the updated weights: AdamW's first step moves every weight by ~lr * sign(grad),
    so a near-zero gradient whose reduction-order rounding flips or rescales it (the thread count
    changes that order) moves a weight by up to 2 * lr however close the gradients are."""
    from torch.distributed.tensor import DTensor

    from vittle_fast.train.build import build_data, build_model, trainable_parameters
    from vittle_fast.train.metrics import StepAccumulator
    from vittle_fast.train.parallel import apply_fsdp, build_mesh, init_distributed

    cfg = parse_args(tiny_args(data_dir, tmp_path, "data.micro_batch_size=2"))
    info = init_distributed()
    try:
        data = build_data(cfg, 0, 1)
        both = data.next_batch(torch.device("cpu"))
        halves = []
        for i in range(2):
            half = {k: v[i:i + 1] for k, v in both.items() if isinstance(v, torch.Tensor) and v.ndim == 2}
            half["cu_seqlens"], half["max_seqlen"] = varlen_metadata([[int(half["attention_mask"].sum())]],
                                                                     half["input_ids"].shape[1])
            halves.append({**half, "pixel_values": both["pixel_values"][i:i + 1], "n_skipped": both["n_skipped"]})
        results = []
        for micro_batches in ([both], halves):
            torch.manual_seed(0)
            model = build_model(cfg, data.vocab_size, data.image_token_id)
            apply_fsdp(model, build_mesh(info, 1), "float32", "float32")
            params = trainable_parameters(model)
            optimizer = trainer_module.build_optimizer(params, cfg)
            grads = []
            real_step = optimizer.step

            def record_then_step(*args, **kwargs):
                grads.extend(p.grad.full_tensor().clone() if isinstance(p.grad, DTensor) else p.grad.clone()
                             for p in params)
                return real_step(*args, **kwargs)

            optimizer.step = record_then_step
            acc = StepAccumulator(info.device)
            # alpha 0: no noise (each micro-batch draws its own stream, by design)
            trainer_module.train_step(model, optimizer, params, micro_batches, 5, 0.0, cfg, info, acc)
            results.append((acc.reduce_and_reset(1), grads))
    finally:
        dist.destroy_process_group()
    (one, grads_one), (two, grads_two) = results
    for key in ("loss", "ce", "kl_v", "kl_t", "grad_norm"):
        assert one[key] == pytest.approx(two[key], rel=TOL["fp32_sum"]["rtol"]), key
    assert len(grads_one) == len(grads_two) == len(params) > 0
    for a, b in zip(grads_one, grads_two):
        torch.testing.assert_close(a, b, **TOL["fp32_sum"])


@pytest.mark.parametrize("how", ["crash_after_save", "stop_at_step"])
def test_kill_and_resume_is_bitwise(data_dir, tmp_path, monkeypatch, how):
    """Stopped after step 3 (killed right after its checkpoint, or a planned `stop_at_step` exit),
    then relaunched: steps 4-6 reproduce an uninterrupted run bit for bit (fp32)."""
    main(tiny_args(data_dir, tmp_path / "full", "--max_steps", "6", "checkpoint.interval=3"))
    full = losses(tmp_path / "full")

    killed = tiny_args(data_dir, tmp_path / "killed", "--max_steps", "6", "checkpoint.interval=3")
    if how == "crash_after_save":
        real_save = trainer_module.save_checkpoint

        def save_then_die(root, step, *a, **k):
            path = real_save(root, step, *a, **k)
            if step == 3:
                raise Interrupt
            return path

        monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_die)
        with pytest.raises(Interrupt):
            main(killed)
        monkeypatch.undo()
    else:
        assert "export" not in main(killed + ["stop_at_step=3"])  # exported only at max_steps
    assert sorted(losses(tmp_path / "killed")) == [1, 2, 3]
    outputs = main(killed)
    assert outputs["resumed_from"].endswith("step_00000003")
    resumed = losses(tmp_path / "killed")
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]  # bit for bit


def test_crash_mid_checkpoint_write_resumes_from_previous(data_dir, tmp_path, monkeypatch):
    args = tiny_args(data_dir, tmp_path / "run", "--max_steps", "4", "checkpoint.interval=2")
    real_dcp_save = checkpoint_module.dcp.save

    def write_then_die(state, checkpoint_id):
        real_dcp_save(state, checkpoint_id=checkpoint_id)
        if checkpoint_id.endswith("step_00000004.tmp"):
            raise Interrupt  # shards on disk, commit (rename) never happens

    monkeypatch.setattr(checkpoint_module.dcp, "save", write_then_die)
    with pytest.raises(Interrupt):
        main(args)
    monkeypatch.undo()
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "step_00000004.tmp").is_dir() and not (ckpts / "step_00000004").exists()
    first = losses(tmp_path / "run")
    outputs = main(args)
    assert outputs["resumed_from"].endswith("step_00000002")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]
    assert losses(tmp_path / "run")[4] == first[4]  # step 4 redone identically
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # the replayed steps once each


def test_non_finite_step_is_skipped_without_update(data_dir, tmp_path, monkeypatch):
    """A NaN loss at step 2 leaves the weights untouched and is counted; training continues."""
    real_step = trainer_module.train_step
    calls = []

    def poisoned_step(model, optimizer, params, micro_batches, step, *a, **k):
        if step == 1:
            micro_batches = [{**mb, "pixel_values": torch.full_like(mb["pixel_values"], float("nan"))}
                             for mb in micro_batches]
            before = [p.detach().full_tensor().clone() for p in params]
            real_step(model, optimizer, params, micro_batches, step, *a, **k)
            calls.append(all(torch.equal(b, p.detach().full_tensor()) for b, p in zip(before, params)))
            return
        real_step(model, optimizer, params, micro_batches, step, *a, **k)

    monkeypatch.setattr(trainer_module, "train_step", poisoned_step)
    main(tiny_args(data_dir, tmp_path / "nan", "--max_steps", "3"))
    records = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert calls == [True]
    assert [r["skipped_steps"] for r in records] == [0.0, 1.0, 0.0]
    assert all(map(lambda r: r["loss"] == r["loss"], records))


def test_target_count_matches_the_model(data_dir, tmp_path):
    """The trainer's pre-backward target count equals the model's own n_targets (packed too)."""
    from vittle_fast.train.build import build_data, build_model

    cfg = parse_args(tiny_args(data_dir, tmp_path, "data.packing=true", "data.micro_batch_size=3"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        data = build_data(cfg, 0, 1)
        model = build_model(cfg, data.vocab_size, data.image_token_id)
        batch = data.next_batch(torch.device("cpu"))
        out = model(**{k: batch[k] for k in trainer_module.MODEL_INPUTS})
        assert int(count_targets(batch)) == int(out.n_targets) > 0
    finally:
        dist.destroy_process_group()


def test_config_errors_stop_before_any_output(data_dir, tmp_path, capsys):
    """A model-dependent problem (a layer index past the decoder) and a data problem are both
    reported, one line each, before the output directory exists; exit status 2."""
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as info:
        main(tiny_args(data_dir, out, "vittle.layer_v=2", f"data.image_folder={tmp_path / 'missing'}"))
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"[vittle_fast.train] error: data.image_folder: no such directory {str(tmp_path / 'missing')!r}",
        "[vittle_fast.train] error: vittle.layer_v=2 but the decoder has 2 blocks (indices 0-1)",
    ]
    assert not out.exists()


def test_config_error_under_torchrun_is_one_line_from_rank_0(data_dir, tmp_path):
    out = tmp_path / "never"
    result = torchrun(2, tiny_args(data_dir, out, "vittle.layer_t=5"))
    message = "[vittle_fast.train] error: vittle.layer_t=5 but the decoder has 2 blocks (indices 0-1)"
    assert result.stderr.count(message) == 1, result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr  # the workers' status; torchrun itself exits 1
    assert "vittle_fast/train" not in result.stderr.replace(message, "")  # no traceback of ours
    assert not out.exists()


def test_finished_run_does_nothing_and_extending_it_is_refused(data_dir, tmp_path, capsys):
    args = tiny_args(data_dir, tmp_path / "run", "--max_steps", "2", "checkpoint.export_safetensors=true")
    main(args)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    capsys.readouterr()

    assert main(args)["complete_at_step"] == "2"
    assert f"{tmp_path / 'run'}: already complete at step 2; nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()} == files

    with pytest.raises(SystemExit) as info:  # 2 -> 3 steps would recompute both schedules
        main(args[:-1] + ["--max_steps", "3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "max_steps 2 -> 3" in err and "alpha 0.500 -> 0.375" in err and "--allow_schedule_change" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()} == files

    main(args[:-1] + ["--max_steps", "3", "--allow_schedule_change"])
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]


def test_export_stores_the_final_training_alpha(data_dir, tmp_path):
    """The exported model's default alpha is where the (sigmoid) schedule ends: end / (1 + exp(-k (1 - t0)))."""
    from vittle_fast.models import llava_from_hf

    main(tiny_args(data_dir, tmp_path, "--max_steps", "1", "checkpoint.export_safetensors=true",
                   "vittle.alpha_schedule=sigmoid", "vittle.alpha_end=0.4", "vittle.alpha_k=4.0"))
    expected = 0.4 / (1 + math.exp(-4.0 * (1 - 0.5)))
    assert llava_from_hf(tmp_path / "export").bottleneck.config.alpha == pytest.approx(expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_device_scalars_train_bitwise_like_python_scalars(data_dir, tmp_path, dtype):
    """parallel.cuda_graphs: alpha/seed/offset reach the bottleneck as 0-dim device tensors (filled in
    place per micro-batch) -- same losses, KLs and gradient norms bit for bit (bf16: FSDP must not
    cast the float32 alpha tensor to the compute dtype)."""
    common = ["--max_steps", "3", "data.grad_accum_steps=2", "vittle.alpha_end=0.9", "vittle.backend=auto",
              f"parallel.param_dtype={dtype}"]
    main(tiny_args(data_dir, tmp_path / "python", *common))
    main(tiny_args(data_dir, tmp_path / "tensor", *common, "parallel.cuda_graphs=true"))
    for key in ("loss", "kl_v", "kl_t", "grad_norm"):
        assert losses(tmp_path / "tensor", key) == losses(tmp_path / "python", key), key
