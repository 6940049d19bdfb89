"""Triton backend of the fused ops (launcher interface: docs/interfaces.md §A).

Importing this package never fails: without triton, ``is_available()`` is False and
``load_error()`` says why. The kernels are decorated when this package is imported, so
``TRITON_INTERPRET=1`` (to run them on CPU tensors) must be set before that.
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401  (absolute import: the triton package, not this one)
except ImportError as exc:  # no Linux wheel, broken install, ...
    _IMPORT_ERROR = f"triton is not importable: {exc}"
else:
    _IMPORT_ERROR = ""
    from . import vib_bottleneck, vib_sample_kl  # noqa: F401  (one launcher module per op)


def is_available() -> bool:
    """Triton imports and can run here: on CUDA tensors, or on CPU tensors under the interpreter."""
    return not _IMPORT_ERROR and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def load_error() -> str:
    """Why ``is_available()`` is False ("" when it is True)."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if not is_available():
        return "no CUDA device and TRITON_INTERPRET=1 is not set (set it before importing triton)"
    return ""
