"""LLaVA-1.5 image preprocessing with Pillow: pad to square, resize, rescale, normalise.

LLaVA-1.5 pads every image to a square with the CLIP mean colour before handing it to CLIP's
processor (shortest edge -> ``image_size`` bicubic, centre crop, ``/255``, ``(x - mean) / std``).
After the padding the crop is a no-op, so the whole pipeline is pad -> resize -> normalise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .errors import check_int

# OpenAI CLIP statistics (the values CLIPImageProcessor ships with).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Centre ``image`` on a square canvas of its longer side, as LLaVA's ``expand2square``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess_image(
    image: Image.Image,
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Return the normalised ``[3, image_size, image_size]`` float32 tensor of ``image``.

    The padding colour is ``int(mean * 255)`` per channel, exactly as LLaVA-1.5 computes it, so a
    padded border normalises to (almost) zero rather than to a strong signal.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    check_int("image_size", image_size)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 entries, got {len(mean)} and {len(std)}")
    rgb = image.convert("RGB")
    square = pad_to_square(rgb, tuple(int(m * 255) for m in mean))
    resized = square.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) * np.float32(1.0 / 255.0)
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
