"""Checkpoints cannot run code and corruption never trains on silently (issue 13 items 2 and 3).

Unit tests (default tier) check the allow-listing unpickler and the manifest check on hand-made
files; the fault-injection tests (slow) train a tiny model, damage or craft its checkpoint, resume,
and require either a clean refusal naming the file (with no code run) or a fallback to the previous
checkpoint that finishes bit for bit like an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from test_train_fixtures import make_uniform_dataset, tiny_args
from vittle_fast.train.checkpoint import (
    MANIFEST,
    CheckpointError,
    find_resumable,
    read_metadata,
    verify_checkpoint,
)
from vittle_fast.train.metrics import read_metrics
from vittle_fast.train.trainer import main


class CreatesFile:
    """A pickle payload: unpickling it opens (creates) `path` -- proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def rewrite_manifest(directory):
    """What an attacker (or a careless copy) can do: a manifest that matches the files."""
    files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in directory.iterdir() if p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "files": files}))


def test_metadata_unpickler_refuses_foreign_globals(tmp_path, world_of_one):
    directory = tmp_path / "step_00000001"
    directory.mkdir()
    marker = tmp_path / "pwned"
    (directory / ".metadata").write_bytes(pickle.dumps(CreatesFile(marker)))
    with pytest.raises(CheckpointError, match=rf"{directory / '.metadata'}: refusing to unpickle io.open"):
        read_metadata(directory)
    assert not marker.exists()
    (directory / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match=rf"{directory / '.metadata'}: unreadable DCP metadata"):
        read_metadata(directory)


def test_byte_entries_are_refused_before_any_read(tmp_path, world_of_one):
    marker = tmp_path / "pwned"
    dcp.save({"model": {"w": torch.ones(2), "evil": CreatesFile(marker)}}, checkpoint_id=str(tmp_path / "c"))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: entry 'model.evil' is pickled bytes"):
        read_metadata(tmp_path / "c")
    assert not marker.exists()


def test_manifest_check_names_each_damaged_file(tmp_path, world_of_one):
    directory = tmp_path / "step_00000002"
    directory.mkdir()
    for name in ("a.distcp", "b.distcp", "trainer.json", "rng_rank0.json"):
        (directory / name).write_bytes(name.encode() * 100)
    rewrite_manifest(directory)
    assert verify_checkpoint(directory) == []
    data = bytearray((directory / "a.distcp").read_bytes())
    data[17] ^= 0x04  # one flipped bit
    (directory / "a.distcp").write_bytes(bytes(data))
    (directory / "b.distcp").write_bytes(b"short")
    (directory / "trainer.json").write_bytes(b"")
    (directory / "rng_rank0.json").unlink()
    (directory / "extra").write_text("x")
    problems = verify_checkpoint(directory)
    assert problems == [
        f"{directory / 'a.distcp'}: SHA-256 differs from the manifest (corrupted)",
        f"{directory / 'b.distcp'}: 5 bytes, the manifest says 800 (truncated or rewritten)",
        f"{directory / 'rng_rank0.json'}: missing",
        f"{directory / 'trainer.json'}: 0 bytes, the manifest says 1200 (truncated or rewritten)",
        f"{directory / 'extra'}: not in the manifest",
    ]
    (directory / MANIFEST).write_text("{")
    assert verify_checkpoint(directory) == [f"{directory / MANIFEST}:1:2: invalid JSON: "
                                            "Expecting property name enclosed in double quotes"]
    with pytest.raises(CheckpointError, match="fallback=false"):
        find_resumable(tmp_path, fallback=False)
    assert find_resumable(tmp_path, fallback=True) is None
    assert (tmp_path / "step_00000002.corrupt").is_dir() and not directory.exists()


# --------------------------------------------------------------------------- fault injection (slow)

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 2, 4 and 6, and its metrics."""
    root = tmp_path_factory.mktemp("ckpt_faults")
    make_uniform_dataset(root / "data")
    args = tiny_args(root / "data", root / "run", "--max_steps", "6", "checkpoint.interval=2",
                     "checkpoint.keep_last=3")
    main(args)
    return root, args, read_metrics(root / "run" / "metrics.jsonl")


def interrupted_copy(trained, tmp_path):
    """The run as if killed during step 6: its newest checkpoint is step 4."""
    root, args, records = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    return run, [a.replace(str(root / "run"), str(run)) for a in args], records


def flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated_shard": lambda d: (d / "__0_0.distcp").write_bytes((d / "__0_0.distcp").read_bytes()[:-100]),
    "flipped_bit": lambda d: flip_bit(d / "__0_0.distcp"),
    "empty_trainer_json": lambda d: (d / "trainer.json").write_bytes(b""),
    "missing_rng_file": lambda d: (d / "rng_rank0.json").unlink(),
    "missing_manifest": lambda d: (d / MANIFEST).unlink(),
    "flipped_bit_in_metadata": lambda d: flip_bit(d / ".metadata"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_falls_back_and_finishes_bit_exact(trained, tmp_path, damage, caplog):
    run, args, records = interrupted_copy(trained, tmp_path)
    newest = run / "checkpoints" / "step_00000004"
    DAMAGE[damage](newest)
    with pytest.raises(CheckpointError, match=str(newest)):
        main(args + ["checkpoint.fallback=false"])
    with caplog.at_level("WARNING", logger="vittle_fast.train.checkpoint"):
        outputs = main(args)
    assert outputs["resumed_from"].endswith("step_00000002")
    assert str(newest) in caplog.text and "does not verify" in caplog.text
    relaunched = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in relaunched] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in relaunched] == [r["loss"] for r in records]  # steps 3-6 redone bit for bit
    assert (run / "checkpoints" / "step_00000004.corrupt").is_dir()


@pytest.mark.slow
def test_crafted_metadata_runs_no_code_on_resume(trained, tmp_path):
    run, args, _ = interrupted_copy(trained, tmp_path)
    newest = run / "checkpoints" / "step_00000004"
    marker = tmp_path / "pwned"
    (newest / ".metadata").write_bytes(pickle.dumps(CreatesFile(marker)))
    rewrite_manifest(newest)  # verification passes: the manifest is no signature
    with pytest.raises(CheckpointError, match=rf"{newest / '.metadata'}: refusing to unpickle io.open"):
        main(args)
    assert not marker.exists()


@pytest.mark.slow
def test_crafted_byte_entry_runs_no_code_on_resume(trained, tmp_path):
    """The newest checkpoint rewritten with one model tensor replaced by a pickle payload."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run, args, _ = interrupted_copy(trained, tmp_path)
    newest = run / "checkpoints" / "step_00000004"
    marker = tmp_path / "pwned"
    dcp_to_torch_save(newest, tmp_path / "full.pt")
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    name = sorted(state["model"])[0]
    state["model"][name] = CreatesFile(marker)
    for path in newest.glob("*.distcp"):
        path.unlink()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        dcp.save(state, checkpoint_id=str(newest))
    finally:
        dist.destroy_process_group()
    rewrite_manifest(newest)
    with pytest.raises(CheckpointError, match=rf"{newest}/__0_0.distcp: entry 'model.{name}' is pickled bytes"):
        main(args)
    assert not marker.exists()
