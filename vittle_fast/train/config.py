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
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vittle_fast.nn.bottleneck import VittleConfig


def opt(default: Any, help: str) -> Any:
    """A config field with its `--help` text (the default is appended automatically)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSection:
    """Where the model comes from. `source="tiny"` builds a random model from the dims below."""

    source: Literal["tiny", "hf_llava", "hf_parts"] = opt("tiny", "random tiny | HF LLaVA dir | HF Llama + CLIP dirs")
    path: str = opt("", "hf_llava: local LlavaForConditionalGeneration directory")
    llm_path: str = opt("", "hf_parts: local Llama directory")
    vision_path: str = opt("", "hf_parts: local CLIP directory (the projector starts random); hf_llava: the CLIP "
                           "directory a released Vittle checkpoint names")
    stage: Literal[1, 2] = opt(2,
                               "1 = projector alignment (only the projector trains); 2 = projector + LLM + bottleneck")
    vision_feature_layer: int = opt(-2, "CLIP hidden state fed to the projector")
    vocab_size: int = opt(0, "tiny: vocabulary size; 0 = the tokenizer's")
    hidden_size: int = opt(64, "tiny: decoder width")
    intermediate_size: int = opt(172, "tiny: decoder MLP width")
    num_layers: int = opt(4, "tiny: decoder blocks")
    num_heads: int = opt(4, "tiny: attention heads")
    num_kv_heads: int = opt(2, "tiny: key/value heads (GQA)")
    max_position_embeddings: int = opt(1024, "tiny: RoPE context length")
    vision_hidden_size: int = opt(48, "tiny: CLIP width")
    vision_intermediate_size: int = opt(96, "tiny: CLIP MLP width")
    vision_layers: int = opt(3, "tiny: CLIP blocks")
    vision_heads: int = opt(4, "tiny: CLIP heads")
    image_size: int = opt(32, "tiny: CLIP input side (pixels)")
    patch_size: int = opt(8, "tiny: CLIP patch side; (image_size/patch_size)^2 image tokens")
    fused_cross_entropy: bool = opt(True, "LM head + CE on the target tokens only, chunked "
                                    "(vittle_fast.ops.fused_linear_cross_entropy); false = full logits")


def _vittle_section() -> type:
    """The `vittle` section: the trainer's own options (enabled, the alpha schedule) plus every field of
    `vittle_fast.nn.VittleConfig` -- its name, type, default and help -- so the two cannot drift; the
    values are validated by building a VittleConfig (`TrainConfig.errors`). Differences: `layer_v` /
    `layer_t` also take -1 (3/4 depth); `alpha` is not an option (the export gets the schedule's end value)."""
    hints = typing.get_type_hints(VittleConfig)
    fields = [("enabled", bool, opt(True, "false = LLaVA baseline without the bottleneck"))]
    for f in dataclasses.fields(VittleConfig):
        if f.name == "alpha":
            continue
        if f.name in ("layer_v", "layer_t"):
            fields.append((f.name, int, opt(-1, f.metadata["help"] + "; -1 = 3/4 depth (24 of 32)")))
        else:
            fields.append((f.name, hints[f.name], opt(f.default, f.metadata["help"])))
    fields += [
        ("alpha_schedule", Literal["cosine", "sigmoid"], opt("cosine", "alpha ramp: paper (cosine) / released code")),
        ("alpha_end", float, opt(0.5, "final alpha (also the inference value)")),
        ("alpha_k", float, opt(10.0, "sigmoid steepness")),
        ("alpha_t0", float, opt(0.5, "sigmoid midpoint, as a fraction of max_steps")),
    ]
    section = dataclasses.make_dataclass("VittleSection", fields)
    section.__module__ = __name__
    section.__doc__ = "The bottleneck (docs/DESIGN.md §1). `enabled=false` trains the plain LLaVA baseline."
    return section


VittleSection = _vittle_section()
VITTLE_FIELDS = tuple(f.name for f in dataclasses.fields(VittleConfig) if f.name != "alpha")


def vittle_config_of(section, layer_v: int, layer_t: int, alpha: float = 0.5) -> VittleConfig:
    """A VittleConfig from the section's fields (raises ValueError naming a bad field)."""
    values = {name: getattr(section, name) for name in VITTLE_FIELDS}
    return VittleConfig(**{**values, "layer_v": layer_v, "layer_t": layer_t, "alpha": alpha})


@dataclass
class DataSection:
    """LLaVA-format instruction data, or (`demo=true`) the synthetic demo set, made when missing."""

    data_path: str = opt("", "LLaVA instruction JSON (required unless demo=true)")
    image_folder: str = opt("", "root of the JSON's relative image paths; empty = the JSON's directory")
    tokenizer: str = opt("", "tokenizer directory; empty = the model directory's")
    image_token_id: int = opt(-1, "id written at image positions; -1 = the tokenizer's <image> token")
    demo: bool = opt(False, "generate (or reuse) the synthetic demo set in demo_dir and train on it")
    demo_dir: str = opt("outputs/demo_data", "where the demo set lives")
    demo_num_samples: int = opt(1000, "demo training records")
    template: Literal["vicuna_v1", "chat_template"] = opt("vicuna_v1", "prompt template")
    max_length: int = opt(2048, "tokens per sample after <image> expansion (see truncation)")
    truncation: Literal["skip", "truncate"] = opt("skip", "over-long records: skip them (kind too_long) or cut "
                                                  "them to max_length (kind truncated; the end token is lost)")
    max_image_pixels: int = opt(89_478_485, "images with more pixels are refused from their header "
                                "(kind image_too_large: decompression bombs)")
    micro_batch_size: int = opt(4, "samples per rank per micro-batch")
    grad_accum_steps: int = opt(1, "micro-batches per optimizer step")
    mega_batch_mult: int = opt(8, "length grouping: sort within groups of this many global batches")
    packing: bool = opt(False, "pack each micro-batch into one row (position ids restart per sample)")
    strict: bool = opt(False, "raise on a bad record (naming it) instead of skipping and counting it")
    num_workers: int = opt(-1, "DataLoader worker processes; 0 = load in the training process; -1 = auto: up to 4 "
                           "per rank on CUDA (the spare CPU cores), 0 on CPU (workers would compete with training)")
    prefetch_factor: int = opt(2, "micro-batches each worker prepares ahead (num_workers > 0)")


@dataclass
class OptimSection:
    lr: float = opt(2e-5, "peak learning rate (AdamW, fused)")
    min_lr_ratio: float = opt(0.0, "final LR as a fraction of the peak (cosine floor)")
    warmup_steps: int = opt(0, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay of matrices (vectors never decay)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "max global gradient norm; <= 0 = no clipping (the norm is still logged)")


@dataclass
class CheckpointSection:
    interval: int = opt(500, "steps between checkpoints; 0 = only at the end")
    keep_last: int = opt(2, "complete checkpoints kept")
    resume: bool = opt(True, "continue from the newest checkpoint in output_dir that verifies")
    fallback: bool = opt(True, "a newest checkpoint that fails verification (manifest size/SHA-256) is moved "
                         "aside and the previous one is used; false = refuse to start")
    export_safetensors: bool = opt(True, "write OUTPUT_DIR/export/model.safetensors + config at the end")


@dataclass
class LoggingSection:
    log_every: int = opt(10, "steps between metric records (the only host syncs of the loop)")
    progress_bar: bool = opt(True, "tqdm bar on rank 0")
    tensorboard: bool = opt(True, "also write TensorBoard events when tensorboard is installed")
    plot: bool = opt(True, "OUTPUT_DIR/metrics.png (loss, CE, KL, alpha) at the end")
    profile_steps: tuple[int, int] | None = opt(None, "[a, b]: torch.profiler trace of steps a..b (1-based, "
                                                "inclusive) to OUTPUT_DIR/profile/ (Perfetto, TensorBoard)")


@dataclass
class EvalSection:
    """Periodic validation during training (vittle_fast/eval/validation.py), logged and plotted."""

    every: int = opt(0, "steps between validation passes (val_loss, val_accuracy); 0 = off")
    data_path: str = opt("", "validation LLaVA JSON; empty with data.demo = the demo's val.json")
    image_folder: str = opt("", "its images; empty = data.image_folder")
    max_samples: int = opt(200, "validate on the first N records; 0 = all")


@dataclass
class ParallelSection:
    replicate: int = opt(1, "> 1: HSDP, replicate x (world/replicate) shard mesh (e.g. the number of nodes)")
    param_dtype: Literal["bfloat16", "float32"] = opt("bfloat16", "FSDP compute dtype (also CLIP storage)")
    reduce_dtype: Literal["bfloat16", "float32"] = opt("float32", "FSDP gradient reduction dtype")
    activation_checkpointing: Literal["off", "full", "every_k"] = opt("off", "recompute decoder blocks in backward")
    ac_every_k: int = opt(2, "every_k: checkpoint every k-th block")
    cuda_graphs: bool = opt(False, "pass alpha, noise seed and offset to the model as 0-dim device tensors updated "
                                   "in place each micro-batch (safe to capture in a CUDA graph / compiled step)")
    reduce_once_per_step: bool = opt(True, "gradient accumulation: one gradient reduce-scatter per step, after the "
                                     "last micro-batch (unsharded grads + params stay on each rank in between: more "
                                     "memory); false = reduce every micro-batch (ZeRO-3 memory)")


@dataclass
class TrainConfig:
    output_dir: str = opt("outputs/run", "checkpoints, metrics.jsonl, config.yaml, plot, export")
    max_steps: int = opt(1000, "optimizer steps of the whole run (the LR and alpha schedules span them)")
    stop_at_step: int = opt(0, "> 0: checkpoint and exit at this step (a time-limited slot); rerunning resumes")
    seed: int = opt(0, "model init, data order and noise streams")
    allow_schedule_change: bool = opt(False, "resume even if max_steps or an LR/alpha schedule option differs from "
                                             "the checkpoint's run (both schedules are recomputed over the new span)")
    model: ModelSection = field(default_factory=ModelSection)
    vittle: VittleSection = field(default_factory=VittleSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def errors(self) -> list[str]:
        """Cross-field problems that single-field types cannot express, one message each."""
        found = []
        positive = {
            "max_steps": self.max_steps,
            "data.micro_batch_size": self.data.micro_batch_size,
            "data.grad_accum_steps": self.data.grad_accum_steps,
            "data.max_length": self.data.max_length,
            "data.max_image_pixels": self.data.max_image_pixels,
            "data.mega_batch_mult": self.data.mega_batch_mult,
            "logging.log_every": self.logging.log_every,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "parallel.replicate": self.parallel.replicate,
            "parallel.ac_every_k": self.parallel.ac_every_k,
            "data.prefetch_factor": self.data.prefetch_factor,
        }
        found += [f"{name} must be >= 1, got {value}" for name, value in positive.items() if value < 1]
        if self.data.num_workers < -1:
            found.append(f"data.num_workers must be >= 0 (or -1 = auto), got {self.data.num_workers}")
        if self.eval.every < 0 or self.eval.max_samples < 0:
            found.append(f"eval.every and eval.max_samples must be >= 0, got {self.eval.every}, {self.eval.max_samples}")
        if self.eval.every and not (self.eval.data_path or self.data.demo):
            found.append("eval.every > 0 needs eval.data_path (or data.demo=true: the demo's val.json)")
        if self.stop_at_step < 0:
            found.append(f"stop_at_step must be >= 0, got {self.stop_at_step}")
        if self.checkpoint.interval < 0:
            found.append(f"checkpoint.interval must be >= 0, got {self.checkpoint.interval}")
        if not 0.0 <= self.vittle.alpha_end <= 1.0:
            found.append(f"vittle.alpha_end must be in [0, 1], got {self.vittle.alpha_end}")
        for name in ("layer_v", "layer_t"):
            if getattr(self.vittle, name) < -1:
                found.append(f"vittle.{name} must be a decoder block index >= 0 (or -1 = 3/4 depth), "
                             f"got {getattr(self.vittle, name)}")
        if self.model.stage == 1 and self.vittle.enabled:
            found.append("vittle.enabled requires model.stage=2 (stage 1 trains only the projector)")
        if not self.data.demo and not self.data.data_path:
            found.append("data.data_path is required (or data.demo=true for the synthetic demo set)")
        if self.model.source == "hf_llava" and not self.model.path:
            found.append("model.path is required when model.source=hf_llava")
        if self.model.source == "hf_parts" and not (self.model.llm_path and self.model.vision_path):
            found.append("model.llm_path and model.vision_path are required when model.source=hf_parts")
        if self.vittle.routing == "positional" and self.data.packing:
            found.append("vittle.routing=positional needs one sequence per row: set data.packing=false")
        try:  # every VittleConfig check (layers are resolved against the model later)
            vittle_config_of(self.vittle, max(self.vittle.layer_v, 0), max(self.vittle.layer_t, 0))
        except ValueError as error:
            found.append(str(error).replace("VittleConfig.", "vittle.", 1))
        steps = self.logging.profile_steps
        if steps is not None and not 1 <= steps[0] <= steps[1]:
            found.append(f"logging.profile_steps must be [a, b] with 1 <= a <= b, got {list(steps)}")
        return found

    def validate(self) -> None:
        """Raise a :class:`ConfigError` listing every problem of :meth:`errors`."""
        found = self.errors()
        if found:
            raise ConfigError(found)


class ConfigError(ValueError):
    """Every problem found in a configuration, one message each (the CLI prints one line per
    problem and exits with status 2, the argparse convention for usage errors)."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# ---------------------------------------------------------------------------------------------
# Flattening the dataclass tree into dotted leaf options.


def _leaf_fields(cls: type, prefix: str = "") -> dict[str, tuple[Any, Any, str]]:
    """{dotted name: (type, default, help)} for every leaf field of a (nested) config dataclass."""
    hints = typing.get_type_hints(cls)
    leaves: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(cls):
        name, hint = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(hint):
            leaves.update(_leaf_fields(hint, name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            leaves[name] = (hint, default, f.metadata.get("help", ""))
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
    found = []
    for name, value in overrides.items():
        if name not in LEAVES:
            found.append(f"unknown config option {name!r} (see --help for the list)")
            continue
        *path, leaf = name.split(".")
        target = cfg
        for part in path:
            target = getattr(target, part)
        try:
            setattr(target, leaf, _coerce(name, LEAVES[name][0], value))
        except ValueError as err:
            found.append(str(err))
    if found:
        raise ConfigError(found)
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
`section.key=VALUE` (a bare `--flag` of a true/false option means true; option names are never
abbreviated). Values are YAML scalars: true/false, null, 1e-4, [-2.3, 2.3].
Precedence: defaults < --config YAML < command line. The resolved config is saved to
OUTPUT_DIR/config.yaml.

Examples:
  torchrun --nproc_per_node 2 -m vittle_fast.train --config configs/demo.yaml
  python -m vittle_fast.train --config configs/demo.yaml --max_steps 50 vittle.enabled=false
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors become a :class:`ConfigError` (printed once, by rank 0, by the caller) instead of
    argparse's print-and-exit on every rank."""

    def error(self, message: str):
        raise ConfigError([message])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m vittle_fast.train",
        allow_abbrev=False,  # `--max_step 10` must fail, not silently mean --max_steps
        usage="%(prog)s [--config PATH] [--section.key VALUE ...] [section.key=VALUE ...]",
        description="Fine-tune LLaVA with Vittle on FSDP2 (launch with torchrun for several processes).",
        epilog=_EPILOG,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=44, width=140),
    )
    parser.add_argument("--config", metavar="PATH", help="YAML config file, applied before the overrides")
    for name, (hint, default, text) in LEAVES.items():
        shown = list(default) if isinstance(default, tuple) else default
        parser.add_argument(
            f"--{name}",
            dest=name,
            metavar=_type_name(hint),
            default=argparse.SUPPRESS,
            help=f"{text} (default: {shown!r})",
        )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    return parser


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "|".join(str(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Resolve the full config from the command line (validated). Raises a :class:`ConfigError`
    listing every problem found, not just the first."""
    parser = build_parser()
    args = vars(parser.parse_intermixed_args(_bare_flags_true(sys.argv[1:] if argv is None else argv)))
    config_path = args.pop("config", None)
    items = [(f"--{name}", name, text) for name, text in args.items() if name != "overrides"]
    for item in args["overrides"]:
        name, sep, text = item.partition("=")
        items.append((item, name.removeprefix("--"), text) if sep else (item, None, None))
    found, overrides = [], {}
    for item, name, text in items:
        if name is None:
            found.append(f"positional override {item!r} must look like section.key=value")
            continue
        try:
            overrides[name] = _parse_cli_value(name, text)
        except yaml.YAMLError:
            found.append(f"{name}: cannot parse {text!r} as a YAML value")
    cfg = TrainConfig()
    if config_path:
        try:
            cfg = load_yaml(config_path)
        except OSError as err:
            found.append(f"--config {config_path}: {err.strerror}")
        except (ConfigError, TypeError, yaml.YAMLError) as err:
            found += [f"--config {config_path}: {line}" for line in str(err).splitlines()]
    try:
        cfg = apply_overrides(cfg, overrides)
    except ConfigError as err:
        found += err.errors
    if not found:  # cross-field checks only make sense on a config that parsed
        found = cfg.errors()
    if found:
        raise ConfigError(found)
    return cfg


def _bare_flags_true(argv: list[str]) -> list[str]:
    """A true/false option given without a value (`--allow_schedule_change` followed by another
    option, a `key=value` override or nothing) means true."""
    out = []
    for i, token in enumerate(argv):
        out.append(token)
        hint = LEAVES.get(token.removeprefix("--"), (None,))[0] if token.startswith("--") else None
        following = argv[i + 1] if i + 1 < len(argv) else "--"
        if hint is bool and (following.startswith("--") or "=" in following):
            out.append("true")
    return out


def _parse_cli_value(name: str, text: str) -> Any:
    """String options keep the raw text (YAML would turn `yes` into True); the rest parse as YAML."""
    if name in LEAVES and LEAVES[name][0] is str:
        return text
    return yaml.safe_load(text)
