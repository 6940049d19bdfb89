"""LLaVA-1.5 assembly (CLIP tower -> mlp2x_gelu projector -> Llama) with Vittle's bottleneck.

Image tokens follow the llava-hf convention (docs/interfaces.md §B): the collator expands each ``<image>``
into ``(image_size // patch_size) ** 2`` copies of ``image_token_id``; the model writes the projected
patch features into exactly those positions, in order. The modality of every token therefore comes
from where features were written (visual), ``attention_mask`` (padding) and the rest (text), never
from positions.

The bottleneck runs inside the decoder through the Llama's ``after_layer`` hook, so the layer loop
stays the plain one in ``llama.py`` and generation reuses it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vittle_fast.data.conversation import IGNORE_INDEX
from vittle_fast.nn.bottleneck import BOTH, MODALITIES, VittleBottleneck, VittleConfig, split_token_rows, token_order
from vittle_fast.ops import fused_linear_cross_entropy

from .clip import CLIPVisionTower
from .families import build_text_model
from .llama import Llama



class MultimodalProjector(nn.Module):
    """LLaVA-1.5's ``mlp2x_gelu``: Linear -> GELU (erf) -> Linear (llava-hf names)."""

    def __init__(self, vision_size: int, text_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_size, text_size)
        self.linear_2 = nn.Linear(text_size, text_size)

    def reset_parameters(self) -> None:
        self.linear_1.reset_parameters()
        self.linear_2.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


@dataclass
class LlavaOutput:
    logits: torch.Tensor | None  # [B, S, V]; None when the loss was fused (fused_cross_entropy, labels given)
    ce_sum: torch.Tensor  # fp32 scalar: summed CE over the target tokens
    n_targets: torch.Tensor  # int64 scalar
    kl_v: torch.Tensor  # fp32 scalar: mean KL over the visual tokens (0 when none / no bottleneck)
    kl_t: torch.Tensor  # fp32 scalar: mean KL over the selected text tokens
    vittle_loss: torch.Tensor  # fp32 scalar: beta_v * kl_v + beta_t * kl_t


def causal_lm_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets [B, S-1]: token t predicts label t + 1; a label at a packed sequence start
    (``position_ids == 0``) is not a target of the previous sequence's last token."""
    targets = labels[:, 1:]
    if position_ids is not None:
        targets = targets.masked_fill(position_ids[:, 1:] == 0, IGNORE_INDEX)
    return targets


