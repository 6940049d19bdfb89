"""CLIP ViT vision tower (OpenAI CLIP: pre-LN blocks, quick-GELU, class token, learned positions).

Parameter names mirror Hugging Face's ``CLIPVisionModel`` without the ``vision_model.`` prefix
(including HF's spelling ``pre_layrnorm``), so loading is a prefix rename. LLaVA reads the patch
tokens of one hidden layer, so :meth:`CLIPVisionTower.forward` stops after that layer instead of
running the whole tower.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPEmbeddings(nn.Module):
    def __init__(self, hidden_size: int, image_size: int, patch_size: int, num_channels: int):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.class_embedding = nn.Parameter(torch.randn(hidden_size))
        self.patch_embedding = nn.Conv2d(num_channels, hidden_size, patch_size, stride=patch_size, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + 1, hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values must be {self.image_size}x{self.image_size} images (no position-embedding "
                f"interpolation), got {tuple(pixel_values.shape[-2:])}"
            )
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [N, P, D]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat((cls, patches), dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = (proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # bidirectional
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    """CLIP ViT built from a ``transformers.CLIPVisionConfig``.

    ``post_layernorm`` only pools the class token in CLIP's contrastive head; LLaVA never uses it. It is
    kept so a loaded checkpoint saves back complete.
    """

    def __init__(self, config):
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act must be one of {sorted(_ACTIVATIONS)}, got {config.hidden_act!r}")
        self.config = config
        self.embeddings = CLIPEmbeddings(config.hidden_size, config.image_size, config.patch_size,
                                         config.num_channels)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def forward(self, pixel_values: torch.Tensor, feature_layer: int = -2, *, keep_cls: bool = False) -> torch.Tensor:
        """Hidden states of ``feature_layer`` [N, P, D] (patch tokens; [N, 1 + P, D] with ``keep_cls``).

        ``feature_layer`` indexes like HF's ``hidden_states`` tuple: 0 = embeddings after the pre-LN,
        k = output of the k-th block, negatives count from the end (-1 = last block, -2 = LLaVA's).
        """
        num_layers = len(self.encoder.layers)
        if not -(num_layers + 1) <= feature_layer <= num_layers:
            raise ValueError(f"feature_layer must be in [{-(num_layers + 1)}, {num_layers}], got {feature_layer}")
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be [N, C, H, W], got shape {tuple(pixel_values.shape)}")
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[: feature_layer % (num_layers + 1)]:
            hidden = layer(hidden)
        return hidden if keep_cls else hidden[:, 1:]
