"""Slim Llama, CLIP ViT tower, LLaVA assembly with the Vittle bottleneck, Hugging Face interop."""
from .clip import CLIPVisionTower
from .hf import clip_from_hf, llama_from_hf, llava_from_hf, save_pretrained
from .llama import KVCache, Llama
from .llava import LlavaOutput, LlavaVittle, MultimodalProjector

__all__ = [
    "CLIPVisionTower", "KVCache", "Llama", "LlavaOutput", "LlavaVittle", "MultimodalProjector",
    "clip_from_hf", "llama_from_hf", "llava_from_hf", "save_pretrained",
]
