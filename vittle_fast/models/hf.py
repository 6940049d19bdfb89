"""Load Hugging Face checkpoints from local directories into our modules, and save them back.

Supported layouts (safetensors only -- a single ``model.safetensors`` or a sharded
``model.safetensors.index.json``; pickled ``.bin`` files are refused, they can run code):
the causal LMs of every registered family (``families.py``: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``);
``CLIPVisionModel`` / ``CLIPModel`` (vision half); llava-hf
``LlavaForConditionalGeneration`` (both the hub's and transformers >= 4.52's key names); the released
Vittle code's ``vittle_llama`` checkpoints. The key tables below are the whole mapping (also in
docs/models.md).

Leading singleton dims are dropped on load (the released priors are stored as [1, 1, d]); otherwise
shapes must match exactly. Keys the model does not have raise (``strict=True``) or warn; weights the
model needs but the checkpoint lacks always raise -- except the whole bottleneck, which is freshly
initialised when a checkpoint without one is loaded with ``vittle=VittleConfig(...)``.

Models are built on the meta device and materialised by the load, so a 7B model is not randomly
initialised first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Literal

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vittle_fast.nn.bottleneck import VittleConfig

from .clip import CLIPVisionTower
from .families import build_text_model, family_of, text_config_from_dict
from .llama import Llama
from .llava import LlavaVittle

# (checkpoint prefix, our prefix); the longest matching prefix wins. `None` = ignored on purpose.
# A text model's mapping is its family's (families.py).
CLIP_PREFIXES = {
    "vision_model.": "", "embeddings.": "embeddings.", "pre_layrnorm.": "pre_layrnorm.",
    "encoder.": "encoder.", "post_layernorm.": "post_layernorm.",
    "text_model.": None, "text_projection.": None, "visual_projection.": None, "logit_scale": None,
}
LLAVA_PREFIXES = {
    "language_model.model.": "language_model.",
    "language_model.lm_head.": "language_model.lm_head.",
    "model.language_model.": "language_model.",
    "lm_head.": "language_model.lm_head.",
    "vision_tower.": "vision_tower.",
    "vision_tower.vision_model.": "vision_tower.",
    "model.vision_tower.": "vision_tower.",
    "model.vision_tower.vision_model.": "vision_tower.",
    "multi_modal_projector.": "projector.",
    "model.multi_modal_projector.": "projector.",
    "bottleneck.": "bottleneck.",
    "vittle_bottleneck.": "bottleneck.",  # a stock HF LLaVA saved after integrations.transformers.apply_vittle
}
RELEASED_VITTLE_PREFIXES = {
    "model.": "language_model.",
    "lm_head.": "language_model.lm_head.",
    "model.vision_tower.vision_tower.vision_model.": "vision_tower.",
    "model.mm_projector.0.": "projector.linear_1.",
    "model.mm_projector.2.": "projector.linear_2.",
    "model.bottleneck_layer_v.": "bottleneck.mlp_v.",
    "model.bottleneck_layer_t.": "bottleneck.mlp_t.",
    "model.learnable_prior.mean_v": "bottleneck.prior_mu_v",
    "model.learnable_prior.logsigma_sq_v": "bottleneck.prior_logvar_v",
    "model.learnable_prior.mean_t": "bottleneck.prior_mu_t",
    "model.learnable_prior.logsigma_sq_t": "bottleneck.prior_logvar_t",
}
# The released code's IMAGE_TOKEN_INDEX: a placeholder id outside the vocabulary.
RELEASED_IMAGE_TOKEN_ID = -200
SHARD_BYTES = 5 * 2**30


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"path {str(path)!r} has no config.json")
    return json.loads(config_file.read_text())


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"path {str(path)!r} has no model.safetensors or model.safetensors.index.json "
        "(pickled .bin checkpoints are not loaded: convert them to safetensors first)"
    )


def _rename(key: str, prefixes: dict[str, str | None]) -> str | None:
    """Our name for a checkpoint key (None: ignored); raises KeyError when no prefix matches."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        if key.startswith(prefix):
            target = prefixes[prefix]
            return None if target is None else target + key[len(prefix):]
    raise KeyError(key)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build_empty(factory, dtype: torch.dtype) -> nn.Module:
    """Build on the meta device (no random init), in ``dtype``; materialise later with ``to_empty``."""
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    with torch.device("meta"), _default_dtype(dtype):
        return factory()


