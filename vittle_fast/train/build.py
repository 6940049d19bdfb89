"""Turn the config into the two things the loop needs: a model and a stream of batches."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from vittle_fast.data import LengthGroupedSampler, LlavaCollator, LlavaDataset
from vittle_fast.data.demo import make_demo_dataset
from vittle_fast.models import LlavaVittle, clip_from_hf, llava_from_hf, text_model_from_hf
from vittle_fast.nn import VittleConfig

from .config import ConfigError, TrainConfig, apply_overrides, vittle_config_of
from .schedules import vittle_alpha


def vittle_config(cfg: TrainConfig, num_layers: int) -> VittleConfig | None:
    """`vittle_fast.nn.VittleConfig` from the config section, or None for the baseline."""
    v = cfg.vittle
    if not v.enabled:
        return None
    default_layer = (num_layers * 3) // 4  # layer 24 of 32: the top 25% of the decoder
    return vittle_config_of(v, layer_v=default_layer if v.layer_v < 0 else v.layer_v,
                            layer_t=default_layer if v.layer_t < 0 else v.layer_t,
                            alpha=current_alpha(cfg, cfg.max_steps))  # where training ends: the export's default


def current_alpha(cfg: TrainConfig, step: int) -> float:
    """The alpha schedule of the config at ``step`` (0 for the baseline)."""
    if not cfg.vittle.enabled:
        return 0.0
    v = cfg.vittle
    return vittle_alpha(step, cfg.max_steps, kind=v.alpha_schedule, end=v.alpha_end, k=v.alpha_k, t0=v.alpha_t0)


def check_config(cfg: TrainConfig) -> None:
    """Every check that can run before anything is written or a process group exists: the config's
    own cross-field checks plus those needing the model's dimensions (read from ``config.json`` files,
    no weights) and the input files. Raises a :class:`ConfigError` listing all problems."""
    found = cfg.errors()
    m, d = cfg.model, cfg.data
    paths = {"data.data_path": (d.data_path, "file")} if not d.demo else {}
    if d.image_folder:
        paths["data.image_folder"] = (d.image_folder, "dir")
    if d.tokenizer:
        paths["data.tokenizer"] = (d.tokenizer, "dir")
    if m.source == "hf_llava":
        paths["model.path"] = (m.path, "model")
    if m.source == "hf_parts" or m.vision_path:
        paths["model.vision_path"] = (m.vision_path, "model")
    if m.source == "hf_parts":
        paths["model.llm_path"] = (m.llm_path, "model")
    for name, (value, kind) in paths.items():
        path = Path(value)
        if not value:
            continue  # already reported as required by cfg.errors()
        if kind == "file" and not path.is_file():
            found.append(f"{name}: no such file {value!r}")
        elif kind != "file" and not path.is_dir():
            found.append(f"{name}: no such directory {value!r}")
        elif kind == "model" and not (path / "config.json").is_file():
            found.append(f"{name}: {value!r} has no config.json")
    if m.source == "tiny":
        depth = m.num_layers
        for heads, width, what in ((m.num_heads, m.hidden_size, "model.hidden_size"),
                                   (m.vision_heads, m.vision_hidden_size, "model.vision_hidden_size")):
            if heads < 1 or width % heads:
                found.append(f"{what}={width} must be a multiple of its heads ({heads})")
        if m.num_kv_heads < 1 or m.num_heads % m.num_kv_heads:
            found.append(f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}")
        if m.patch_size < 1 or m.image_size % m.patch_size:
            found.append(f"model.image_size={m.image_size} must be a multiple of model.patch_size={m.patch_size}")
    else:
        llm_dir = m.path if m.source == "hf_llava" else m.llm_path
        config_json = Path(llm_dir) / "config.json"
        depth = _decoder_depth(Path(llm_dir)) if llm_dir and config_json.is_file() else None
    if cfg.vittle.enabled and depth is not None:
        for name in ("layer_v", "layer_t"):
            layer = getattr(cfg.vittle, name)
            if layer >= depth:
                found.append(f"vittle.{name}={layer} but the decoder has {depth} blocks (indices 0-{depth - 1})")
    if found:
        raise ConfigError(found)


def build_model(cfg: TrainConfig, vocab_size: int, image_token_id: int) -> LlavaVittle:
    """LlavaVittle with the stage's trainable set: stage 1 the projector only; stage 2 everything
    except the vision tower. Built on the CPU with the run seed (identical on every rank)."""
    m = cfg.model
    if m.source == "tiny":
        text_config = transformers.LlamaConfig(
            vocab_size=m.vocab_size or vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            num_key_value_heads=m.num_kv_heads,
            max_position_embeddings=m.max_position_embeddings,
            tie_word_embeddings=False,
        )
        vision_config = transformers.CLIPVisionConfig(
            hidden_size=m.vision_hidden_size,
            intermediate_size=m.vision_intermediate_size,
            num_hidden_layers=m.vision_layers,
            num_attention_heads=m.vision_heads,
            image_size=m.image_size,
            patch_size=m.patch_size,
        )
        model = LlavaVittle(
            text_config, vision_config, image_token_id,
            vittle=vittle_config(cfg, m.num_layers), vision_feature_layer=m.vision_feature_layer,
        )
    elif m.source == "hf_llava":
        depth = _decoder_depth(Path(m.path))
        # baseline (vittle.enabled=false): False = no bottleneck, even if the checkpoint has one
        model = llava_from_hf(m.path, vittle=vittle_config(cfg, depth) or False, vision_path=m.vision_path or None,
                              image_token_id=image_token_id)
    else:  # hf_parts: pretrained LLM (any registered family) + CLIP, fresh projector: LLaVA stage 1's start
        llm, vision = text_model_from_hf(m.llm_path), clip_from_hf(m.vision_path)
        model = LlavaVittle.from_parts(llm, vision, image_token_id, vittle_config(cfg, llm.config.num_hidden_layers),
                                       m.vision_feature_layer)
    set_trainable(model, m.stage)
    return model


def _decoder_depth(path: Path) -> int:
    raw = json.loads((path / "config.json").read_text())
    return raw.get("text_config", raw)["num_hidden_layers"]


def set_trainable(model: torch.nn.Module, stage: int) -> None:
    model.requires_grad_(stage == 2)
    model.vision_tower.requires_grad_(False)
    model.projector.requires_grad_(True)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def vision_geometry(cfg: TrainConfig) -> tuple[int, int]:
    """(image_size, patch_size) of the vision tower the config will build, without building it."""
    m = cfg.model
    if m.source == "tiny":
        return m.image_size, m.patch_size
    raw = json.loads((Path(m.vision_path or m.path) / "config.json").read_text())
    vision = raw.get("vision_config", raw)  # llava-hf and full CLIP configs nest it
    return vision["image_size"], vision["patch_size"]


def load_tokenizer(cfg: TrainConfig):
    tokenizer_dir = cfg.data.tokenizer or (cfg.model.path if cfg.model.source == "hf_llava" else cfg.model.llm_path)
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@dataclass
class BatchStream:
    """This rank's micro-batches, epoch after epoch, resumable at the exact micro-batch.

    The sampler knows the position; the stream tells it after each consumed micro-batch (the
    DataLoader prefetches, so the sampler cannot infer consumption itself).
    """

    loader: torch.utils.data.DataLoader
    sampler: LengthGroupedSampler
    vocab_size: int
    image_token_id: int

    def __post_init__(self):
        self._iterator = None

    def next_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        while True:
            if self._iterator is None:
                self._iterator = iter(self.loader)
            batch = next(self._iterator, None)
            if batch is not None:
                break
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self._iterator = None
        self.sampler.advance()
        non_blocking = device.type == "cuda"
        return {name: value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
                for name, value in batch.items()}  # max_seqlen stays a host int

    def close(self) -> None:
        """Stop the DataLoader's worker processes now rather than at garbage collection."""
        iterator, self._iterator = self._iterator, None
        if hasattr(iterator, "_shutdown_workers"):  # only multi-process iterators have workers
            iterator._shutdown_workers()

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
        self._iterator = None


