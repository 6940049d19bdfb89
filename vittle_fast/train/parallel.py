"""Distributed setup, one helper per technique: process group, device mesh, activation
checkpointing, FSDP2 wrapping. Called in that order by the trainer (AC before FSDP)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU).

    Without torchrun a single process still gets a real (world size 1) group, so FSDP2, DCP and
    the collectives take the same code path on a laptop as on a cluster.
    """
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(backend, store=_restart_round_store(), rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), device_id=device if use_cuda else None)
        elif "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown_distributed(mesh: DeviceMesh | None) -> None:
    """Destroy the process groups and let their worker threads end while the interpreter is alive.

    `destroy_process_group()` only unregisters the groups: the DeviceMesh keeps them in its registry,
    and DTensor's sharding caches keep the mesh until exit. A gloo worker thread then outlives the
    interpreter; when it frees a finished collective whose tensors belong to Python objects, it needs
    the GIL of a finalising interpreter and the process aborts ("terminate called without an active
    exception", SIGABRT; 1 launch in ~15 under load). Dropping the mesh's registry and collecting the
    model's reference cycles releases the last references here, and ProcessGroupGloo's destructor
    joins its threads (NCCL's watchdog likewise)."""
    dist.destroy_process_group()
    if mesh is not None:
        getattr(mesh, "_pg_registry", {}).clear()  # torch >= 2.9 keeps the groups here
    gc.collect()


def _restart_round_store() -> dist.Store:
    """The torchrun agent's TCPStore, under a key prefix of this restart round.

    The agent keeps one store for the job's life, and `init_process_group("env://")` uses it
    unprefixed: after `--max-restarts` relaunches the workers, gloo reads the dead round's peer
    addresses ("Gloo connectFullMesh failed ... Connection refused"). A per-round namespace makes
    every restart rendezvous afresh."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"vittle_fast/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def build_mesh(info: DistInfo, replicate: int) -> DeviceMesh:
    """1-D ("shard",) mesh for FSDP, or 2-D ("replicate", "shard") for HSDP when replicate > 1.

    HSDP: parameters are sharded within a group of world_size / replicate ranks (a node) and
    replicated across groups, so only gradient all-reduces cross the slower inter-node links.
    """
    if info.world_size % replicate:
        raise ValueError(f"parallel.replicate={replicate} must divide the world size {info.world_size}")
    if replicate == 1:
        return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(
        info.device.type, (replicate, info.world_size // replicate), mesh_dim_names=("replicate", "shard")
    )


def apply_activation_checkpointing(model: torch.nn.Module, mode: str, every_k: int = 1) -> None:
    """Recompute decoder blocks in backward (non-reentrant): all blocks ("full") or every k-th."""
    if mode == "off":
        return
    if mode not in ("full", "every_k"):
        raise ValueError(f"activation checkpointing mode must be off|full|every_k, got {mode!r}")
    if every_k < 1:
        raise ValueError(f"every_k must be >= 1, got {every_k}")
    step = 1 if mode == "full" else every_k
    layers = model.language_model.layers
    for index in range(0, len(layers), step):
        layers[index] = checkpoint_wrapper(layers[index], preserve_rng_state=False)


def apply_fsdp(model: torch.nn.Module, mesh: DeviceMesh, param_dtype: str, reduce_dtype: str) -> None:
    """FSDP2 units: each decoder block, the projector, the frozen vision tower (stored in
    `param_dtype`, never reduced), then the root (embeddings, final norm, LM head). The bottleneck
    joins the unit of the block whose output it transforms (`bottleneck_host`), which saves one
    all-gather/reduce-scatter round per step; when there is no such block it is a unit of its own.
    The layer hook calls the bottleneck through its ``__call__`` (``modality="both"``), so a grouped
    unit completes its forward (reshard, one set of pre-backward hooks) right after the bottleneck.

    Trainable and frozen parameters never share a unit, which FSDP2 requires.
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])
    # The root and the bottleneck's unit leave their float inputs alone: a float32 0-dim alpha tensor
    # (parallel.cuda_graphs) must reach the op as float32, and everything else they get is already in
    # the compute dtype (hidden states) or cast by the unit that uses it (pixel_values: the vision tower).
    keep_inputs = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype],
                                       cast_forward_inputs=False)
    model.vision_tower.to(_DTYPES[param_dtype])  # frozen: keep it in the compute dtype, halve its memory
    fully_shard(model.vision_tower, mesh=mesh, mp_policy=mp_policy)
    host = bottleneck_host(model)
    for index, block in enumerate(model.language_model.layers):
        if index == host:
            fully_shard([block, model.bottleneck], mesh=mesh, mp_policy=keep_inputs)
        else:
            fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model.projector, mesh=mesh, mp_policy=mp_policy)
    if model.bottleneck is not None and host is None:
        fully_shard(model.bottleneck, mesh=mesh, mp_policy=keep_inputs)
    fully_shard(model, mesh=mesh, mp_policy=keep_inputs)


def bottleneck_host(model: torch.nn.Module) -> int | None:
    """Index of the decoder block whose FSDP unit the bottleneck can share, or None.

    That is `layers[l]` when both modalities act after the same block `l` (one bottleneck call,
    right after the block's forward, so one gathered unit serves both) and the block's parameters
    are trainable exactly when the bottleneck's are. A frozen decoder with a trainable bottleneck
    (or different layers per modality) keeps the bottleneck in its own unit.
    """
    if model.bottleneck is None:
        return None
    config = model.bottleneck.config
    if config.layer_v != config.layer_t:
        return None
    block = model.language_model.layers[config.layer_v]
    trainable = {p.requires_grad for p in block.parameters()} | {p.requires_grad for p in model.bottleneck.parameters()}
    return config.layer_v if len(trainable) == 1 else None
