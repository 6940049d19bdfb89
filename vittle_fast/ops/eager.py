"""The eager fast path of the fused ops: the custom op's own forward and backward, without its layer.

Each fused op is a ``torch.library.custom_op`` pair (forward, backward) wired with
``register_autograd``: what ``torch.compile``, ``make_fx``, ``opcheck`` and dispatch modes see. In
plain eager mode that layer costs Python time on every call -- argument defaults, pytree flattening of
the list arguments, the Python dispatcher -- ~0.8 ms per forward + backward of
``vib_bottleneck_grouped`` at the demo's shape (N = 488, D = 64): 3.2 ms through the custom op, 2.4 ms
here, 1.6 ms for the C++ launchers alone (``benchmarks/op_dispatch.py``). :class:`EagerAutograd` runs the same launchers and the same
``setup_context`` / backward functions through a ``torch.autograd.Function`` instead, so both routes
give bitwise the same outputs and gradients (tested); :func:`use_custom_op` picks the route.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


class OpRoute(NamedTuple):
    """What the eager route of one op needs, all shared with its custom op.

    ``launch(*inputs)``: the forward launcher call (the custom op's body). ``setup_context(ctx, inputs,
    output)``: the registered one. ``gradients(ctx, grads, launch_backward)``: the registered backward
    with the backward call passed in (the backward custom op, or here its launcher directly)."""

    launch: Callable
    setup_context: Callable
    gradients: Callable
    launch_backward: Callable


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # a module's weights are Parameters (FSDP2's unsharded ones too)


def use_custom_op(*tensors: torch.Tensor) -> bool:
    """True when a call must go through the custom op: under ``torch.compile`` / export tracing, inside a
    ``TorchDispatchMode`` (``make_fx``, fake tensors, op counters), or with tensor subclasses (DTensor, ...)."""
    return (torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
            or any(type(t) not in _PLAIN_TYPES for t in tensors))


def _flatten(inputs: tuple) -> tuple[tuple, tuple]:
    """Inputs with list arguments spliced in place (autograd only sees top-level tensors), and the
    lengths that undo it (-1: not a list)."""
    flat, lengths = [], []
    for value in inputs:
        if isinstance(value, list):
            flat.extend(value)
            lengths.append(len(value))
        else:
            flat.append(value)
            lengths.append(-1)
    return tuple(flat), tuple(lengths)


def _unflatten(flat: tuple, lengths: tuple) -> tuple:
    inputs, i = [], 0
    for length in lengths:
        if length < 0:
            inputs.append(flat[i])
            i += 1
        else:
            inputs.append(list(flat[i:i + length]))
            i += length
    return tuple(inputs)


class EagerAutograd(torch.autograd.Function):
    """``EagerAutograd.apply(route, lengths, *flat_inputs)``; use :func:`run_eager`."""

    @staticmethod
    def forward(ctx, route: OpRoute, lengths: tuple, *flat):
        inputs = _unflatten(flat, lengths)
        output = route.launch(*inputs)
        route.setup_context(ctx, inputs, output)
        ctx.route, ctx.lengths = route, lengths
        return output

    @staticmethod
    def backward(ctx, *grads):
        per_input = ctx.route.gradients(ctx, grads, ctx.route.launch_backward)
        flat = []
        for length, grad in zip(ctx.lengths, per_input):
            if length < 0:
                flat.append(grad)
            else:
                flat.extend(grad if grad is not None else [None] * length)
        return (None, None, *flat)


def run_eager(route: OpRoute, inputs: tuple):
    """The op's outputs for the custom op's ``inputs``, with autograd, through the eager route."""
    flat, lengths = _flatten(inputs)
    return EagerAutograd.apply(route, lengths, *flat)
