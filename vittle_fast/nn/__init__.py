"""Modules built on the fused ops."""
from .bottleneck import VittleBottleneck, VittleConfig

__all__ = ["VittleBottleneck", "VittleConfig"]
