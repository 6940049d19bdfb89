"""Vittle in Hugging Face ``transformers`` models: one call adds the bottleneck to a stock model.

```python
from vittle_fast.integrations.transformers import apply_vittle, vittle_loss, vittle_step
apply_vittle(model, VittleConfig(layer_v=24, layer_t=24, prior="learnable"))
vittle_step(model, step, alpha)       # before each optimizer step's forwards
out = model(**batch)                  # unchanged HF outputs (pass labels for the text-KL mask)
loss = out.loss + vittle_loss(model)  # beta_v * KL_v + beta_t * KL_t of the last forward
```

How it attaches, without patching any transformers code (docs/integrations.md):
- the bottleneck is our :class:`~vittle_fast.nn.VittleBottleneck`, the submodule
  ``model.vittle_bottleneck`` (so ``save_pretrained`` writes ``vittle_bottleneck.mlp_v.0.weight``, ...);
- decoder layers are ``model.get_decoder().layers`` (HF's accessor: ``model.model.layers`` for
  ``*ForCausalLM``, ``model.model.language_model.layers`` for LLaVA); a forward hook on layer
  ``layer_v`` (and ``layer_t``) replaces that layer's output hidden state, as our ``LlavaVittle`` does
  (the same :class:`~vittle_fast.models.llava.BottleneckHook`);
- a forward pre-hook on the model reads ``input_ids``, ``labels`` and ``attention_mask`` of each call:
  visual tokens are ``input_ids == config.image_token_id`` (LLaVA; text-only models: none), the KL masks
  are :func:`~vittle_fast.models.llava.kl_token_masks` (padding excluded). LLaVA's projector hook counts
  the spliced image features, so the split needs no host sync;
- noise: ``seed = noise_seed(run_seed, step, micro_batch)``, ``offset = noise_offset(rank)`` — the
  trainer's rule (docs/DESIGN.md §5); ``micro_batch`` counts training forwards since ``vittle_step``.
  In ``eval()`` the bottleneck uses the posterior mean. HF gradient checkpointing (transformers >= 5
  checkpoints a layer's ``forward``, not its hooks) leaves the bottleneck outside the recomputed
  region, and the op regenerates its noise from (seed, offset) in backward anyway.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from vittle_fast.models.hf import RELEASED_VITTLE_PREFIXES, load_checkpoint, released_unused_prefixes
from vittle_fast.models.llava import BottleneckHook, kl_token_masks
from vittle_fast.nn.bottleneck import VittleBottleneck, VittleConfig
from vittle_fast.train.noise import noise_offset, noise_seed
from vittle_fast.train.schedules import vittle_alpha

# Classes whose decoder layers are ``model.get_decoder().layers`` and whose layers return the hidden
# state (a tensor, or a tuple starting with it). A text-only causal LM with that layout works when its
# class name is added here; multimodal models other than LLaVA splice images differently and are refused.
SUPPORTED_CLASSES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "LlavaForConditionalGeneration"}
VISION_LANGUAGE_CLASSES = {"LlavaForConditionalGeneration"}
# Where a saved bottleneck's tensors may live in a checkpoint directory, relative to the bottleneck.
SAVED_PREFIXES = {
    "": None,  # everything else belongs to the HF model itself
    "vittle_bottleneck.": "",  # this integration's save_pretrained
    "bottleneck.": "",  # vittle_fast.models.save_pretrained (our LlavaVittle export)
    **{key: value.removeprefix("bottleneck.") for key, value in RELEASED_VITTLE_PREFIXES.items()
       if value.startswith("bottleneck.")},  # the released Vittle code
}


@dataclasses.dataclass
class VittleState:
    """Bookkeeping of one model (plain Python: not in the state dict). ``vittle_step`` sets step and
    alpha; every training forward takes the next micro-batch index."""

    config: VittleConfig
    image_token_id: int | None
    run_seed: int = 0
    step: int = 0
    alpha: float = 0.0  # apply_vittle starts at config.alpha (inference); vittle_step sets the schedule's
    micro_batch: int = 0
    noise: dict | None = None  # the current forward's alpha, noise_seed, noise_offset
    hook: BottleneckHook | None = None  # the current forward's
    num_visual: int | None = None  # image features spliced into the current forward (LLaVA)
    inputs: dict | None = None  # the current forward's input_ids / labels / attention_mask
    kl_log: torch.Tensor | None = None  # [sum kl_v, sum kl_t, forwards] since the last log (on device)
    trainer_kl_scale: dict | None = None  # set by VittleTrainerCallback: add the KL to out.loss


# --------------------------------------------------------------------------------------------
# The contract: apply_vittle, vittle_step, vittle_loss, VittleTrainerCallback
# --------------------------------------------------------------------------------------------
def apply_vittle(model: nn.Module, config: VittleConfig) -> nn.Module:
    """Add Vittle's bottleneck to a ``transformers`` model (in place) and return the model.

    The bottleneck is ``model.vittle_bottleneck`` (a :class:`VittleBottleneck` on the decoder's device
    and dtype). Its weights come from ``model.name_or_path`` when that is a local directory holding
    them (``vittle_bottleneck.*`` from this integration's ``save_pretrained``, ``bottleneck.*`` from
    ``vittle_fast.models.save_pretrained``, or the released ``model.bottleneck_layer_v.*`` /
    ``model.learnable_prior.*``); else they are freshly initialised. The config is recorded in
    ``model.config.vittle`` so a saved model says how it was trained.
    """
    if not isinstance(config, VittleConfig):
        raise TypeError(f"config must be a VittleConfig, got {type(config).__name__}")
    class_names = {cls.__name__ for cls in type(model).__mro__}
    if not class_names & SUPPORTED_CLASSES:
        raise TypeError(f"apply_vittle supports {sorted(SUPPORTED_CLASSES)} (decoder layers found as "
                        f"model.get_decoder().layers), got {type(model).__name__}")
    if getattr(config, "routing", "exact") != "exact":
        raise ValueError("apply_vittle supports routing='exact' only (the released positional split is a "
                         "parity option of vittle_fast.models.LlavaVittle)")
    if hasattr(model, "vittle_bottleneck"):
        raise ValueError("apply_vittle was already applied to this model")
    layers = model.get_decoder().layers
    for name in ("layer_v", "layer_t"):
        if getattr(config, name) >= len(layers):
            raise ValueError(f"config.{name}={getattr(config, name)} but the decoder has {len(layers)} layers")
    is_llava = bool(class_names & VISION_LANGUAGE_CLASSES)
    image_token_id = None
    if is_llava:
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = model.config.image_token_index  # transformers 4.x name

    reference = model.get_input_embeddings().weight
    with torch.device(reference.device):
        bottleneck = VittleBottleneck(reference.shape[1], config).to(reference.dtype)
    _load_saved_bottleneck(bottleneck, getattr(model, "name_or_path", ""))
    model.vittle_bottleneck = bottleneck
    model.config.vittle = dataclasses.asdict(config)
    model.vittle_state = state = VittleState(config, image_token_id, alpha=config.alpha)  # a trained model's
    model.vittle_step = functools.partial(vittle_step, model)

    model.register_forward_pre_hook(functools.partial(_before_forward, state), with_kwargs=True)
    model.register_forward_hook(functools.partial(_after_forward, state), with_kwargs=True)
    if is_llava:
        projector = next(module for name, module in model.named_modules() if name.endswith("multi_modal_projector"))
        projector.register_forward_hook(functools.partial(_count_image_features, state))
    for index in sorted({config.layer_v, config.layer_t}):
        layers[index].register_forward_hook(functools.partial(_after_layer, state, bottleneck, index))
    return model


def vittle_step(model: nn.Module, step: int, alpha: float) -> None:
    """Start optimizer step ``step``: its noise stream and interpolation weight ``alpha``.

    Call before the step's forwards (also ``model.vittle_step(step, alpha)``). The noise of the
    step's k-th training forward is ``(noise_seed(run_seed, step, k), noise_offset(rank))``, the
    rank read from ``torch.distributed`` when it is initialised.
    """
    state = _state(model)
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    state.step, state.alpha, state.micro_batch = step, float(alpha), 0


def vittle_loss(model: nn.Module) -> torch.Tensor:
    """``beta_v * KL_v + beta_t * KL_t`` of the model's last forward (0-dim fp32; 0 before any)."""
    state = _state(model)
    zero = _unwrap(model).vittle_bottleneck.mlp_v[0].weight.new_zeros((), dtype=torch.float32)
    if state.hook is None:
        return zero
    kl = state.hook.kl
    return state.config.beta_v * kl.get("visual", zero) + state.config.beta_t * kl.get("text", zero)