def resolve_demo_data(cfg: TrainConfig, is_main: bool) -> TrainConfig:
    """With `data.demo`, make the synthetic demo set once (rank 0; reused when present) and point
    the data paths at it. Collective."""
    if not cfg.data.demo:
        return cfg
    if is_main:
        make_demo_dataset(cfg.data.demo_dir, n_train=cfg.data.demo_num_samples, seed=cfg.seed)
    dist.barrier()
    paths = make_demo_dataset(cfg.data.demo_dir, n_train=cfg.data.demo_num_samples, seed=cfg.seed)
    return apply_overrides(cfg, {"data.data_path": str(paths.train_json),
                                 "data.image_folder": str(paths.image_folder),
                                 "data.tokenizer": str(paths.tokenizer_dir),
                                 "eval.data_path": cfg.eval.data_path or str(paths.val_json)})


def data_workers(requested: int) -> int:
    """`data.num_workers`, with -1 resolved: on CUDA up to 4 workers per rank from the CPU cores left
    beside one per GPU process (decoding and collating then overlap the GPU step); on CPU none --
    measured on a 2-core machine, workers raised the per-step data wait instead of hiding it
    (docs/training.md, "Performance")."""
    if requested >= 0:
        return requested
    if not torch.cuda.is_available():
        return 0
    cpus_per_rank = len(os.sched_getaffinity(0)) // max(torch.cuda.device_count(), 1)
    return max(0, min(4, cpus_per_rank - 1))


