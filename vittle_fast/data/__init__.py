"""LLaVA conversation data, image preprocessing, collator and sampler.

The demo generator lives in ``vittle_fast.data.demo`` (not imported here, so that
``python -m vittle_fast.data.demo`` runs it cleanly).
"""

from .collate import LlavaCollator
from .conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, TEMPLATES, VICUNA_V1_SYSTEM
from .dataset import LlavaDataset, Sample, Skipped
from .errors import SKIP_KINDS, BadRecordError
from .image import CLIP_MEAN, CLIP_STD, preprocess_image
from .sampler import LengthGroupedSampler

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IGNORE_INDEX", "IMAGE_PLACEHOLDER", "SKIP_KINDS", "TEMPLATES",
    "VICUNA_V1_SYSTEM", "BadRecordError", "LengthGroupedSampler", "LlavaCollator",
    "LlavaDataset", "Sample", "Skipped", "preprocess_image",
]