def load_checkpoint(model: nn.Module, path: str | Path, prefixes: dict[str, str | None], *,
                    device: torch.device | str = "cpu", strict: bool = True,
                    optional_prefixes: tuple[str, ...] = ()) -> nn.Module:
    """Copy a checkpoint directory's tensors into ``model`` (on the meta device or materialised).

    Missing weights raise, naming them; a group under one of ``optional_prefixes`` may be absent as a
    whole (it is then initialised with its module's ``reset_parameters``). Unknown keys raise when
    ``strict`` (else warn). Shape mismatches raise, naming the key and both shapes.
    """
    path = Path(path)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)  # fresh storage: recompute buffers, re-tie shared weights
        for module in model.modules():
            for hook in ("reset_buffers", "tie_weights"):
                if hasattr(module, hook):
                    getattr(module, hook)()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded, unknown = set(), []
    for weight_file in _weight_files(path):
        with safe_open(str(weight_file), framework="pt") as reader:
            for key in reader.keys():
                try:
                    name = _rename(key, prefixes)
                except KeyError:
                    name = key  # reported below as unknown
                if name is None:
                    continue
                if name not in params:
                    unknown.append(key)
                    continue
                param = params[name]
                shape = tuple(reader.get_slice(key).get_shape())
                fitted = _squeeze_leading(shape, tuple(param.shape))
                if fitted is None:
                    raise ValueError(f"checkpoint {key!r} has shape {shape} but the model's {name!r} is "
                                     f"{tuple(param.shape)}: the config does not match the checkpoint")
                with torch.no_grad():
                    param.copy_(reader.get_tensor(key).reshape(param.shape))
                loaded.add(name)
    _report(model, loaded, unknown, strict, optional_prefixes, path)
    return model


def _squeeze_leading(shape: tuple, target: tuple) -> tuple | None:
    while len(shape) > len(target) and shape[0] == 1:
        shape = shape[1:]
    return shape if shape == target else None