def causal_lm_ce_sum(logits: torch.Tensor, labels: torch.Tensor,
                     position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE (fp32) over ``causal_lm_targets`` and their count."""
    targets = causal_lm_targets(labels, position_ids)
    ce_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    return ce_sum, (targets != IGNORE_INDEX).sum()


def kl_token_masks(is_visual: torch.Tensor, labels: torch.Tensor | None, attention_mask: torch.Tensor | None,
                   kl_text_tokens: str) -> dict[str, torch.Tensor]:
    """Tokens whose KL counts [B, S] per modality: every image token; the prompt text (label ignored,
    ``kl_text_tokens="prompt"`` with labels given) or all text. Padding never counts."""
    valid = torch.ones_like(is_visual) if attention_mask is None else attention_mask.bool()
    text = valid & ~is_visual
    if kl_text_tokens == "prompt" and labels is not None:
        text = text & (labels == IGNORE_INDEX)
    return {"visual": is_visual & valid, "text": text}


def fused_causal_lm_ce_sum(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                           position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``causal_lm_ce_sum(lm_head(hidden), ...)`` with the LM head run on the target positions only,
    chunked, never holding [tokens, vocab] logits (``fused_linear_cross_entropy``)."""
    targets = F.pad(causal_lm_targets(labels, position_ids), (0, 1), value=IGNORE_INDEX)  # row t -> label t+1
    ce_sum = fused_linear_cross_entropy(hidden.flatten(0, 1), lm_head_weight, targets.flatten(),
                                        ignore_index=IGNORE_INDEX)
    return ce_sum, (targets != IGNORE_INDEX).sum()


class BottleneckHook:
    """The Llama ``after_layer`` hook that applies Vittle after ``layer_v`` / ``layer_t``.

    Built for one sequence batch (the prompt, during generation): ``is_visual`` [B, P] marks the image
    tokens, ``kl_masks`` [B, P] per modality the tokens whose KL counts. Chunks that start after
    position 0 (cached decoding) contain only newly generated text. Records ``kl[modality]``.

    The text call covers every non-image position, padding included: its row count is then known on
    the host (B*S - images x patches) and needs no sync. Padding never enters a KL mean, and no valid
    token attends to it, so transforming it changes nothing.
    """

    def __init__(self, bottleneck: VittleBottleneck, is_visual: torch.Tensor, num_visual: int,
                 kl_masks: dict[str, torch.Tensor] | None, *, alpha: float, noise_seed: int, noise_offset: int):
        self.bottleneck = bottleneck
        self.is_visual, self.num_visual, self.kl_masks = is_visual, num_visual, kl_masks
        self.noise = dict(alpha=alpha, noise_seed=noise_seed, noise_offset=noise_offset)
        self.kl: dict[str, torch.Tensor] = {}
        self._rows_cache: dict[tuple[int, int], dict] = {}

    def _rows(self, first_position: int, seq: int) -> dict:
        """Per modality: (flat rows of the chunk [first_position, first_position + seq), KL mask); and
        under ``BOTH`` all rows, visual first (the two modalities' rows are its two parts)."""
        key = (first_position, seq)
        if key not in self._rows_cache:
            prompt_len = self.is_visual.shape[1]
            grow = max(0, first_position + seq - prompt_len)
            is_visual = F.pad(self.is_visual, (0, grow))[:, first_position:first_position + seq]
            num_visual = self.num_visual if first_position == 0 else 0
            order = token_order(is_visual)
            rows = dict(zip(MODALITIES, order.split([num_visual, order.numel() - num_visual])))
            entry = {BOTH: order}
            for modality, modality_rows in rows.items():
                if self.kl_masks is None:
                    kl_mask = torch.zeros_like(modality_rows, dtype=torch.bool)
                else:
                    kl_mask = self.kl_masks[modality].flatten().index_select(0, modality_rows)
                entry[modality] = (modality_rows, kl_mask)
            self._rows_cache[key] = entry
        return self._rows_cache[key]

    def __call__(self, layer_index: int, hidden: torch.Tensor, first_position: int) -> torch.Tensor:
        modalities = self.bottleneck.config.modalities_after(layer_index)
        if not modalities:
            return hidden
        rows = self._rows(first_position, hidden.shape[1])
        flat = hidden.flatten(0, 1)
        if len(modalities) == 2:  # layer_v == layer_t: both at the same point, one permutation of the rows
            # Through the module call (not forward_both), so FSDP's group hooks see the bottleneck run.
            flat, kl = self.bottleneck(flat, BOTH, rows[BOTH], {m: rows[m][1] for m in MODALITIES}, **self.noise)
            self.kl.update(kl)
        else:
            (modality,) = modalities
            flat, self.kl[modality] = self.bottleneck(flat, modality, *rows[modality], **self.noise)
        return flat.view_as(hidden)


class LlavaVittle(nn.Module):
    """LLaVA-1.5 with an optional Vittle bottleneck (docs/interfaces.md §B).

    The CLIP tower is frozen and always runs under ``torch.no_grad()``. ``validate_inputs`` (default
    True) checks that the image-token count matches the images given; it costs one host sync per
    forward, so a trainer that trusts its collator may switch it off. ``fused_cross_entropy``
    (default False; the trainer turns it on) computes the loss with the LM head on the target
    positions only and returns ``logits=None`` when ``labels`` are given.
    """

    def __init__(self, text_config, vision_config, image_token_id: int, vittle: VittleConfig | None = None,
                 vision_feature_layer: int = -2):
        super().__init__()
        if not isinstance(image_token_id, int):
            raise TypeError(f"image_token_id must be an int, got {type(image_token_id).__name__}")
        if vittle is not None:
            for name in ("layer_v", "layer_t"):
                if getattr(vittle, name) >= text_config.num_hidden_layers:
                    raise ValueError(f"vittle.{name}={getattr(vittle, name)} but the decoder has "
                                     f"{text_config.num_hidden_layers} layers")
        self.image_token_id = image_token_id
        self.vision_feature_layer = vision_feature_layer
        self.validate_inputs = True
        self.fused_cross_entropy = False
        self.vision_tower = CLIPVisionTower(vision_config).requires_grad_(False)
        self.projector = MultimodalProjector(vision_config.hidden_size, text_config.hidden_size)
        self.language_model = build_text_model(text_config)
        self.bottleneck = None if vittle is None else VittleBottleneck(text_config.hidden_size, vittle)

    @classmethod
    def from_parts(cls, language_model: Llama, vision_tower: CLIPVisionTower, image_token_id: int,
                   vittle: VittleConfig | None = None, vision_feature_layer: int = -2) -> "LlavaVittle":
        """Assemble from loaded parts (e.g. ``llama_from_hf(vicuna)`` + ``clip_from_hf(clip)``, LLaVA's
        stage-1 start): a fresh projector and bottleneck on the language model's device and dtype.
        Built on the meta device first, so the parts are never allocated twice."""
        with torch.device("meta"):
            model = cls(language_model.config, vision_tower.config, image_token_id, vittle, vision_feature_layer)
        model.language_model = language_model
        model.vision_tower = vision_tower.requires_grad_(False)
        reference = language_model.embed_tokens.weight
        for fresh in (model.projector, model.bottleneck):
            if fresh is not None:
                fresh.to_empty(device=reference.device).to(reference.dtype).reset_parameters()
        return model

    @property
    def num_image_tokens(self) -> int:
        return self.vision_tower.num_patches

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected patch features of every image, flattened to [n_images * P, D_text]."""
        with torch.no_grad():
            patches = self.vision_tower(pixel_values, self.vision_feature_layer)
        # Flatten before projecting: a 2-D Linear output is not a view, which FSDP2's hooks need.
        return self.projector(patches.flatten(0, 1).to(self.projector.linear_1.weight.dtype))

    def _check_inputs(self, input_ids, pixel_values, labels=None, attention_mask=None, position_ids=None):
        if input_ids.ndim != 2 or input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids must be int64 [B, S], got {input_ids.dtype} {tuple(input_ids.shape)}")
        for name, value in (("labels", labels), ("attention_mask", attention_mask), ("position_ids", position_ids)):
            if value is not None and value.shape != input_ids.shape:
                raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(value.shape)}")
        if self.validate_inputs:
            found = int((input_ids == self.image_token_id).sum())  # the one host sync of the forward
            num_images = 0 if pixel_values is None else pixel_values.shape[0]
            expected = num_images * self.num_image_tokens
            if found != expected:
                raise ValueError(
                    f"input_ids hold {found} image tokens (id {self.image_token_id}) but pixel_values has "
                    f"{num_images} image(s) x {self.num_image_tokens} tokens = {expected}: every <image> must be "
                    f"expanded to {self.num_image_tokens} image tokens, one placeholder per image"
                )

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token embeddings with image features written at the image-token positions.

        Returns (embeddings [B, S, D], is_visual [B, S], number of visual tokens)."""
        is_visual = input_ids == self.image_token_id
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        num_visual = num_images * self.num_image_tokens
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_visual, 0))  # id may be out of vocab
        if pixel_values is not None:  # also with 0 images: the projector joins the graph (zero gradient)
            visual_rows, _ = split_token_rows(is_visual, num_visual)
            features = self.image_features(pixel_values).to(embeds.dtype)
            embeds = embeds.flatten(0, 1).index_copy(0, visual_rows, features).view_as(embeds)
        return embeds, is_visual, num_visual

    def forward(self, input_ids, labels=None, attention_mask=None, position_ids=None, pixel_values=None,
                cu_seqlens=None, max_seqlen=None, *,
                vittle_alpha: float | None = None, noise_seed: int = 0, noise_offset: int = 0) -> LlavaOutput:
        """One forward pass. ``vittle_alpha`` None = the bottleneck's ``config.alpha`` (a trained
        model's final training alpha); the trainer passes its schedule's value. ``cu_seqlens`` /
        ``max_seqlen``: the collator's attention layout (``Llama.hidden_states``), optional."""
        self._check_inputs(input_ids, pixel_values, labels, attention_mask, position_ids)
        embeds, is_visual, num_visual = self.embed(input_ids, pixel_values)
        hook = None
        if self.bottleneck is not None:
            is_visual, num_visual = self.routed_visual(is_visual, num_visual, attention_mask)
            hook = BottleneckHook(self.bottleneck, is_visual, num_visual,
                                  kl_token_masks(is_visual, labels, attention_mask,
                                                 self.bottleneck.config.kl_text_tokens),
                                  alpha=self._alpha(vittle_alpha), noise_seed=noise_seed, noise_offset=noise_offset)
        hidden = self.language_model.hidden_states(inputs_embeds=embeds, attention_mask=attention_mask,
                                                   position_ids=position_ids, after_layer=hook,
                                                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        zero = hidden.new_zeros((), dtype=torch.float32)
        if labels is not None and self.fused_cross_entropy:
            logits = None
            ce_sum, n_targets = fused_causal_lm_ce_sum(hidden, self.language_model.lm_head.weight, labels, position_ids)
        else:
            logits = self.language_model.lm_head(hidden)
            if labels is None:
                ce_sum, n_targets = zero, torch.zeros((), dtype=torch.int64, device=hidden.device)
            else:
                ce_sum, n_targets = causal_lm_ce_sum(logits, labels, position_ids)
        kl_v = kl_t = vittle_loss = zero
        if hook is not None:
            kl_v, kl_t = hook.kl.get("visual", zero), hook.kl.get("text", zero)
            vittle_loss = self.bottleneck.config.beta_v * kl_v + self.bottleneck.config.beta_t * kl_t
        return LlavaOutput(logits, ce_sum, n_targets, kl_v, kl_t, vittle_loss)

    def routed_visual(self, is_visual: torch.Tensor, num_visual: int,
                      attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """The tokens the bottleneck treats as visual, [B, S], and their (host-known) count.

        ``routing="exact"``: the image tokens. ``"positional"`` (the released code): the first
        images x (P - 1) tokens of each row, counted from its first valid token (left padding is
        skipped) -- the released ``image_seq_len = L - text_tok_length`` per sequence. One sequence per
        row (no packing); a batch whose rows hold different numbers of images is split per row where
        the released code used one batch-wide length."""
        if self.bottleneck.config.routing == "exact":
            return is_visual, num_visual
        patches = self.num_image_tokens
        visual_len = is_visual.sum(1, keepdim=True) // patches * (patches - 1)  # images in the row x (P - 1)
        valid = torch.ones_like(is_visual) if attention_mask is None else attention_mask.bool()
        rank = valid.long().cumsum(1) - 1  # position among the row's valid tokens
        return valid & (rank < visual_len), num_visual // patches * (patches - 1)

    def _alpha(self, vittle_alpha):
        return self.bottleneck.config.alpha if vittle_alpha is None else vittle_alpha

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None, vittle_alpha: float | None = None, temperature: float = 0.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """New tokens [B, max_new_tokens]; prompts of different lengths are left-padded with
        ``attention_mask`` False on the padding (``Llama.generate``). Call ``eval()`` first: in eval mode
        the bottleneck uses the posterior mean with ``vittle_alpha`` (None = ``config.alpha``,
        the final value of the training schedule)."""
        self._check_inputs(input_ids, pixel_values, attention_mask=attention_mask)
        embeds, is_visual, num_visual = self.embed(input_ids, pixel_values)
        hook = None
        if self.bottleneck is not None:
            is_visual, num_visual = self.routed_visual(is_visual, num_visual, attention_mask)
            hook = BottleneckHook(self.bottleneck, is_visual, num_visual, None,
                                  alpha=self._alpha(vittle_alpha), noise_seed=0, noise_offset=0)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                            max_new_tokens=max_new_tokens,
                                            temperature=temperature, eos_token_id=eos_token_id,
                                            generator=generator, use_cache=use_cache, after_layer=hook)
