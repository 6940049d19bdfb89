"""Fused Vittle ops. ``vib_sample_kl`` is the public contract (docs/DESIGN.md §2)."""
from .vib_sample_kl import available_backends, vib_sample_kl

__all__ = ["available_backends", "vib_sample_kl"]