class VittleTrainerCallback(TrainerCallback):
    """Vittle for ``transformers.Trainer``: ``Trainer(..., callbacks=[VittleTrainerCallback()])`` on a
    model passed through :func:`apply_vittle`.

    - alpha follows :func:`vittle_fast.train.schedules.vittle_alpha` over ``max_steps`` (paper cosine
      by default; ``kind="sigmoid"`` is the released code's); after training it stays at ``end``;
    - the step counter and the run seed (``args.seed``) drive the noise (:func:`vittle_step`);
    - the KL term is added to the model's ``out.loss`` during training, scaled the way the Trainer
      scales the CE (per micro-batch mean over accumulation steps and ranks);
    - ``kl_v`` / ``kl_t`` (means over the forwards since the last log) and ``alpha`` go in the logs.
    """

    def __init__(self, kind: str = "cosine", end: float = 0.5, k: float = 10.0, t0: float = 0.5):
        vittle_alpha(0, 1, kind=kind, end=end, k=k, t0=t0)  # validates the arguments
        self.schedule = dict(kind=kind, end=end, k=k, t0=t0)
        self.alpha = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        vittle_state = _state(model)
        vittle_state.run_seed = args.seed
        vittle_state.trainer_kl_scale = {"accumulation": args.gradient_accumulation_steps,
                                         "ranks": args.world_size if args.average_tokens_across_devices else 1}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.alpha = vittle_alpha(state.global_step, max(state.max_steps, 1), **self.schedule)
        vittle_step(model, state.global_step, self.alpha)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        vittle_state = _state(model)
        if logs is None or vittle_state.kl_log is None or "loss" not in logs:
            return
        kl_v, kl_t, count = vittle_state.kl_log.tolist()  # the one host sync, at logging steps only
        vittle_state.kl_log = None
        extra = {"kl_v": kl_v / max(count, 1), "kl_t": kl_t / max(count, 1), "alpha": self.alpha}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        vittle_state = _state(model)
        vittle_state.trainer_kl_scale = None
        vittle_step(model, state.global_step, self.schedule["end"])  # inference uses the final alpha


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------
@torch.compiler.disable  # Python bookkeeping with per-step ints: run eagerly, never guarded on
def _before_forward(state: VittleState, module: nn.Module, args: tuple, kwargs: dict):
    """Record the call's inputs; a training forward takes the next noise stream of the step."""
    if len(args) > 1:
        raise TypeError("with apply_vittle, pass model inputs other than input_ids as keyword arguments")
    input_ids = args[0] if args else kwargs.get("input_ids")
    if input_ids is None and (state.image_token_id is not None or kwargs.get("labels") is not None):
        raise ValueError("with apply_vittle, pass input_ids (image positions and the KL masks come from them)")
    state.inputs = dict(input_ids=input_ids, labels=kwargs.get("labels"), attention_mask=kwargs.get("attention_mask"),
                        embeds=kwargs.get("inputs_embeds"))
    state.num_visual = None
    if state.image_token_id is not None and kwargs.get("mm_encoder_outputs") is not None:
        state.num_visual = int((input_ids == state.image_token_id).sum())  # precomputed features: count them
    state.hook = None
    if module.training:
        state.noise = dict(alpha=state.alpha, noise_seed=noise_seed(state.run_seed, state.step, state.micro_batch),
                           noise_offset=noise_offset(dist.get_rank() if dist.is_initialized() else 0))
        state.micro_batch += 1
    else:
        state.noise = dict(alpha=state.alpha, noise_seed=0, noise_offset=0)


