"""Fused Vittle ops. ``vib_sample_kl`` is the public contract (docs/DESIGN.md §2); ``vib_bottleneck``
and ``vib_bottleneck_grouped`` are the whole bottleneck as one op (§2b); ``fused_linear_cross_entropy``
is the chunked LM head + loss over target tokens (docs/training.md)."""
from .backends import available_backends
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .vib_bottleneck import vib_bottleneck, vib_bottleneck_grouped
from .vib_sample_kl import vib_sample_kl

__all__ = ["available_backends", "fused_linear_cross_entropy", "vib_bottleneck", "vib_bottleneck_grouped",
           "vib_sample_kl"]
