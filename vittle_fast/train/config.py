"""Training configuration: dataclasses, YAML files and command-line overrides.

Precedence, lowest first: dataclass defaults < `--config` YAML file < command-line overrides.
Every leaf option has one dotted name (`optim.lr`, `vittle.beta_v`, ...) that works the same in
YAML (nested mappings), as `--optim.lr 1e-4` and as `optim.lr=1e-4`. Values on the command line
are parsed as YAML scalars (`true`, `null`, `1e-4`, `[-2.3, 2.3]`) and then checked against the
field's type, so a typo fails loudly instead of training with a default.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
class ModelSection:
    """Where the model comes from. `source="tiny"` builds a random model from the dims below."""

    source: Literal["tiny", "hf_llava", "hf_parts"] = "tiny"
    path: str = ""  # hf_llava: a local LlavaForConditionalGeneration directory
    llm_path: str = ""  # hf_parts: a local Llama directory ...
    vision_path: str = ""  # ... and a local CLIP vision directory (projector starts random)
    stage: Literal[1, 2] = 2  # 1 = projector alignment (only the projector trains); 2 = +LLM +bottleneck
    vision_feature_layer: int = -2
    # Dimensions of the tiny random model (source="tiny"). vocab_size 0 = the tokenizer's size.
    vocab_size: int = 0
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    vision_hidden_size: int = 48
    vision_intermediate_size: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8


@dataclass
class VittleSection:
    """The bottleneck (DESIGN.md §1). `enabled=false` trains the plain LLaVA baseline."""

    enabled: bool = True
    layer_v: int = -1  # -1: at 75% depth (layer 24 of 32), the paper's default
    layer_t: int = -1
    beta_v: float = 0.1
    beta_t: float = 0.1
    prior: Literal["fixed", "learnable"] = "fixed"
    kl_form: Literal["standard", "released"] = "standard"
    kl_text_tokens: Literal["prompt", "all"] = "prompt"
    logvar_clamp: tuple[float, float] | None = (-2.3025, 2.3025)
    alpha_schedule: Literal["cosine", "sigmoid"] = "cosine"
    alpha_end: float = 0.5
    alpha_k: float = 10.0  # sigmoid steepness
    alpha_t0: float = 0.5  # sigmoid midpoint, as a fraction of training
    backend: str = "auto"


@dataclass
class DataSection:
    """LLaVA-format instruction data, or (`demo=true`) the synthetic demo set, made when missing."""

    data_path: str = ""  # LLaVA JSON; image paths inside are relative to image_folder
    image_folder: str = ""  # "" = the JSON's directory
    tokenizer: str = ""  # "" = the model directory's tokenizer
    demo: bool = False  # true: generate/reuse the demo set in demo_dir and ignore the three paths above
    demo_dir: str = "outputs/demo_data"
    demo_num_samples: int = 1000
    template: Literal["vicuna_v1", "chat_template"] = "vicuna_v1"
    max_length: int = 2048
    micro_batch_size: int = 4  # per rank
    grad_accum_steps: int = 1
    mega_batch_mult: int = 8  # length grouping: sort within groups of this many global batches
    packing: bool = False
    strict: bool = False  # raise on a bad record instead of skipping and counting it
    num_workers: int = 0


@dataclass
class OptimSection:
    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # <= 0 disables clipping (the norm is still measured)


@dataclass
class CheckpointSection:
    interval: int = 500  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    resume: bool = True  # continue from the latest complete checkpoint in output_dir
    export_safetensors: bool = True


@dataclass
class LoggingSection:
    log_every: int = 10
    progress_bar: bool = True
    tensorboard: bool = True  # used only when the tensorboard package is installed
    plot: bool = True


@dataclass
class ParallelSection:
    replicate: int = 1  # > 1: HSDP over a (replicate, shard) device mesh
    param_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    reduce_dtype: Literal["bfloat16", "float32"] = "float32"
    activation_checkpointing: Literal["off", "full", "every_k"] = "off"
    ac_every_k: int = 2


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    max_steps: int = 1000
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    vittle: VittleSection = field(default_factory=VittleSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def validate(self) -> None:
        """Cross-field checks that single-field types cannot express."""
        positive = {
            "max_steps": self.max_steps,
            "data.micro_batch_size": self.data.micro_batch_size,
            "data.grad_accum_steps": self.data.grad_accum_steps,
            "data.max_length": self.data.max_length,
            "data.mega_batch_mult": self.data.mega_batch_mult,
            "logging.log_every": self.logging.log_every,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "parallel.replicate": self.parallel.replicate,
            "parallel.ac_every_k": self.parallel.ac_every_k,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.checkpoint.interval < 0:
            raise ValueError(f"checkpoint.interval must be >= 0, got {self.checkpoint.interval}")
        if not 0.0 <= self.vittle.alpha_end <= 1.0:
            raise ValueError(f"vittle.alpha_end must be in [0, 1], got {self.vittle.alpha_end}")
        if self.model.stage == 1 and self.vittle.enabled:
            raise ValueError("vittle.enabled requires model.stage=2 (stage 1 trains only the projector)")
        if not self.data.demo and not self.data.data_path:
            raise ValueError("data.data_path is required (or data.demo=true for the synthetic demo set)")
        if self.model.source == "hf_llava" and not self.model.path:
            raise ValueError("model.path is required when model.source=hf_llava")
        if self.model.source == "hf_parts" and not (self.model.llm_path and self.model.vision_path):
            raise ValueError("model.llm_path and model.vision_path are required when model.source=hf_parts")
        clamp = self.vittle.logvar_clamp
        if clamp is not None and not clamp[0] < clamp[1]:
            raise ValueError(f"vittle.logvar_clamp must be (lo, hi) with lo < hi, got {clamp}")


# ---------------------------------------------------------------------------------------------
# Flattening the dataclass tree into dotted leaf options.


def _leaf_fields(cls: type, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted name: (type, default)} for every leaf field of a (nested) config dataclass."""
    hints = typing.get_type_hints(cls)
    leaves: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(cls):
        name, hint = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(hint):
            leaves.update(_leaf_fields(hint, name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            leaves[name] = (hint, default)
    return leaves


LEAVES = _leaf_fields(TrainConfig)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check `value` (already YAML-parsed) against the field type `hint`; convert where lossless."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, inner, value)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{name} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(name, a, v) for a, v in zip(args, value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        return "" if value is None else str(value)
    raise TypeError(f"unsupported config type {hint!r} for {name}")


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = prefix + str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a copy of `cfg` with dotted-name `overrides` (YAML-typed values) applied."""
    cfg = copy.deepcopy(cfg)
    for name, value in overrides.items():
        if name not in LEAVES:
            raise ValueError(f"unknown config option {name!r} (see --help for the list)")
        *path, leaf = name.split(".")
        target = cfg
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, _coerce(name, LEAVES[name][0], value))
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    """Plain nested dict (tuples as lists) -- what gets saved as `config.yaml`."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def from_dict(mapping: dict) -> TrainConfig:
    if not isinstance(mapping, dict):
        raise TypeError(f"config must be a mapping, got {type(mapping).__name__}")
    return apply_overrides(TrainConfig(), _flatten(mapping))


def load_yaml(path: str | Path) -> TrainConfig:
    with open(path) as f:
        return from_dict(yaml.safe_load(f) or {})


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Command line.

_EPILOG = """\
Overrides: every option above can be given as `--section.key VALUE` or as a positional
`section.key=VALUE`. Values are YAML scalars: true/false, null, 1e-4, [-2.3, 2.3].
Precedence: defaults < --config YAML < command line. The resolved config is saved to
OUTPUT_DIR/config.yaml.

Examples:
  torchrun --nproc_per_node 2 -m vittle_fast.train --config configs/demo.yaml
  python -m vittle_fast.train --config configs/demo.yaml --max_steps 50 vittle.enabled=false
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vittle_fast.train",
        usage="%(prog)s [--config PATH] [--section.key VALUE ...] [section.key=VALUE ...]",
        description="Fine-tune LLaVA with Vittle on FSDP2 (launch with torchrun for several processes).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="PATH", help="YAML config file (default: none)")
    for name, (hint, default) in LEAVES.items():
        shown = list(default) if isinstance(default, tuple) else default
        parser.add_argument(
            f"--{name}",
            dest=name,
            metavar="VALUE",
            default=argparse.SUPPRESS,
            help=f"{_type_name(hint)} (default: {shown!r})",
        )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    return parser


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "|".join(str(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Resolve the full config from the command line (validated)."""
    parser = build_parser()
    args = vars(parser.parse_intermixed_args(argv))
    config_path = args.pop("config", None)
    positional = args.pop("overrides")
    cfg = load_yaml(config_path) if config_path else TrainConfig()
    overrides = {name: _parse_cli_value(name, text) for name, text in args.items()}
    for item in positional:
        name, sep, text = item.partition("=")
        if not sep:
            parser.error(f"positional override {item!r} must look like section.key=value")
        name = name.removeprefix("--")
        overrides[name] = _parse_cli_value(name, text)
    cfg = apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg


def _parse_cli_value(name: str, text: str) -> Any:
    """String options keep the raw text (YAML would turn `yes` into True); the rest parse as YAML."""
    if name in LEAVES and LEAVES[name][0] is str:
        return text
    return yaml.safe_load(text)