@torch.compiler.disable  # Python bookkeeping with per-step ints: run eagerly, never guarded on
def _count_image_features(state: VittleState, module: nn.Module, args: tuple, output: torch.Tensor):
    """LLaVA's projector ran: its [images, patches, D] output is what gets spliced at the image tokens."""
    state.num_visual = (state.num_visual or 0) + output.shape[:-1].numel()


@torch.compiler.disable  # Python bookkeeping with per-step ints: run eagerly, never guarded on
def _after_layer(state: VittleState, bottleneck: VittleBottleneck, index: int, module: nn.Module, args: tuple,
                 output):
    hidden = output[0] if isinstance(output, tuple) else output
    if state.hook is None:
        state.hook = _bottleneck_hook(state, bottleneck, hidden.shape[:2])
    hidden = state.hook(index, hidden, 0)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _bottleneck_hook(state: VittleState, bottleneck: VittleBottleneck, shape: torch.Size) -> BottleneckHook:
    """The current forward's BottleneckHook: which tokens are visual, which count in each KL."""
    inputs = state.inputs
    if inputs is None:
        raise RuntimeError("the Vittle layer hook ran outside a model forward: call the model itself, "
                           "not its decoder")
    reference = inputs["input_ids"] if inputs["input_ids"] is not None else inputs["embeds"]
    if reference is None or tuple(reference.shape[:2]) != tuple(shape):
        raise RuntimeError(f"decoder hidden states {tuple(shape)} do not match the model inputs: call the "
                           "model itself, not its decoder")
    num_visual = state.num_visual or 0
    if num_visual:
        is_visual = inputs["input_ids"] == state.image_token_id
    else:  # no image features were spliced in: every token is text
        is_visual = torch.zeros(shape, dtype=torch.bool, device=reference.device)
    masks = kl_token_masks(is_visual, inputs["labels"], inputs["attention_mask"], state.config.kl_text_tokens)
    return BottleneckHook(bottleneck, is_visual, num_visual, masks, **state.noise)


