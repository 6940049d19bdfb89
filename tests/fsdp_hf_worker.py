"""torchrun worker for tests/test_integration_transformers.py: a stock HF LLaVA + apply_vittle under FSDP2
``fully_shard`` on gloo. Each step, every rank checks its sharded gradients against an unsharded copy of the
model run on the same rank-local batches (gradients all-reduced and averaged as FSDP does); rank 0 prints
one JSON line per step."""
import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_integration_transformers import hf_llava, llava_batch  # noqa: E402
from tolerances import TOL  # noqa: E402

from vittle_fast.integrations.transformers import apply_vittle, vittle_loss, vittle_step  # noqa: E402
from vittle_fast.nn import VittleConfig  # noqa: E402
from vittle_fast.train.parallel import shutdown_distributed  # noqa: E402


def shard(model, mesh):
    """FSDP2 units as our trainer's (docs/DESIGN.md §5): the frozen vision tower's parts, each decoder block,
    the projector, the bottleneck (the layer hook calls it as a module: FSDP's hooks run), then the root."""
    vision = model.model.vision_tower  # frozen; not sharded as a whole: HF then loses its hidden states
    for part in (vision.embeddings, vision.encoder):
        fully_shard(part, mesh=mesh)
    for block in model.model.language_model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model.model.multi_modal_projector, mesh=mesh)
    fully_shard(model.vittle_bottleneck, mesh=mesh)
    fully_shard(model, mesh=mesh)


def main():
    """The run, then the gloo group's threads joined before exit (as the trainer does)."""
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    try:
        train_and_compare(mesh)
    finally:
        shutdown_distributed(mesh)


def train_and_compare(mesh):
    rank = dist.get_rank()
    torch.manual_seed(0)  # identical initial weights on both ranks
    model = apply_vittle(hf_llava(), VittleConfig(layer_v=1, layer_t=1, prior="learnable"))
    model.model.vision_tower.requires_grad_(False)
    reference = copy.deepcopy(model)  # its hooks are bound to its own copy of the Vittle state
    assert reference.vittle_state is not model.vittle_state
    shard(model, mesh)
    model.train(), reference.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ref_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1 + rank)  # rank-local data
    batches = [llava_batch() for _ in range(2)]
    for step in range(4):
        batch = batches[step % 2]
        losses = []
        for net in (model, reference):
            vittle_step(net, step, 0.1 * step)
            loss = net(**batch).loss + vittle_loss(net)
            loss.backward()
            losses.append(loss.detach())
        for param in reference.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= dist.get_world_size()
        ref_params = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(param.grad.full_tensor(), ref_params[name].grad, **TOL["fp32_sum"],
                                           msg=name)
        optimizer.step(), ref_optimizer.step()
        optimizer.zero_grad(), ref_optimizer.zero_grad()
        torch.testing.assert_close(losses[0], losses[1], **TOL["float32"])
        total = losses[0].clone()
        dist.all_reduce(total)
        if rank == 0:
            print(json.dumps({"step": step, "loss": total.item() / dist.get_world_size()}), flush=True)


if __name__ == "__main__":
    main()
