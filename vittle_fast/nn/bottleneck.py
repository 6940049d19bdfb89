"""Vittle's information bottleneck as a module: two per-modality MLPs, priors, the fused op, KL means.

The module works on flat token rows: the caller (``LlavaVittle``) flattens the hidden state to
[B*S, D] and gives, per modality, the row indices of its tokens and a boolean mask saying which of them
count in the KL. With ``VittleConfig.fused_mlp`` (the default) both methods are one call of the fused
``vib_bottleneck_grouped`` op, which gathers the rows inside its GEMM and writes ``z_hat`` straight to
them: no row permutation copies and no ``stats`` tensor. The unfused path, kept for comparison:
``forward`` (one modality) gathers its tokens with ``index_select`` and writes them back with an
out-of-place ``index_copy``; ``forward_both`` (both modalities at the same layer) permutes all rows
once into [visual | text] order and once back, then runs ``nn.Sequential`` + ``vib_sample_kl``.

Host syncs: none. Index lists have host-known lengths (see :func:`split_token_rows`), the KL means
divide by a clamped on-device count, and an empty modality runs the MLP on zero rows, so its
parameters still join the graph with a zero gradient (FSDP needs every parameter to get a gradient).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vittle_fast.ops import vib_bottleneck_grouped, vib_sample_kl

MODALITIES = ("visual", "text")
BOTH = "both"  # ``VittleBottleneck.forward``'s modality for both at once (they follow the same layer)
_SUFFIX = {"visual": "v", "text": "t"}
# Calls of one step draw noise at offsets ``noise_offset + (call_index << NOISE_CALL_SHIFT)`` (DESIGN §5).
NOISE_CALL_SHIFT = 38
NOISE_CALL_INDEX = {"visual": 0, "text": 1}


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class VittleConfig:
    """Where and how strongly the bottleneck acts (docs/DESIGN.md §1).

    ``layer_v`` / ``layer_t`` are 0-based decoder-layer indices: the bottleneck transforms the output
    of ``layers[layer_v]`` (visual tokens) and ``layers[layer_t]`` (text tokens), as the released
    code's ``bottleneck_layeridx_*="layer-24"`` does.
    """

    # Each field's ``help`` is also its ``--vittle.<name>`` help in the trainer, whose config section reuses
    # these fields, types, defaults and this validation (train/config.py).
    layer_v: int = field(metadata={"help": "0-based decoder block whose output the visual bottleneck transforms"})
    layer_t: int = field(metadata={"help": "same for text tokens"})
    beta_v: float = _opt(0.1, "weight of the visual KL (mean over tokens and dims)")
    beta_t: float = _opt(0.1, "weight of the text KL")
    prior: Literal["fixed", "learnable"] = _opt("fixed", "Vittle (F): N(0, I); Vittle (L): learnable mean/log-variance")
    kl_form: Literal["standard", "released"] = _opt("standard", "Eq. 8, or the released code's KL (log-variance "
                                                    "terms halved)")
    kl_text_tokens: Literal["prompt", "all"] = _opt("prompt", "text tokens in the text KL: prompt (label ignored) "
                                                    "or all")
    logvar_clamp: tuple[float, float] | None = _opt((-2.3025, 2.3025), "[lo, hi] clamp of log-variances "
                                                    "(straight-through); null = off")
    backend: str = _opt("auto", "vib_sample_kl backend: auto | triton | cpp | reference")
    # Which tokens count as visual. "exact": the image tokens themselves (where features were spliced).
    # "positional": the released code's split, for evaluating released checkpoints the released way:
    # ``image_seq_len = L - text_tok_length`` (L: length after expanding each <image> placeholder into P
    # tokens, text_tok_length: before), i.e. each sequence's first images x (P - 1) tokens are "visual"
    # -- the system prompt included -- and the rest, the last image tokens included, are "text".
    routing: Literal["exact", "positional"] = _opt("exact", "visual tokens: the image tokens (exact) or the "
                                                   "released code's positional split (first images x (P-1) tokens)")
    # The alpha a trained model runs with: the final value of its training schedule (the trainer stores
    # it in the export); ``LlavaVittle.forward`` and ``generate`` default to it.
    alpha: float = _opt(0.5, "alpha of a trained model (inference): its schedule's final value")
    fused_mlp: bool = _opt(True, "the whole bottleneck as one fused op; false: nn.Sequential + vib_sample_kl")

    def __post_init__(self):
        for name in ("layer_v", "layer_t"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"VittleConfig.{name} must be an int >= 0, got {value!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"VittleConfig.alpha must be in [0, 1], got {self.alpha}")
        for name in ("beta_v", "beta_t"):
            if getattr(self, name) < 0:
                raise ValueError(f"VittleConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name, hint in typing.get_type_hints(VittleConfig).items():
            allowed = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
            if allowed and getattr(self, name) not in allowed:
                raise ValueError(f"VittleConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.logvar_clamp is not None:
            low, high = self.logvar_clamp
            if not low < high:
                raise ValueError(f"VittleConfig.logvar_clamp must be (low, high) with low < high, got {self.logvar_clamp}")
            self.logvar_clamp = (float(low), float(high))

    def layer_of(self, modality: str) -> int:
        return self.layer_v if modality == "visual" else self.layer_t

    def modalities_after(self, layer_index: int) -> tuple[str, ...]:
        """The modalities whose bottleneck acts on the output of decoder layer ``layer_index``."""
        return tuple(m for m in MODALITIES if self.layer_of(m) == layer_index)


def token_order(is_visual: torch.Tensor) -> torch.Tensor:
    """All flat row indices, the visual tokens' first, each part in sequence order (a stable sort)."""
    return torch.argsort(is_visual.flatten().to(torch.int8), descending=True, stable=True)