def build_data(cfg: TrainConfig, rank: int, world_size: int) -> BatchStream:
    """Dataset -> length-grouped modality-aware sampler -> collator -> DataLoader for this rank."""
    tokenizer = load_tokenizer(cfg)
    image_size, patch_size = vision_geometry(cfg)
    d = cfg.data
    dataset = LlavaDataset(d.data_path, tokenizer, image_folder=d.image_folder or None, template=d.template,
                           image_size=image_size, patch_size=patch_size, max_length=d.max_length,
                           image_token_id=None if d.image_token_id < 0 else d.image_token_id, strict=d.strict,
                           truncation=d.truncation, max_image_pixels=d.max_image_pixels)
    if len(dataset) == 0:
        raise ValueError(f"data.data_path {d.data_path!r} holds no records")
    sampler = LengthGroupedSampler(dataset.lengths, dataset.is_multimodal, batch_size=d.micro_batch_size,
                                   num_replicas=world_size, rank=rank, seed=cfg.seed,
                                   mega_batch_mult=d.mega_batch_mult)
    workers = data_workers(d.num_workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=d.micro_batch_size, sampler=sampler,
        collate_fn=LlavaCollator.from_dataset(dataset, pack=d.packing),
        num_workers=workers, pin_memory=torch.cuda.is_available(),  # pinned: async host->device copies
        prefetch_factor=d.prefetch_factor if workers else None, persistent_workers=workers > 0,
    )
    return BatchStream(loader, sampler, vocab_size=len(tokenizer), image_token_id=dataset.image_token_id)


def build_validator(cfg: TrainConfig, rank: int, world_size: int):
    """The `eval.every` validation pass, or None when it is off."""
    if not cfg.eval.every:
        return None
    from vittle_fast.eval.validation import Validator

    image_size, patch_size = vision_geometry(cfg)
    d = cfg.data
    return Validator(cfg.eval.data_path, load_tokenizer(cfg), image_folder=cfg.eval.image_folder or d.image_folder or None,
                     template=d.template, image_size=image_size, patch_size=patch_size, max_length=d.max_length,
                     max_samples=cfg.eval.max_samples, batch_size=d.micro_batch_size, rank=rank, world_size=world_size)
