"""Slim Llama, CLIP ViT tower, LLaVA assembly with the Vittle bottleneck, Hugging Face interop."""
from .clip import CLIPVisionTower
from .families import FAMILIES, build_text_model, family_of
from .hf import clip_from_hf, llama_from_hf, llava_from_hf, save_pretrained, text_model_from_hf
from .llama import KVCache, Llama
from .llava import LlavaOutput, LlavaVittle, MultimodalProjector

__all__ = [
    "CLIPVisionTower", "KVCache", "Llama", "LlavaOutput", "LlavaVittle", "MultimodalProjector",
    "FAMILIES", "build_text_model", "clip_from_hf", "family_of", "llama_from_hf", "llava_from_hf", "save_pretrained",
    "text_model_from_hf",
]
