"""A slim, readable Llama decoder (Llama-2 / Vicuna-v1.5 / Llama-3 family).

Parameter names mirror Hugging Face's ``LlamaForCausalLM`` minus the ``model.`` prefix, and RoPE uses
HF's rotate-half layout, so HF weights load by a key rename with no q/k permutation.

Attention goes through one function, :func:`causal_attention`: flash-attn's varlen kernel when it is
importable and the tensors are on CUDA, else ``scaled_dot_product_attention`` with an explicit
block-diagonal causal mask. Packed sequences are signalled the usual way: ``position_ids`` restart at 0
at the start of every packed sequence (docs/interfaces.md §B); a caller that knows the layout on the
host (the collator) also passes it as flash-attn metadata (:data:`Varlen`), which makes attention
free of host syncs.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# A hook the decoder calls after every layer: (layer_index, hidden [B, S, D], first_position) -> hidden.
# ``first_position`` is the absolute position of hidden[:, 0] (the KV-cache length), so a hook built
# for a whole sequence can find the tokens of the current chunk during cached generation.
LayerHook = Callable[[int, torch.Tensor, int], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Optional fused kernels, discovered once at import
# --------------------------------------------------------------------------------------------
def _import_apex_rms_norm():
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError:
        return None
    return fused_rms_norm_affine


def _import_flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


APEX_RMS_NORM = _import_apex_rms_norm()
FLASH_ATTN_VARLEN = _import_flash_attn_varlen()


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaSettings:
    """The fields of a ``transformers`` decoder config (Llama, Qwen2: see ``families.py``) this
    implementation uses, validated once."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q, k, v and o (Llama's attention_bias)
    qkv_bias: bool  # bias on q, k, v only (Qwen2)
    mlp_bias: bool
    rope_theta: float
    rope_scaling: dict | None

    @classmethod
    def from_hf(cls, config, *, qkv_bias: bool = False) -> "LlamaSettings":
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"text_config.num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"text_config.hidden_act must be 'silu' (SwiGLU), got {config.hidden_act!r}")
        theta, scaling = rope_settings(config)
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            qkv_bias=qkv_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            rope_theta=theta,
            rope_scaling=scaling,
        )


