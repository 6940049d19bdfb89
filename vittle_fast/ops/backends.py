"""The backend registry of the fused ops: which backends exist, where each runs, how it is loaded.

Every backend except ``reference`` is a package with one launcher module per op, each exposing
``forward`` and ``backward`` (docs/interfaces.md §A, docs/ops.md):

    vittle_fast/ops/triton/vib_sample_kl.py      vittle_fast/ops/cpp/vib_sample_kl.py
    vittle_fast/ops/triton/vib_bottleneck.py     vittle_fast/ops/cpp/vib_bottleneck.py

and ``is_available()`` / ``load_error()`` (plus ``has_cuda()`` for ``cpp``). An op file reaches its
launcher as ``module(backend).vib_bottleneck.forward(...)``. Packages are imported on first use (an
explicit ``from . import ...`` in the loaders below): importing triton is slow and decides at import
whether kernels run in the interpreter.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

BACKENDS = ("reference", "triton", "cpp", "auto")


def _load_triton() -> ModuleType:
    from . import triton

    return triton


def _load_cpp() -> ModuleType:
    from . import cpp

    return cpp


def _triton_runs_on(module: ModuleType, device_type: str) -> bool:
    # CPU tensors only under the interpreter: a correctness tool, never picked by "auto".
    return device_type == "cuda" or (device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _cpp_runs_on(module: ModuleType, device_type: str) -> bool:
    return device_type == "cpu" or (device_type == "cuda" and module.has_cuda())


@dataclass(frozen=True)
class Backend:
    """A compiled backend: its loader and the devices (given the loaded module) it runs on."""

    load: Callable[[], ModuleType]
    runs_on: Callable[[ModuleType, str], bool]


REGISTRY = {"triton": Backend(_load_triton, _triton_runs_on), "cpp": Backend(_load_cpp, _cpp_runs_on)}
# "auto" on each device type, in order of preference (the first that works here wins; else reference).
AUTO_ORDER = {"cuda": ("triton", "cpp"), "cpu": ("cpp",)}


@functools.cache
def _loaded(name: str) -> tuple[ModuleType | None, str]:
    """(module or None, reason it is unavailable)."""
    module = REGISTRY[name].load()  # the packages never raise on import: they record why instead
    if not module.is_available():
        return None, module.load_error()
    return module, ""


def works_on(name: str, device_type: str) -> bool:
    if name == "reference":
        return True
    module, _ = _loaded(name)
    return module is not None and REGISTRY[name].runs_on(module, device_type)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run the ops on ``device`` here (``"reference"`` always can)."""
    device_type = torch.device(device).type
    return [name for name in ("reference", *REGISTRY) if works_on(name, device_type)]


def unavailable_reason(name: str) -> str:
    """Why backend ``name`` cannot be loaded here ('' when it can)."""
    return "" if name == "reference" else _loaded(name)[1]


@torch.compiler.assume_constant_result  # runs once at trace time: imports are not traceable
def resolve_backend(backend: str, device_type: str) -> str:
    """Turn ``"auto"`` into a concrete backend and check an explicit choice can run on ``device_type``.

    ``auto``: on CUDA, Triton then the CUDA extension; on CPU, the C++ kernel (the Triton
    interpreter is far too slow for training), else the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return next((name for name in AUTO_ORDER.get(device_type, ()) if works_on(name, device_type)), "reference")
    if not works_on(backend, device_type):
        reason = unavailable_reason(backend)
        if backend == "triton" and device_type == "cpu" and not reason:
            reason = "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
        raise RuntimeError(
            f"backend={backend!r} cannot run on {device_type} tensors here: "
            f"{reason or 'no kernel for this device'}. Available: {available_backends(device_type)}"
        )
    return backend


def module(backend: str) -> ModuleType:
    """The loaded package of a compiled backend (its launcher modules are attributes: one per op)."""
    loaded, reason = _loaded(backend)
    if loaded is None:
        raise RuntimeError(f"backend={backend!r} is unavailable: {reason}")
    return loaded
