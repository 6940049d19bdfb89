"""Checkpoints: sharded training state with torch.distributed.checkpoint (DCP), atomic commits,
keep-last-k, resume from the latest complete one, and a consolidated Hugging Face-layout export.

Layout of `OUTPUT_DIR/checkpoints/step_00000120/`:
    .metadata, __*_*.distcp   DCP shards of {"model": ..., "optim": ...} (reshardable)
    trainer.json              step, LR-scheduler and sampler state (rank 0; plain JSON, no pickle)
    rng_rank{r}.json          each rank's torch RNG states
A save is written to `step_00000120.tmp` and renamed only after every rank has finished, so a
run killed mid-save leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from vittle_fast.models import LlavaVittle, save_pretrained

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints under `root`, oldest first (`.tmp` leftovers are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _rng_state() -> dict[str, str]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return {name: base64.b64encode(state.numpy().tobytes()).decode() for name, state in states.items()}


def _set_rng_state(encoded: dict[str, str]) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(encoded["cpu"]))
    if "cuda" in encoded and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(encoded["cuda"]))


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the committed directory."""
    rank = dist.get_rank()
    final = _step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from an earlier interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(_rng_state()))
    dist.barrier()  # every shard and RNG file is on disk before the commit
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective. Restores model, optimizer and this rank's RNG; returns the trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{dist.get_rank()}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: RNG then stays seeded
        _set_rng_state(json.loads(rng_file.read_text()))
    return json.loads((path / "trainer.json").read_text())


def export_pretrained(model: torch.nn.Module, directory: Path, train_config: dict[str, Any]) -> Path | None:
    """Collective. Gathers the full model to rank 0 (CPU) and writes it in the Hugging Face layout
    (`config.json` + safetensors, readable by `vittle_fast.models.llava_from_hf` and transformers)
    plus the training config. Rank 0 rebuilds the architecture on the meta device and adopts the
    gathered tensors, so no second copy of the weights is materialised."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = LlavaVittle(model.language_model.config, model.vision_tower.config, model.image_token_id,
                            vittle=None if model.bottleneck is None else model.bottleneck.config,
                            vision_feature_layer=model.vision_feature_layer)
    plain.load_state_dict(full, assign=True)
    plain.language_model.tie_weights()  # assign=True gave lm_head its own tensor; tied families share one
    save_pretrained(plain, directory)
    with open(directory / "training_config.yaml", "w") as f:
        yaml.safe_dump(train_config, f, sort_keys=False)
    return directory
