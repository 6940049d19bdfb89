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


def test_grouped_unit_finishes_its_forward_at_the_bottleneck(monkeypatch):
    """The bottleneck runs through its module call inside its block's FSDP unit: the unit's post-forward
    (reshard, pre-backward hooks) runs once, at the bottleneck -- not a second time forced by the root's
    post-forward, which also hooks the root's outputs (what calling ``forward_both`` directly did)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    from vittle_fast.train.parallel import apply_fsdp, build_mesh, init_distributed

    calls = []
    real_post_forward = FSDPParamGroup.post_forward

    def counting_post_forward(self, module, *args):
        calls.append((self, module))
        return real_post_forward(self, module, *args)

    monkeypatch.setattr(FSDPParamGroup, "post_forward", counting_post_forward)
    info = init_distributed()
    try:
        torch.manual_seed(0)
        model = tiny_llava(1, 1)
        apply_fsdp(model, build_mesh(info, 1), "float32", "float32")
        input_ids = torch.tensor([[1] + [31] * 4 + [5, 6, 7, 8]])
        labels = input_ids.masked_fill(input_ids == 31, -100)
        out = model(input_ids, labels=labels, pixel_values=torch.randn(1, 3, 16, 16), vittle_alpha=0.5)
        (out.ce_sum + out.vittle_loss).backward()
    finally:
        dist.destroy_process_group()
    host_group = model.bottleneck._get_fsdp_state()._fsdp_param_group
    assert [module for group, module in calls if group is host_group] == [model.bottleneck]
    assert all(module is not None for _, module in calls)  # no unit completed by the root on its behalf
    assert model.bottleneck.mlp_v[0].weight.grad is not None
