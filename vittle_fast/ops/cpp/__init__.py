"""The compiled C++ (CPU) / CUDA backend: loads the extension; one launcher module per op
(``vib_sample_kl``, ``vib_bottleneck``), as every backend package (ops/backends.py, docs/ops.md).

The kernels live in the extension ``vittle_fast._C`` (built by ``setup.py`` from ``csrc/``), which
registers the ``torch.ops.vittle_fast.*`` ops of ``_OPS``. Importing this package never fails: when
the extension is missing, ``is_available()`` is False and ``load_error()`` says why and how to build
it. ``VITTLE_FAST_OPS_LIBRARY=/path/to/lib.so`` loads a library built by CMake instead.
"""
from __future__ import annotations

import os

import torch

from ..scalars import split_scalar

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) "
    "from the repository root; a C++17 compiler is needed, plus nvcc for the CUDA kernel"
)
_FWD_OP = "vittle_fast::fused_sample_kl_fwd"
_OPS = ("fused_sample_kl_fwd", "fused_sample_kl_bwd", "vib_bottleneck_fwd", "vib_bottleneck_bwd")


def _load() -> str:
    """Load the extension once; return '' on success or the reason it cannot be used."""
    library = os.environ.get("VITTLE_FAST_OPS_LIBRARY")
    try:
        if library:
            torch.ops.load_library(library)
        else:
            from ... import _C  # noqa: F401  (importing it registers the ops)
    except (ImportError, OSError) as exc:
        source = library or "vittle_fast._C"
        return f"the C++ extension ({source}) could not be loaded: {exc}; {_BUILD_HINT}"
    missing = [op for op in _OPS if not hasattr(torch.ops.vittle_fast, op)]
    if missing:  # e.g. a build older than the sources
        return f"the C++ extension loaded but did not register {missing}; rebuild it: {_BUILD_HINT}"
    return ""


_LOAD_ERROR = _load()


def is_available() -> bool:
    """True when the compiled ops are registered (at least the CPU kernel)."""
    return not _LOAD_ERROR


def load_error() -> str:
    """Why the extension is unavailable ('' when it is available)."""
    return _LOAD_ERROR


def has_cuda() -> bool:
    """True when the extension was built with its CUDA kernel."""
    return is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(_FWD_OP, "CUDA")


def schema_scalars(alpha, seed, offset) -> tuple:
    """The C++ schema's ``alpha, seed, offset, alpha_t, seed_t, offset_t`` (ops/scalars.py)."""
    (alpha, alpha_t), (seed, seed_t), (offset, offset_t) = map(split_scalar, (alpha, seed, offset))
    return float(alpha), seed, offset, alpha_t, seed_t, offset_t


from . import vib_bottleneck, vib_sample_kl  # noqa: E402  (the launchers use the helpers above)