def rope_settings(config) -> tuple[float, dict | None]:
    """``(rope_theta, scaling dict or None)`` from a LlamaConfig of transformers 4.x
    (``rope_theta`` + ``rope_scaling``) or 5.x (``rope_parameters`` holding both)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(params.pop("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise ValueError(f"text_config rope type {rope_type!r} is not supported (use default, linear or llama3)")
    return theta, {**params, "rope_type": rope_type}


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm numerics: normalise in fp32, cast back, then scale."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def select_rms_norm_kernel(apex_kernel, device: torch.device) -> Callable | None:
    """The fused apex kernel when it is installed and the tensor is on CUDA, else None (torch)."""
    return apex_kernel if apex_kernel is not None and device.type == "cuda" else None


class RMSNorm(nn.Module):
    """RMSNorm with apex's fused CUDA kernel when available. ``apex_kernel`` is the seam tests use
    to simulate apex being present or absent."""

    def __init__(self, dim: int, eps: float, apex_kernel: Callable | None = APEX_RMS_NORM):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.apex_kernel = apex_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = select_rms_norm_kernel(self.apex_kernel, x.device)
        if fused is not None:
            return fused(x, self.weight, self.weight.shape, self.eps)
        return rms_norm_torch(x, self.weight, self.eps)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim / 2], with linear or Llama-3 (3.1) frequency scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    smooth = (old_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > old_context / low_freq_factor, inv_freq / factor, inv_freq)
    is_medium = (wavelength >= old_context / high_freq_factor) & (wavelength <= old_context / low_freq_factor)
    return torch.where(is_medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, Dh]; cos/sin [B, S, Dh] (rotate-half layout)."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


# --------------------------------------------------------------------------------------------
# Attention: one dispatch function
# --------------------------------------------------------------------------------------------
def segment_ids_from(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                     shape: tuple[int, int], device: torch.device) -> torch.Tensor | None:
    """Per-token sequence id [B, S] for packed/padded batches: a new segment starts wherever
    ``position_ids`` is 0; padding (``attention_mask`` False) gets -1. None when neither is given
    (plain causal attention, one sequence per row)."""
    if position_ids is None and attention_mask is None:
        return None
    if position_ids is None:
        segments = torch.zeros(shape, dtype=torch.int64, device=device)
    else:
        segments = torch.cumsum(position_ids == 0, dim=-1)
    if attention_mask is not None:
        segments = segments.masked_fill(~attention_mask.bool(), -1)
    return segments


def _sdpa_mask(segment_ids: torch.Tensor | None, query_len: int, key_len: int,
               device: torch.device) -> torch.Tensor | None:
    """Boolean [B or 1, 1, Sq, Sk] mask (True = attend); None when plain causal SDPA suffices.

    Queries are the last ``query_len`` of ``key_len`` positions. A query always sees itself, so padded
    rows stay finite (their outputs are ignored downstream)."""
    offset = key_len - query_len
    if segment_ids is None and offset == 0:
        return None
    query_pos = torch.arange(offset, key_len, device=device)
    key_pos = torch.arange(key_len, device=device)
    allowed = key_pos[None, :] <= query_pos[:, None]
    if segment_ids is None:
        return allowed[None, None]
    query_segments = segment_ids[:, offset:]
    same_segment = query_segments[:, :, None] == segment_ids[:, None, :]
    is_self = key_pos[None, :] == query_pos[:, None]
    allowed = (allowed & same_segment & (segment_ids[:, None, :] >= 0)) | is_self
    return allowed[:, None]


# Packed-attention metadata in flash-attn's varlen layout: ``(cu_seqlens, max_seqlen)``. The [B, S]
# batch is flattened to B*S tokens and cut into consecutive segments -- each row's packed sequences,
# then its padding run (a segment of its own) -- ``cu_seqlens`` int32 [n + 1] holding their offsets
# and ``max_seqlen`` the longest (a host int). Covering the padding lets the kernel take the flat
# q/k/v as they are: no gather of valid tokens, no scatter back, no host sync. The collator builds it
# on the host (``vittle_fast.data.collate``); :func:`varlen_from_segment_ids` derives it otherwise.
Varlen = tuple[torch.Tensor, int]


def select_flash_varlen(device: torch.device) -> Callable | None:
    """flash-attn's varlen kernel when it is installed and the tensors are on CUDA, else None (SDPA).
    The seam tests use to run the varlen path with a stand-in kernel on the CPU."""
    return FLASH_ATTN_VARLEN if FLASH_ATTN_VARLEN is not None and device.type == "cuda" else None


def varlen_from_segment_ids(segment_ids: torch.Tensor | None, shape: tuple[int, int],
                            device: torch.device) -> Varlen:
    """The varlen metadata of a [B, S] batch from :func:`segment_ids_from` (a new segment wherever the
    id changes within a row, and at every row start). Two host syncs (the boundary positions and the
    longest segment): call it once per forward, and only when the caller has no metadata."""
    batch, seq = shape
    if segment_ids is None:
        return torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=device), seq
    starts = F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (1, 0), value=True).flatten()
    cu_seqlens = F.pad(starts.nonzero().squeeze(1), (0, 1), value=batch * seq).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max()) if batch * seq else 0


def segment_ids_from_varlen(cu_seqlens: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Per-token segment index [B, S] of varlen metadata, for the SDPA block mask (sync-free)."""
    tokens = torch.arange(shape[0] * shape[1], dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens, tokens, right=True) - 1).view(shape)


