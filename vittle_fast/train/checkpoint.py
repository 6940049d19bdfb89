"""Checkpoints: sharded training state with torch.distributed.checkpoint (DCP), atomic and
verified commits, keep-last-k, resume from the newest checkpoint that verifies (falling back to an
older one), safe loading, and a consolidated Hugging Face-layout export.

Layout of `OUTPUT_DIR/checkpoints/step_00000120/`:
    .metadata, __*_*.distcp   DCP shards of {"model": ..., "optim": {"state": ...}}: tensors only
    trainer.json              step, LR-scheduler, sampler and optimizer param-group state (JSON)
    rng_rank{r}.json          each rank's torch RNG states (JSON)
    manifest.json             size and SHA-256 of every other file; written last (the commit mark)
A save is written to `step_00000120.tmp`, every file is fsynced, then the directory is renamed and
its parent fsynced, so a run killed (or a machine losing power) mid-save leaves the previous
checkpoint as the newest complete one.

Trust model (docs/training.md): loading never unpickles. `.metadata` (a pickle written by DCP) is
read with an allow-listing unpickler that builds only DCP's metadata classes; shards are read as
tensors (`torch.load(weights_only=True)` inside DCP); pickled byte entries are refused; everything
else is JSON. A checkpoint directory that fails these rules raises `CheckpointError` naming the file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import pathlib
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from vittle_fast.models import LlavaVittle, save_pretrained

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 20  # files are hashed as a stream of 1 MiB reads, never held in memory


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt or unsafe to load; the message names the file."""


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Committed-looking checkpoint directories under `root`, oldest first (`.tmp` and `.corrupt`
    leftovers are ignored; whether a directory is complete is for `verify_checkpoint` to say)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint directory holding a manifest (not verified: see `find_resumable`)."""
    found = [p for p in checkpoint_dirs(root) if (p / MANIFEST).is_file()]
    return found[-1] if found else None


def remove_stale_tmp(root: Path) -> list[Path]:
    """Delete `step_*.tmp` directories left by interrupted saves (call with the output lock held)."""
    stale = sorted(root.glob("step_*.tmp")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


# ---------------------------------------------------------------------------------------------
# Durable writes and the manifest.


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable: {error}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in names}


def _gather_union(local: Any) -> list:
    """All ranks' lists concatenated, in rank order (collective)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in part]


def _check_files(directory: Path, names: list[str], expected: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    for name in names:
        path, want = directory / name, expected[name]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if size != want["size"]:
            problems.append(f"{path}: {size} bytes, the manifest says {want['size']} (truncated or rewritten)")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"{path}: SHA-256 differs from the manifest (corrupted)")
    return problems


def verify_checkpoint(path: Path) -> list[str]:
    """Collective: the problems of checkpoint `path` (empty = it verifies). Every rank hashes a
    share of the files (a streamed read), so the cost is split over the ranks."""
    manifest_path = path / MANIFEST
    try:
        manifest = _read_json(manifest_path)
        files = manifest["files"]
        names = sorted(files)
        if not all(isinstance(files[n].get("size"), int) and isinstance(files[n].get("sha256"), str) for n in names):
            raise CheckpointError(f"{manifest_path}: entries must hold size and sha256")
    except CheckpointError as error:
        local = [str(error)] if dist.get_rank() == 0 else []
        return _gather_union(local)
    except (KeyError, TypeError, AttributeError):
        local = [f"{manifest_path}: not a checkpoint manifest"] if dist.get_rank() == 0 else []
        return _gather_union(local)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = _check_files(path, names[rank::world], files)
    if rank == 0:
        local += [f"{path / name}: not in the manifest" for name in sorted(
            p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in files)]
    return _gather_union(local)


def find_resumable(root: Path, fallback: bool) -> Path | None:
    """Collective: the newest checkpoint under `root` that verifies, or None when there is none.

    A checkpoint that fails is reported (each problem names its file) and moved aside to
    `step_X.corrupt` by rank 0, and the previous one is tried (`fallback=True`); with
    `fallback=False` the first failure raises `CheckpointError`."""
    for candidate in reversed(checkpoint_dirs(root)):
        problems = verify_checkpoint(candidate)
        if not problems:
            return candidate
        report = "; ".join(problems)
        if not fallback:
            raise CheckpointError(f"checkpoint {candidate} does not verify: {report} "
                                  "(checkpoint.fallback=false; set it true to resume from the previous one)")
        if dist.get_rank() == 0:
            aside = candidate.with_name(candidate.name + ".corrupt")
            shutil.rmtree(aside, ignore_errors=True)
            candidate.rename(aside)
            logger.warning("checkpoint %s does not verify: %s; moved it to %s and trying the previous one",
                           candidate, report, aside)
        dist.barrier()
    return None


