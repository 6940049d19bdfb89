"""The text-model families our slim decoder implements: the one place a family is registered.

A family (torchtitan's ``TrainSpec`` idea, reduced to what we need) names its ``transformers`` config
class, how a config becomes our decoder's settings, our decoder block class, the checkpoint key mapping
and the HF classes and chat template that go with it. ``LlavaVittle``, ``models/hf.py`` (loading,
saving) and ``train/build.py`` (random tiny models, ``hf_parts``) look the family up by the config's
``model_type``; adding a family is one entry in :data:`FAMILIES` (docs/models.md, "Adding a model family").
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import transformers

from .llama import DecoderLayer, Llama, LlamaSettings


@dataclass(frozen=True)
class ModelFamily:
    name: str  # the HF ``model_type``
    config_class: type  # transformers config class
    settings: Callable[[object], LlamaSettings]  # config -> our decoder's settings (validates the config)
    block_class: type  # our decoder block (the FSDP / activation-checkpointing unit)
    hf_prefixes: dict[str, str | None]  # checkpoint key prefix -> our prefix (``*ForCausalLM`` layout)
    hf_classes: tuple[str, ...]  # the HF causal-LM class(es); the first is written into saved configs
    chat_template: str  # our data template for its instruction data: "vicuna_v1" | "chat_template"


def _qwen2_settings(config) -> LlamaSettings:
    """Qwen2 = Llama with bias on q/k/v only (o_proj and the MLP have none), full attention only."""
    if getattr(config, "use_sliding_window", False):
        raise ValueError("Qwen2 configs with use_sliding_window=True are not supported (full attention only)")
    return LlamaSettings.from_hf(config, qkv_bias=True)


_CAUSAL_LM_PREFIXES = {"model.": "", "lm_head.": "lm_head."}

FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily("llama", transformers.LlamaConfig, LlamaSettings.from_hf, DecoderLayer, _CAUSAL_LM_PREFIXES,
                         ("LlamaForCausalLM",), "vicuna_v1"),
    "qwen2": ModelFamily("qwen2", transformers.Qwen2Config, _qwen2_settings, DecoderLayer, _CAUSAL_LM_PREFIXES,
                         ("Qwen2ForCausalLM",), "chat_template"),
}


def family_of(config_or_model_type) -> ModelFamily:
    """The family of a transformers config (or a ``model_type`` string)."""
    model_type = config_or_model_type if isinstance(config_or_model_type, str) else getattr(
        config_or_model_type, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"text model_type {model_type!r} is not a registered family: {sorted(FAMILIES)} "
                         "(vittle_fast/models/families.py)")
    return FAMILIES[model_type]


def text_config_from_dict(raw: dict):
    """A transformers config of the family named by ``raw["model_type"]`` (a ``config.json``)."""
    return family_of(raw.get("model_type", "llama")).config_class.from_dict(raw)


def build_text_model(config) -> Llama:
    """Our decoder for a config of any registered family: the one constructor every path uses."""
    return Llama(config, family_of(config).settings(config))