def check_varlen(cu_seqlens: torch.Tensor | None, max_seqlen: int | None, device: torch.device) -> Varlen | None:
    """``(cu_seqlens, max_seqlen)`` after checking them (the totals are not checked: that needs a sync)."""
    if (cu_seqlens is None) != (max_seqlen is None):
        raise ValueError("pass cu_seqlens and max_seqlen together (or neither)")
    if cu_seqlens is None:
        return None
    if cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be 1-D int32 on {device}, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)} on {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a host int >= 0, got {max_seqlen!r}")
    return cu_seqlens, max_seqlen


def _flash_varlen_attention(q, k, v, varlen: Varlen, scale, varlen_fn) -> torch.Tensor:
    """flash-attn's varlen kernel on the flat [B*S] tokens, cut into segments by ``varlen``."""
    batch, seq, heads, dim = q.shape
    cu_seqlens, max_seqlen = varlen
    out = varlen_fn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, cu_seqlens, max_seqlen,
                    max_seqlen, softmax_scale=scale, causal=True)
    return out.view(batch, seq, heads, dim)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     segment_ids: torch.Tensor | None = None, *, varlen: Varlen | None = None,
                     flash_varlen: Callable | None = None) -> torch.Tensor:
    """Causal (grouped-query) attention for packed/padded batches.

    q [B, Sq, Hq, Dh]; k, v [B, Sk, Hkv, Dh] with Hq % Hkv == 0; queries are the last Sq of the Sk
    positions (Sq < Sk during cached generation). ``segment_ids`` [B, Sk] from
    :func:`segment_ids_from` (or :func:`segment_ids_from_varlen`); ``varlen`` the same layout as
    flash-attn metadata. ``flash_varlen`` (a ``flash_attn_varlen_func``) is used when given and
    Sq == Sk, with ``varlen`` (derived from ``segment_ids`` when missing). Returns [B, Sq, Hq, Dh].
    """
    scale = q.shape[-1] ** -0.5
    if flash_varlen is not None and q.shape[1] == k.shape[1]:
        if varlen is None:
            varlen = varlen_from_segment_ids(segment_ids, q.shape[:2], q.device)
        return _flash_varlen_attention(q, k, v, varlen, scale, flash_varlen)
    mask = _sdpa_mask(segment_ids, q.shape[1], k.shape[1], q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=mask is None and q.shape[1] > 1, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------
class KVCache:
    """Preallocated per-layer keys/values [layers, B, max_len, Hkv, Dh]; ``length`` tokens are filled."""

    def __init__(self, settings: LlamaSettings, batch: int, max_len: int, dtype, device):
        shape = (settings.num_layers, batch, max_len, settings.num_kv_heads, settings.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's k/v after the cached ones; return every key/value up to the chunk end."""
        end = self.length + k.shape[1]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} tokens, {end} requested")
        self.keys[layer, :, self.length:end] = k
        self.values[layer, :, self.length:end] = v
        return self.keys[layer, :, :end], self.values[layer, :, :end]


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, s: LlamaSettings, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        qkv_bias = s.attention_bias or s.qkv_bias
        self.q_proj = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=s.attention_bias)

    def forward(self, x, cos, sin, segment_ids, kv_cache: KVCache | None, varlen: Varlen | None = None):
        batch, seq, _ = x.shape
        q = apply_rope(self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_index, k, v)
        out = causal_attention(q, k, v, segment_ids, varlen=varlen, flash_varlen=select_flash_varlen(q.device))
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, s: LlamaSettings):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=s.mlp_bias)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=s.mlp_bias)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=s.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, s: LlamaSettings, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = Attention(s, layer_index)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = SwiGLU(s)

    def forward(self, x, cos, sin, segment_ids, kv_cache=None, varlen=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, kv_cache, varlen)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Decoder-only Llama built from a ``transformers.LlamaConfig``.

    ``forward(input_ids)`` -> logits [B, S, V]. Optional: ``inputs_embeds`` instead of ids,
    ``attention_mask`` [B, S] bool (padding), ``position_ids`` [B, S] (restarting at 0 = packed
    sequences), ``kv_cache`` (cached generation), ``after_layer`` (a :data:`LayerHook`, e.g. Vittle's
    bottleneck).
    """

    def __init__(self, config, settings: LlamaSettings | None = None):
        """``settings`` come from the config's model family (``families.build_text_model``); without
        them the config must be a Llama one."""
        super().__init__()
        if settings is None and getattr(config, "model_type", "llama") != "llama":
            raise ValueError(f"a {config.model_type!r} config: build the decoder with "
                             "vittle_fast.models.families.build_text_model(config)")
        self.config = config
        self.settings = s = settings or LlamaSettings.from_hf(config)
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s, i) for i in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_inv_freq", torch.empty(s.head_dim // 2), persistent=False)
        self.reset_buffers()

    def tie_weights(self) -> None:
        """Share the embedding with ``lm_head`` when the config ties them (again after ``to_empty``)."""
        if self.settings.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_buffers(self) -> None:
        """(Re)compute the RoPE frequencies, e.g. after ``to_empty`` of a model built on the meta device."""
        inv_freq = rope_inverse_frequencies(self.settings.head_dim, self.settings.rope_theta,
                                            self.settings.rope_scaling)
        self.rope_inv_freq = inv_freq.to(self.rope_inv_freq.device)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, Dh] for integer positions [B, S] (angles in fp32, as HF)."""
        angles = position_ids[..., None].float() * self.rope_inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        after_layer: LayerHook | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, kv_cache=kv_cache, after_layer=after_layer,
                                    cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.lm_head(hidden)

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                      kv_cache=None, after_layer=None, cu_seqlens=None, max_seqlen=None) -> torch.Tensor:
        """Final-norm hidden states [B, S, D] (the input of ``lm_head``).

        ``cu_seqlens``/``max_seqlen`` (see :data:`Varlen`; the collator puts them in the batch) describe
        the packed/padded layout for attention -- both the flash-attn varlen kernel and the SDPA block
        mask then come from them, with no host sync; ``attention_mask`` and ``position_ids`` no longer
        shape attention (RoPE still uses ``position_ids``). Without them the layout is derived from
        ``position_ids``/``attention_mask`` once per forward (two syncs on the flash-attn path)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = hidden.shape[:2]
        start = 0 if kv_cache is None else kv_cache.length
        if attention_mask is not None and attention_mask.shape != (batch, start + seq):
            raise ValueError(f"attention_mask must be [B, cached + new tokens] = {(batch, start + seq)}, "
                             f"got {tuple(attention_mask.shape)}")
        varlen = check_varlen(cu_seqlens, max_seqlen, hidden.device)
        if varlen is not None and kv_cache is not None:
            raise ValueError("cu_seqlens/max_seqlen are not supported with a KV cache")
        if varlen is not None:
            segment_ids = segment_ids_from_varlen(varlen[0], (batch, seq))
            if position_ids is None:  # each segment counts from 0
                starts = varlen[0].long().index_select(0, segment_ids.flatten()).view(batch, seq)
                position_ids = torch.arange(batch * seq, device=hidden.device).view(batch, seq) - starts
        elif position_ids is None or kv_cache is not None:
            # With a KV cache, position_ids (if given) are the chunk's RoPE positions -- e.g. shifted
            # by left padding -- not packing boundaries: one sequence per row, padding from the mask.
            if position_ids is None:
                position_ids = torch.arange(start, start + seq, device=hidden.device).expand(batch, seq)
            segment_ids = segment_ids_from(None, attention_mask, (batch, start + seq), hidden.device)
        else:
            segment_ids = segment_ids_from(position_ids, attention_mask, (batch, seq), hidden.device)
        if varlen is None and start == 0 and select_flash_varlen(hidden.device) is not None:
            varlen = varlen_from_segment_ids(segment_ids, (batch, seq), hidden.device)  # once, not per layer
        cos, sin = self.rope(position_ids, hidden.dtype)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, segment_ids, kv_cache, varlen)
            if after_layer is not None:
                hidden = after_layer(index, hidden, start)
        if kv_cache is not None:
            kv_cache.length += seq
        return self.norm(hidden)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int,
        temperature: float = 0.0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        after_layer: LayerHook | None = None,
    ) -> torch.Tensor:
        """Greedy (``temperature=0``) or temperature sampling for a batch of prompts.

        Prompts of different lengths are left-padded: ``attention_mask`` [B, P] is False on the
        padding, which then is never attended to and shifts no RoPE position (each row counts from
        its first real token), so a row's tokens are those it would get alone.
        Returns the new tokens [B, max_new_tokens]; after a row emits ``eos_token_id`` it keeps
        emitting it (and decoding stops once every row has). ``use_cache=False`` re-runs the whole
        sequence each step (the reference the cached path is tested against).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        prompt = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, prompt_len = prompt.shape[:2]
        mask = positions = step_positions = None
        if attention_mask is not None:
            if attention_mask.shape != (batch, prompt_len):
                raise ValueError(f"attention_mask must be [B, P] = {(batch, prompt_len)}, got {tuple(attention_mask.shape)}")
            mask = attention_mask.bool()
            positions = step_positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = None
        if use_cache:
            cache = KVCache(self.settings, batch, prompt_len + max_new_tokens, prompt.dtype, prompt.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
        new_tokens = []
        step_input = prompt
        for _ in range(max_new_tokens):
            hidden = self.hidden_states(inputs_embeds=step_input, attention_mask=mask, position_ids=step_positions,
                                        kv_cache=cache, after_layer=after_layer)
            token = self._pick(self.lm_head(hidden[:, -1]).float(), temperature, generator)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            new_tokens.append(token)
            if len(new_tokens) == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                break
            token_embeds = self.embed_tokens(token[:, None])
            step_input = token_embeds if use_cache else torch.cat((step_input, token_embeds), dim=1)
            if mask is not None:
                mask = F.pad(mask, (0, 1), value=True)
                positions = torch.cat((positions, positions[:, -1:] + 1), dim=1)
                step_positions = positions[:, -1:] if use_cache else positions
        out = torch.stack(new_tokens, dim=1)
        if out.shape[1] < max_new_tokens:  # every row finished: the rest is eos
            out = F.pad(out, (0, max_new_tokens - out.shape[1]), value=eos_token_id)
        return out

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