@torch.compiler.disable  # Python bookkeeping with per-step ints: run eagerly, never guarded on
def _after_forward(state: VittleState, module: nn.Module, args: tuple, kwargs: dict, output):
    """Training forwards: accumulate the KL terms for logging (on device); under the Trainer callback,
    add the KL term to ``out.loss`` scaled as the Trainer scales that loss."""
    state.inputs = None
    if not module.training or state.hook is None:
        return output
    zero = torch.zeros((), device=module.vittle_bottleneck.mlp_v[0].weight.device)
    kl = torch.stack([state.hook.kl.get("visual", zero), state.hook.kl.get("text", zero), zero + 1]).detach()
    state.kl_log = kl if state.kl_log is None else state.kl_log + kl
    scale = state.trainer_kl_scale
    if scale is not None and getattr(output, "loss", None) is not None:
        factor = 1.0
        if kwargs.get("num_items_in_batch") is not None:
            # out.loss is then a sum over the whole accumulated (and, averaged across devices, global)
            # batch: the Trainer neither divides it by the accumulation steps nor averages it over ranks.
            factor = 1.0 / (scale["accumulation"] * scale["ranks"])
        output.loss = output.loss + factor * vittle_loss(module)
    return output


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The module apply_vittle was applied to, under a torch.compile wrapper."""
    return getattr(model, "_orig_mod", model)


def _state(model: nn.Module) -> VittleState:
    state = getattr(_unwrap(model), "vittle_state", None)
    if not isinstance(state, VittleState):
        raise ValueError(f"{type(model).__name__} has no Vittle bottleneck: call apply_vittle(model, config) first")
    return state


def _load_saved_bottleneck(bottleneck: VittleBottleneck, name_or_path: str) -> None:
    """Load the bottleneck's tensors from a local checkpoint directory that has them (else keep the
    fresh init). A checkpoint with only part of them raises, naming what is missing."""
    path = Path(name_or_path) if name_or_path else None
    if path is None or not path.is_dir() or not any(path.glob("*.safetensors")):
        return
    prefixes = {**SAVED_PREFIXES, **released_unused_prefixes(bottleneck.config)}
    load_checkpoint(bottleneck, path, prefixes, device=bottleneck.mlp_v[0].weight.device, optional_prefixes=("",))


__all__ = ["SUPPORTED_CLASSES", "VittleState", "VittleTrainerCallback", "apply_vittle", "vittle_loss", "vittle_step"]
