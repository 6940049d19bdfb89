"""Bad records in the trainer's metrics (issue 13 item 7): one `skipped_<kind>` field per kind,
and a step whose records are all bad is an empty step that leaves the weights alone."""
from __future__ import annotations

import json

import pytest
import torch

import vittle_fast.train.trainer as trainer_module
from test_train_fixtures import make_uniform_dataset, tiny_args
from vittle_fast.data import SKIP_KINDS, LlavaCollator, Skipped
from vittle_fast.train.metrics import read_metrics
from vittle_fast.train.trainer import main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """4 good records, 3 with a missing image, 2 whose reply holds a lone surrogate."""
    directory = tmp_path_factory.mktemp("skips_data")
    path = make_uniform_dataset(directory, num_records=4)
    records = json.loads(path.read_text())
    missing = [{**records[i], "id": f"missing{i}", "image": f"absent_{i}.png"} for i in range(3)]
    surrogate = [{**records[i], "id": f"sur{i}", "conversations": [
        records[i]["conversations"][0], {"from": "gpt", "value": "red \ud800"}]} for i in range(2)]
    path.write_text(json.dumps(records + missing + surrogate))
    return directory


def test_each_kind_is_counted_and_all_bad_steps_are_empty(data_dir, tmp_path):
    """One record per step over one epoch (9 steps): every bad record is counted under its kind,
    and its step is an empty step, not a non-finite one."""
    main(tiny_args(data_dir, tmp_path / "run", "--max_steps", "9"))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    total = {key: sum(r[key] for r in records) for key in records[0] if key.startswith(("skipped", "empty"))}
    expected = {f"skipped_{kind}": 0 for kind in SKIP_KINDS}
    expected.update(skipped_missing_image=3, skipped_bad_text=2, skipped_records=5, skipped_steps=0, empty_steps=5)
    assert total == expected


def test_empty_step_leaves_weights_and_moments_untouched(tmp_path, monkeypatch):
    """Before: the zero gradient of an all-bad step still moved the weights (AdamW momentum)."""
    real_step = trainer_module.train_step
    unchanged = []

    def emptied_step(model, optimizer, params, micro_batches, step, *a, **k):
        if step != 1:
            return real_step(model, optimizer, params, micro_batches, step, *a, **k)
        collate = LlavaCollator(pad_token_id=0, image_token_id=4, image_size=16)
        micro_batches = [collate([Skipped(0, "malformed", ""), Skipped(1, "bad_text", "")])]
        before = [p.detach().full_tensor().clone() for p in params]
        real_step(model, optimizer, params, micro_batches, step, *a, **k)
        unchanged.append(all(torch.equal(b, p.detach().full_tensor()) for b, p in zip(before, params)))

    monkeypatch.setattr(trainer_module, "train_step", emptied_step)
    make_uniform_dataset(tmp_path / "data", num_records=4)  # no bad records: only step 1 is empty
    main(tiny_args(tmp_path / "data", tmp_path / "run", "--max_steps", "3"))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert unchanged == [True]
    assert [r["empty_steps"] for r in records] == [0.0, 1.0, 0.0]
    assert [r["skipped_steps"] for r in records] == [0.0, 0.0, 0.0]
    assert (records[1]["skipped_malformed"], records[1]["skipped_bad_text"]) == (1.0, 1.0)