def _report(model, loaded, unknown, strict, optional_prefixes, path) -> None:
    required = set(dict(model.named_parameters()))  # tied weights count once
    missing = required - loaded
    for prefix in optional_prefixes:
        group = {name for name in required if name.startswith(prefix)}
        if group and not group & loaded:  # absent as a whole: fresh init
            missing -= group
            module = model.get_submodule(prefix.rstrip("."))
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    if missing:
        names = sorted(missing)
        raise ValueError(f"checkpoint {str(path)!r} is missing {len(names)} weight(s) the model needs: "
                         f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    if unknown:
        message = (f"checkpoint {str(path)!r} has {len(unknown)} key(s) the model does not use: "
                   f"{', '.join(sorted(unknown)[:20])}{' ...' if len(unknown) > 20 else ''}")
        if strict:
            raise ValueError(message + " (pass strict=False to ignore them)")
        warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------
def text_model_from_hf(path: str | Path, dtype: torch.dtype = torch.float32, *, device: torch.device | str = "cpu",
                       strict: bool = True) -> Llama:
    """Our decoder from a local causal-LM directory of a registered family (``LlamaForCausalLM``:
    Llama-2/3, Vicuna; ``Qwen2ForCausalLM``), picked by its ``model_type``."""
    config = text_config_from_dict(_read_config(Path(path)))
    model = _build_empty(lambda: build_text_model(config), dtype)
    return load_checkpoint(model, path, family_of(config).hf_prefixes, device=device, strict=strict)


llama_from_hf = text_model_from_hf  # the name from before Qwen2: loads every registered family


def _clip_vision_config(raw: dict):
    if raw.get("model_type") == "clip":
        return transformers.CLIPConfig.from_dict(raw).vision_config
    return transformers.CLIPVisionConfig.from_dict(raw)


def clip_from_hf(path: str | Path, dtype: torch.dtype = torch.float32, *, device: torch.device | str = "cpu",
                 strict: bool = True) -> CLIPVisionTower:
    """Our :class:`CLIPVisionTower` from a local ``CLIPVisionModel`` or ``CLIPModel`` directory."""
    config = _clip_vision_config(_read_config(Path(path)))
    model = _build_empty(lambda: CLIPVisionTower(config), dtype)
    return load_checkpoint(model, path, CLIP_PREFIXES, device=device, strict=strict)


def _released_vittle_config(raw: dict, num_layers: int) -> VittleConfig:
    """The released trainer's settings: ``bottleneck_layeridx_*="layer-24"`` (no index: last layer),
    ``ib_strength_*`` betas, ``learnable_prior_flag`` "L"/"F"; its KL is ``kl_form="released"``."""
    def layer(field: str) -> int:
        parts = str(raw.get(field, "")).split("-")
        return int(parts[1]) if len(parts) > 1 else num_layers - 1

    return VittleConfig(
        layer_v=layer("bottleneck_layeridx_v"), layer_t=layer("bottleneck_layeridx_t"),
        beta_v=float(raw.get("ib_strength_v", 0.1)), beta_t=float(raw.get("ib_strength_t", 0.1)),
        prior="learnable" if raw.get("learnable_prior_flag") == "L" else "fixed", kl_form="released",
    )


def llava_from_hf(path: str | Path, dtype: torch.dtype = torch.float32, *, device: torch.device | str = "cpu",
                  vittle: VittleConfig | None | Literal[False] = None, vision_path: str | Path | None = None,
                  image_token_id: int | None = None, strict: bool = True) -> LlavaVittle:
    """Our :class:`LlavaVittle` from a local llava-hf (``LlavaForConditionalGeneration``) directory,
    one saved by :func:`save_pretrained`, or a released Vittle checkpoint (``vittle_llama``).

    ``vittle``: the bottleneck to insert. None keeps what the checkpoint has (its saved/released Vittle
    settings, or no bottleneck); a ``VittleConfig`` overrides them, and the bottleneck is freshly
    initialised when the checkpoint has none; ``False``: no bottleneck (a checkpoint's is not loaded). Released checkpoints name their CLIP tower but do not
    describe it: pass ``vision_path``, a local CLIP directory (its weights are used when the checkpoint
    has no vision tower). ``image_token_id`` defaults to the config's (released: -200).
    """
    path = Path(path)
    raw = _read_config(path)
    if raw.get("model_type") == "llava":
        config = transformers.LlavaConfig.from_dict(raw)
        if config.vision_feature_select_strategy != "default" or config.projector_hidden_act != "gelu":
            raise ValueError("only LLaVA-1.5 checkpoints are supported: vision_feature_select_strategy='default', "
                             f"projector_hidden_act='gelu'; got {config.vision_feature_select_strategy!r}, "
                             f"{config.projector_hidden_act!r}")
        text_config, vision_config = config.text_config, config.vision_config
        feature_layer, token_id, prefixes = config.vision_feature_layer, config.image_token_index, LLAVA_PREFIXES
        checkpoint_vittle = VittleConfig(**raw["vittle"]) if raw.get("vittle") else None
    elif raw.get("model_type") in ("vittle_llama", "llava_llama"):
        if vision_path is None:
            raise ValueError(f"{str(path)!r} is a released LLaVA/Vittle checkpoint, which names its vision tower "
                             f"({raw.get('mm_vision_tower')!r}) without describing it: pass vision_path=<local CLIP dir>")
        if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ValueError(f"mm_projector_type must be 'mlp2x_gelu', got {raw['mm_projector_type']!r}")
        text_config = transformers.LlamaConfig.from_dict({**raw, "model_type": "llama"})  # released: a Llama
        vision_config = _clip_vision_config(_read_config(Path(vision_path)))
        feature_layer, token_id = raw.get("mm_vision_select_layer", -2), RELEASED_IMAGE_TOKEN_ID
        prefixes = RELEASED_VITTLE_PREFIXES
        if raw.get("model_type") == "vittle_llama":
            checkpoint_vittle = _released_vittle_config(raw, text_config.num_hidden_layers)
        else:
            checkpoint_vittle = None
    else:
        raise ValueError(f"{str(path)!r}: model_type must be 'llava', 'vittle_llama' or 'llava_llama', "
                         f"got {raw.get('model_type')!r}")

    vittle = None if vittle is False else (vittle if vittle is not None else checkpoint_vittle)
    if vittle is None and prefixes is LLAVA_PREFIXES:  # a checkpoint's bottleneck, if any, is skipped
        prefixes = {**prefixes, "bottleneck.": None, "vittle_bottleneck.": None}
    token_id = token_id if image_token_id is None else image_token_id
    model = _build_empty(lambda: LlavaVittle(text_config, vision_config, token_id, vittle, feature_layer), dtype)
    if prefixes is RELEASED_VITTLE_PREFIXES:
        prefixes = {**prefixes, **released_unused_prefixes(vittle)}
    vision_separate = vision_path is not None and not _has_prefix(path, "model.vision_tower.")
    optional = ("bottleneck.", "vision_tower.") if vision_separate else ("bottleneck.",)
    load_checkpoint(model, path, prefixes, device=device, strict=strict, optional_prefixes=optional)
    if vision_separate:
        load_checkpoint(model.vision_tower, vision_path, CLIP_PREFIXES, device=device, strict=strict)
    return model


def released_unused_prefixes(vittle: VittleConfig | None) -> dict[str, None]:
    """Released keys to skip: the bottleneck when none is wanted; the priors unless learnable
    (the released trainer stores zero priors even for fixed-prior "F" runs)."""
    skipped = ("model.learnable_prior.",)
    if vittle is None:
        skipped += ("model.bottleneck_layer_",)
    elif vittle.prior == "learnable":
        skipped = ()
    return {prefix: None for prefix in RELEASED_VITTLE_PREFIXES if prefix.startswith(skipped)}


def _has_prefix(path: Path, prefix: str) -> bool:
    for weight_file in _weight_files(path):
        with safe_open(str(weight_file), framework="pt") as reader:
            if any(key.startswith(prefix) for key in reader.keys()):
                return True
    return False
# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
# (our prefix, checkpoint prefix) for saving, in the layouts the Hugging Face hub uses.
_SAVE_PREFIXES = {
    Llama: {"": "model.", "lm_head.": "lm_head."},
    CLIPVisionTower: {"": "vision_model."},
    LlavaVittle: {"language_model.": "language_model.model.", "language_model.lm_head.": "language_model.lm_head.",
                  "vision_tower.": "vision_tower.vision_model.", "projector.": "multi_modal_projector.",
                  "bottleneck.": "bottleneck."},
}


def _hf_config(model: nn.Module) -> dict:
    if isinstance(model, Llama):
        return {**model.config.to_dict(), "architectures": [family_of(model.config).hf_classes[0]]}
    if isinstance(model, CLIPVisionTower):
        return {**model.config.to_dict(), "architectures": ["CLIPVisionModel"]}
    config = transformers.LlavaConfig(
        text_config=model.language_model.config, vision_config=model.vision_tower.config,
        image_token_index=model.image_token_id, vision_feature_layer=model.vision_feature_layer,
        image_seq_length=model.num_image_tokens,
    ).to_dict()
    config["architectures"] = ["LlavaForConditionalGeneration"]
    if model.bottleneck is not None:
        config["vittle"] = dataclasses.asdict(model.bottleneck.config)
        config["vittle_note"] = HF_DROPS_BOTTLENECK
    return config


HF_DROPS_BOTTLENECK = (
    "transformers.LlavaForConditionalGeneration.from_pretrained loads everything but the Vittle bottleneck: "
    "it drops the bottleneck.* tensors (reported as UNEXPECTED keys) and this config's 'vittle' entry has no "
    "effect, so the model runs as plain LLaVA. Keep the bottleneck with vittle_fast.models.llava_from_hf(dir), "
    "or with vittle_fast.integrations.transformers.apply_vittle(model, VittleConfig(**config['vittle'])) "
    "after from_pretrained (it reads bottleneck.* from this directory)."
)


def save_pretrained(model: Llama | CLIPVisionTower | LlavaVittle, path: str | Path,
                    max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write ``config.json`` and safetensors weights (sharded above ``max_shard_bytes``) in the Hugging
    Face layout, so ``transformers`` and our ``*_from_hf`` both read them. A Vittle bottleneck is saved
    as ``bottleneck.*`` tensors plus a ``"vittle"`` entry in the config; transformers' LLaVA class drops
    both, which ``config.json`` (``"vittle_note"``) and a ``README.md`` in the directory say."""
    prefixes = _SAVE_PREFIXES.get(type(model))
    if prefixes is None:
        raise TypeError(f"model must be a Llama, CLIPVisionTower or LlavaVittle, got {type(model).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {_rename(name, prefixes): param.detach().to("cpu").contiguous()
               for name, param in model.named_parameters()}  # tied weights once
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(_hf_config(model), indent=2, default=str))
    if getattr(model, "bottleneck", None) is not None:
        (path / "README.md").write_text(f"# LLaVA + Vittle export (vittle_fast)\n\n{HF_DROPS_BOTTLENECK}\n")
