"""The training loop end to end on tiny models (gloo, CPU): data-parallel exactness, bitwise
kill-and-resume, a crash in the middle of a checkpoint write, the non-finite-step guard."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist

import vittle_fast.train.checkpoint as checkpoint_module
import vittle_fast.train.trainer as trainer_module
from test_train_fixtures import make_uniform_dataset, tiny_args, torchrun
from tolerances import TOL
from vittle_fast.train.config import parse_args
from vittle_fast.train.metrics import read_metrics
from vittle_fast.train.trainer import count_targets, main

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uniform_data")
    make_uniform_dataset(directory)
    return directory


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
    """One optimizer step over micro-batches [a], [b] == one over [a, b]: same loss, same updated
    weights (the CE is normalised by the step's global target count before any backward)."""
    from torch.distributed.tensor import DTensor

    from vittle_fast.train.build import build_data, build_model, trainable_parameters
    from vittle_fast.train.metrics import StepAccumulator
    from vittle_fast.train.parallel import apply_fsdp, build_mesh, init_distributed

    cfg = parse_args(tiny_args(data_dir, tmp_path, "data.micro_batch_size=2"))
    info = init_distributed()
    try:
        data = build_data(cfg, 0, 1)
        both = data.next_batch(torch.device("cpu"))
        halves = [{k: v if k == "n_skipped" else v[i:i + 1] for k, v in both.items()} for i in range(2)]
        results = []
        for micro_batches in ([both], halves):
            torch.manual_seed(0)
            model = build_model(cfg, data.vocab_size, data.image_token_id)
            apply_fsdp(model, build_mesh(info, 1), "float32", "float32")
            params = trainable_parameters(model)
            optimizer = trainer_module.build_optimizer(params, cfg)
            acc = StepAccumulator(info.device)
            # alpha 0: no noise (each micro-batch draws its own stream, by design)
            trainer_module.train_step(model, optimizer, params, micro_batches, 5, 0.0, cfg, info, acc)
            totals = acc.reduce_and_reset(1)
            results.append((totals, [p.full_tensor() if isinstance(p, DTensor) else p for p in params]))
    finally:
        dist.destroy_process_group()
    (one, params_one), (two, params_two) = results
    for key in ("loss", "ce", "kl_v", "kl_t", "grad_norm"):
        assert one[key] == pytest.approx(two[key], rel=TOL["fp32_sum"]["rtol"]), key
    for a, b in zip(params_one, params_two):
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
