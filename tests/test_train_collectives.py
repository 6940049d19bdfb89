"""FSDP2 communication per optimizer step (2 gloo ranks, counted by tests/collective_counter.py):
one gradient reduce-scatter per trainable unit per step whatever the accumulation, and the
bottleneck sharing the unit of the block it follows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from test_train_fixtures import make_uniform_dataset, tiny_args
from vittle_fast.models import LlavaVittle
from vittle_fast.nn import VittleConfig
from vittle_fast.train.parallel import bottleneck_host

COUNTER = Path(__file__).with_name("collective_counter.py")
NUM_LAYERS = 2  # tiny_args: model.num_layers=2


def counted_run(tmp_path: Path, name: str, *extra: str) -> list[dict[str, int]]:
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        make_uniform_dataset(data_dir)
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(COUNTER),
           str(out), *tiny_args(data_dir, tmp_path / name, "--max_steps", "2", "data.grad_accum_steps=2",
                                "checkpoint.interval=0", *extra)]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_one_gradient_reduction_per_unit_per_step(tmp_path):
    """Trainable units: the blocks (the bottleneck inside block 0's), the projector, the root.
    2 micro-batches per step: 1 reduce-scatter per unit, not 2 (reducing per micro-batch doubles it)."""
    once = counted_run(tmp_path, "once")
    assert [step["reduce_scatter"] for step in once] == [NUM_LAYERS + 2] * 2
    every = counted_run(tmp_path, "every", "parallel.reduce_once_per_step=false")
    assert [step["reduce_scatter"] for step in every] == [2 * (NUM_LAYERS + 2)] * 2
    assert once[1]["all_gather"] < every[1]["all_gather"]  # gathered parameters are kept between micro-batches


def tiny_llava(layer_v: int, layer_t: int) -> LlavaVittle:
    text = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                    num_attention_heads=2, num_key_value_heads=1)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    return LlavaVittle(text, vision, image_token_id=31, vittle=VittleConfig(layer_v=layer_v, layer_t=layer_t))


@pytest.mark.parametrize("layer_v,layer_t,frozen_decoder,expected", [
    (1, 1, False, 1), (2, 2, False, 2),  # stage 2: the block it follows
    (0, 1, False, None),  # two calls after different blocks: its own unit
    (1, 1, True, None),  # frozen block, trainable bottleneck: never share a unit
])
def test_bottleneck_host(layer_v, layer_t, frozen_decoder, expected):
    model = tiny_llava(layer_v, layer_t)
    if frozen_decoder:
        model.language_model.requires_grad_(False)
    assert bottleneck_host(model) == expected