# ---------------------------------------------------------------------------------------------
# Safe loading: no pickle runs.


# The classes a DCP `.metadata` pickle is made of (torch 2.9-2.14); anything else is refused.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata classes, `torch.Size`, dtypes and paths; refuses every other
    global (which is how a pickle runs code) with an error naming the file."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise CheckpointError(f"{self.path}: refusing to unpickle {module}.{name}: not a DCP metadata "
                                  "class (a crafted or foreign checkpoint; see the trust model in docs/training.md)")
        if module == "pathlib":
            return getattr(pathlib, name)
        return super().find_class(module, name)


class _SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose `.metadata` is read with the allow-listing unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f, path).load()
        except CheckpointError:
            raise
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except Exception as error:  # noqa: BLE001 -- truncated or garbage pickle
            raise CheckpointError(f"{path}: unreadable DCP metadata: {type(error).__name__}: {error}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(path: Path) -> Metadata:
    """The DCP metadata of checkpoint `path`, read safely; refuses pickled byte entries (our
    checkpoints hold only tensors in DCP, so one means a crafted or foreign checkpoint)."""
    metadata = _SafeReader(str(path)).read_metadata()
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            info = next((v for k, v in metadata.storage_data.items() if k.fqn == fqn), None)
            where = path / info.relative_path if info is not None else path / ".metadata"
            raise CheckpointError(f"{where}: entry {fqn!r} is pickled bytes; refusing to unpickle it "
                                  "(only tensors are loaded from DCP shards)")
    return metadata


# ---------------------------------------------------------------------------------------------
# Save and load.


def _rng_state() -> dict[str, str]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return {name: base64.b64encode(state.numpy().tobytes()).decode() for name, state in states.items()}


def _set_rng_state(encoded: dict[str, str], path: Path) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    try:
        torch.set_rng_state(decode(encoded["cpu"]))
        if "cuda" in encoded and torch.cuda.is_available():
            torch.cuda.set_rng_state(decode(encoded["cuda"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not an RNG state: {error}") from None


def _tensor_state(model_sd: dict, optim_sd: dict) -> dict[str, Any]:
    """What goes into DCP: the model and the optimizer's per-parameter state, tensors only (the
    param groups -- lr, betas, ... -- go to trainer.json)."""
    state = {"model": model_sd, "optim": {"state": optim_sd["state"]}}

    def check(value, name):
        if isinstance(value, dict):
            for key, item in value.items():
                check(item, f"{name}.{key}")
        elif not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint entry {name} is a {type(value).__name__}, not a tensor: "
                            "non-tensor state belongs in trainer.json")

    check(state, "state")
    return state


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
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from an earlier interrupted save
        tmp.mkdir(parents=True)
        _write_json(tmp / "trainer.json", {"step": step, "optim_param_groups": optim_sd["param_groups"],
                                           **trainer_state})
    dist.barrier()
    dcp.save(_tensor_state(model_sd, optim_sd), checkpoint_id=str(tmp))  # fsyncs its files
    _write_json(tmp / f"rng_rank{rank}.json", _rng_state())
    dist.barrier()  # every shard and RNG file is on disk before the manifest
    names = sorted(p.name for p in tmp.iterdir())
    files = dict(_gather_union(list(_describe(tmp, names[rank::dist.get_world_size()]).items())))
    if rank == 0:
        _write_json(tmp / MANIFEST, {"format": 1, "files": files})
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    """`trainer.json` of checkpoint `path` (step, scheduler, sampler, optimizer param groups)."""
    state = _read_json(path / "trainer.json")
    if not isinstance(state, dict) or not {"step", "optim_param_groups"} <= state.keys():
        raise CheckpointError(f"{path / 'trainer.json'}: needs 'step' and 'optim_param_groups' "
                              "(a checkpoint from an older vittle_fast, or not ours)")
    return state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective. Restores model, optimizer and this rank's RNG; returns the trainer state.
    Nothing is unpickled (see the trust model above); problems raise `CheckpointError`."""
    trainer_state = read_trainer_state(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = _tensor_state(model_sd, optim_sd)
    read_metadata(path)  # raises on anything unsafe before DCP reads a byte
    dcp.load(state, storage_reader=_SafeReader(str(path)))
    optim_sd = {"state": state["optim"]["state"], "param_groups": trainer_state.pop("optim_param_groups")}
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_sd)
    rng_file = path / f"rng_rank{dist.get_rank()}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: RNG then stays seeded
        _set_rng_state(_read_json(rng_file), rng_file)
    return trainer_state


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