def split_token_rows(is_visual: torch.Tensor, num_visual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices of the visual tokens and of all other tokens, both in sequence order.

    ``num_visual`` must be the number of True entries (LLaVA knows it on the host: images x patches),
    which makes the split sync-free: ``token_order``'s first ``num_visual`` rows are the visual ones.
    """
    order = token_order(is_visual)
    return order[:num_visual], order[num_visual:]


def _bottleneck_mlp(d: int) -> nn.Sequential:
    """Linear(d, d) -> GELU (erf) -> Linear(d, 2d): outputs [mu, log sigma^2]."""
    return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 2 * d))


class VittleBottleneck(nn.Module):
    """Per-modality stochastic bottleneck. Parameters: ``mlp_v``, ``mlp_t`` and, for a learnable
    prior, ``prior_mu_v``, ``prior_logvar_v``, ``prior_mu_t``, ``prior_logvar_t`` ([d], zero init)."""

    def __init__(self, hidden_size: int, config: VittleConfig):
        super().__init__()
        if not isinstance(config, VittleConfig):
            raise TypeError(f"config must be a VittleConfig, got {type(config).__name__}")
        self.config = config
        self.mlp_v = _bottleneck_mlp(hidden_size)
        self.mlp_t = _bottleneck_mlp(hidden_size)
        for suffix in _SUFFIX.values():
            for name in (f"prior_mu_{suffix}", f"prior_logvar_{suffix}"):
                param = nn.Parameter(torch.zeros(hidden_size)) if config.prior == "learnable" else None
                self.register_parameter(name, param)

    def reset_parameters(self) -> None:
        """Fresh initialisation: default ``nn.Linear`` init for the MLPs, zero priors."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        for param in self.parameters(recurse=False):
            nn.init.zeros_(param)

    def mlp(self, modality: str) -> nn.Sequential:
        return getattr(self, f"mlp_{_SUFFIX[modality]}")

    def prior(self, modality: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        suffix = _SUFFIX[modality]
        return getattr(self, f"prior_mu_{suffix}"), getattr(self, f"prior_logvar_{suffix}")

    def forward(
        self,
        hidden: torch.Tensor,
        modality: str,
        rows: torch.Tensor,
        kl_mask: torch.Tensor | dict[str, torch.Tensor],
        *,
        alpha: float,
        noise_seed: int,
        noise_offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
        """Bottleneck the ``rows`` of ``hidden`` [N, D] that belong to ``modality``.

        Args:
            hidden: flat token hidden states [N, D].
            modality: ``"visual"`` or ``"text"`` (picks the MLP, the prior and the noise stream), or
                ``"both"``: :meth:`forward_both` through the module's ``__call__`` (so FSDP's hooks of
                the unit holding the bottleneck run as for any module), with ``rows`` its ``order`` and
                ``kl_mask`` its ``kl_masks``; the KL then comes back as ``{modality: KL mean}``.
            rows: int64 [n] row indices of this modality's tokens.
            kl_mask: bool [n]: which of those tokens the KL mean runs over.
            alpha: interpolation weight in [0, 1]; noise_seed / noise_offset: the step's Philox stream.

        Returns:
            ``(hidden with the rows replaced, KL mean over the masked tokens (fp32, 0 when none))``.
            Eval mode uses the posterior mean (no noise).
        """
        noise = dict(alpha=alpha, noise_seed=noise_seed, noise_offset=noise_offset)
        if modality == BOTH:
            if not isinstance(kl_mask, dict):
                raise TypeError(f'modality="both" takes kl_mask as {{modality: mask}}, got {type(kl_mask).__name__}')
            return self._both(hidden, rows, kl_mask["visual"].numel(), kl_mask, **noise)
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if hidden.ndim != 2:
            raise ValueError(f"hidden must be flat token rows [N, D], got shape {tuple(hidden.shape)}")
        if self.config.fused_mlp:
            out, (kl_mean,) = self._fused(hidden, rows, {modality: kl_mask}, alpha, noise_seed, noise_offset)
            return out, kl_mean
        z_hat, kl_mean = self._transform(hidden.index_select(0, rows), modality, kl_mask, alpha, noise_seed,
                                         noise_offset)
        return hidden.index_copy(0, rows, z_hat), kl_mean

    def forward_both(
        self,
        hidden: torch.Tensor,
        order: torch.Tensor,
        num_visual: int,
        kl_masks: dict[str, torch.Tensor],
        *,
        alpha: float,
        noise_seed: int,
        noise_offset: int = 0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Both modalities at once, when they share a layer: the same result as ``forward`` for the
        visual rows ``order[:num_visual]`` and then for the text rows ``order[num_visual:]``.

        ``order`` is a permutation of all ``N`` rows, visual rows first (``split_token_rows``);
        ``kl_masks[modality]`` follows the modality's rows. Why: two ``forward`` calls copy the whole
        hidden state four times (an out-of-place ``index_copy`` each way per call) and scatter the
        gradients into zero-filled buffers; here one permutation gathers the rows (the two modalities
        are then contiguous views) and each transformed row is written once into a fresh output.

        Returns ``(hidden with every row transformed, {modality: KL mean})``. A call of this method
        bypasses the module's hooks; ``module(hidden, "both", order, kl_masks, ...)`` runs them.
        """
        return self._both(hidden, order, num_visual, kl_masks, alpha=alpha, noise_seed=noise_seed,
                          noise_offset=noise_offset)

    def _both(self, hidden, order, num_visual, kl_masks, *, alpha, noise_seed, noise_offset):
        if hidden.ndim != 2 or order.shape != hidden.shape[:1]:
            raise ValueError(f"order {tuple(order.shape)} must list every row of hidden {tuple(hidden.shape)}")
        if not 0 <= num_visual <= order.numel():
            raise ValueError(f"num_visual must be in [0, {order.numel()}], got {num_visual}")
        split = [num_visual, order.numel() - num_visual]
        if self.config.fused_mlp:
            out, kl_means = self._fused(hidden, order, dict(zip(MODALITIES, split)), alpha, noise_seed, noise_offset,
                                        kl_masks)
            return out, dict(zip(MODALITIES, kl_means))
        tokens = _PermuteRows.apply(hidden, order, inverse_permutation(order))
        out = torch.empty_like(hidden)  # every row is written below, each exactly once
        kl_means = {}
        for modality, part, rows in zip(MODALITIES, tokens.split(split), order.split(split)):
            z_hat, kl_means[modality] = self._transform(part, modality, kl_masks[modality], alpha, noise_seed,
                                                        noise_offset)
            out.index_copy_(0, rows, z_hat)  # back in place of the tokens it replaces; grad: one gather
        return out, kl_means

    def _fused(self, hidden, order, groups, alpha, noise_seed, noise_offset, kl_masks=None):
        """One ``vib_bottleneck_grouped`` call for the modalities in ``groups`` (modality -> row count;
        their rows are consecutive in ``order``): ``(hidden with the rows transformed, [KL means])``.
        ``kl_masks`` defaults to ``groups``' values when those are the masks (single modality)."""
        if kl_masks is None:
            kl_masks, groups = groups, {m: mask.numel() for m, mask in groups.items()}
        for modality, size in groups.items():
            if kl_masks[modality].shape != (size,):
                raise ValueError(f"{modality} rows ({size}) and kl_mask {tuple(kl_masks[modality].shape)} must match")
        weights = [(mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias) for mlp in map(self.mlp, groups)]
        priors = [None if self.config.prior == "fixed" else self.prior(m) for m in groups]
        out, kl = vib_bottleneck_grouped(
            hidden, order, list(groups.values()), weights, alpha, seed=noise_seed,
            offsets=[noise_offset + (NOISE_CALL_INDEX[m] << NOISE_CALL_SHIFT) for m in groups], priors=priors,
            logvar_clamp=self.config.logvar_clamp, kl_form=self.config.kl_form, sample=self.training,
            backend=self.config.backend,
        )
        return out, [_masked_mean(part, kl_masks[m]) for m, part in zip(groups, kl.split(list(groups.values())))]

    def _transform(self, tokens, modality, kl_mask, alpha, noise_seed, noise_offset):
        """MLP + fused op on one modality's gathered tokens: ``(z_hat, KL mean over kl_mask)``."""
        if tokens.shape[:1] != kl_mask.shape:
            raise ValueError(f"{modality} rows ({tokens.shape[0]}) and kl_mask {tuple(kl_mask.shape)} must match")
        prior_mu, prior_logvar = self.prior(modality)
        z_hat, kl = vib_sample_kl(
            tokens,
            self.mlp(modality)(tokens),
            alpha,
            seed=noise_seed,
            offset=noise_offset + (NOISE_CALL_INDEX[modality] << NOISE_CALL_SHIFT),
            prior_mu=prior_mu,
            prior_logvar=prior_logvar,
            logvar_clamp=self.config.logvar_clamp,
            kl_form=self.config.kl_form,
            sample=self.training,
            backend=self.config.backend,
        )
        return z_hat, _masked_mean(kl, kl_mask)


def _masked_mean(kl: torch.Tensor, kl_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``kl`` over ``kl_mask`` (0 when none), without a host sync."""
    kl_sum = torch.where(kl_mask, kl, 0.0).sum()  # where, not a product: padding rows may hold anything
    return kl_sum / kl_mask.sum().clamp(min=1).to(kl.dtype)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``inverse`` with ``inverse[order[i]] = i`` (a scatter, no sort, no host sync)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


class _PermuteRows(torch.autograd.Function):
    """``x.index_select(0, order)`` for a permutation ``order`` with inverse ``inverse``: its gradient is
    a gather by ``inverse``, one pass, instead of autograd's zero-fill + ``index_add`` for a general index."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None
