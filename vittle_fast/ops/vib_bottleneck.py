"""Public fused op: the whole Vittle bottleneck, from the layer output to ``z_hat`` and the per-token KL.

    stats = W2 GELU(W1 h + b1) + b2        (Linear(D, D) -> exact GELU -> Linear(D, 2D))
    z_hat, kl = vib_sample_kl(h, stats, alpha, ...)

``vib_bottleneck`` runs it on every row of ``h``; ``vib_bottleneck_grouped`` runs one MLP per group of
rows (Vittle: visual and text tokens), the rows of each group picked by ``order``, all groups in one
launch per pass. The contract is docs/DESIGN.md §2b. Layers, as for ``vib_sample_kl``: backend
launchers (``triton/vib_bottleneck.py``, ``cpp/vib_bottleneck.py`` -> ``csrc/vib_bottleneck_*``) -> two
``torch.library.custom_op``s (forward, backward) wired with ``register_autograd`` -> the functional API.
Plain eager calls skip the custom-op layer: the same launchers and autograd functions run through
``ops/eager.py`` (bitwise the same results, less Python per call).

Saved for backward beyond the inputs: the GELU pre-activation ``[M, D]`` and ``stats`` ``[M, 2D]`` in
h's dtype, or only the pre-activation with ``recompute=True`` (backward recomputes ``stats`` with one
GEMM). The noise is regenerated, never stored. Every backend draws the noise of ``vib_sample_kl``:
row ``k`` of group ``g`` takes the noise ``vib_sample_kl(..., offset=offsets[g])`` gives its row ``k``.
"""
from __future__ import annotations

import math

import torch

from .philox import normal_noise
from .reference import KL_LOGVAR_COEF, vib_bottleneck_grouped_reference
from .scalars import scalar_args, value_or_tensor
from . import backends
from .backends import resolve_backend
from .eager import OpRoute, run_eager, use_custom_op
from .vib_sample_kl import _check_tensor, _validate_tail_options

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Custom ops (what torch.compile and autograd see). Argument order everywhere: the functional
# API's, with the per-group lists unpacked: h, order, group_sizes, w1s, b1s, w2s, b2s, alpha, seed,
# offsets, alpha_t, seed_t, offsets_t, prior_mus, prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef,
# sample, recompute. Scalars follow ops/scalars.py: a (value, tensor or None) pair each; offsets_t is
# None or an int64 [groups] tensor. The launchers take the value or the tensor.
# "No prior" is None in the public API and an empty [0] float32 tensor below it, in the inputs and
# in the gradient outputs alike (autograd cannot route gradients through a list holding None).
# Each custom op wraps its launcher function itself; the eager route (ops/eager.py) calls the same
# function directly.
# --------------------------------------------------------------------------------------------
def _launch_forward(
    h: torch.Tensor,
    order: torch.Tensor | None,
    group_sizes: list[int],
    w1s: list[torch.Tensor],
    b1s: list[torch.Tensor],
    w2s: list[torch.Tensor],
    b2s: list[torch.Tensor],
    alpha: float,
    seed: int,
    offsets: list[int],
    alpha_t: torch.Tensor | None,
    seed_t: torch.Tensor | None,
    offsets_t: torch.Tensor | None,
    prior_mus: list[torch.Tensor],
    prior_logvars: list[torch.Tensor],
    clamp_lo: float,
    clamp_hi: float,
    kl_logvar_coef: float,
    sample: bool,
    recompute: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [N, D], kl [M] fp32, preact [M, D], stats [M or 0, 2D])``; the last two are saved for
    backward (``order=None``: one group of all rows, in order)."""
    return backends.module(backend).vib_bottleneck.forward(
        h, order, group_sizes, w1s, b1s, w2s, b2s, value_or_tensor(alpha, alpha_t), value_or_tensor(seed, seed_t),
        value_or_tensor(offsets, offsets_t), prior_mus, prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef, sample,
        recompute,
    )


_bottleneck_forward = torch.library.custom_op("vittle_fast::vib_bottleneck", mutates_args=())(_launch_forward)


@_bottleneck_forward.register_fake
def _bottleneck_forward_fake(h, order, group_sizes, w1s, b1s, w2s, b2s, alpha, seed, offsets, alpha_t, seed_t,
                             offsets_t, prior_mus, prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef, sample,
                             recompute, backend):
    m, d = sum(group_sizes), h.shape[1]
    return (torch.empty_like(h), h.new_empty((m,), dtype=torch.float32), h.new_empty((m, d)),
            h.new_empty((0 if recompute else m, 2 * d)))


def _launch_backward(
    grad_out: torch.Tensor,
    grad_kl: torch.Tensor,
    h: torch.Tensor,
    order: torch.Tensor | None,
    group_sizes: list[int],
    w1s: list[torch.Tensor],
    b1s: list[torch.Tensor],
    w2s: list[torch.Tensor],
    b2s: list[torch.Tensor],
    alpha: float,
    seed: int,
    offsets: list[int],
    alpha_t: torch.Tensor | None,
    seed_t: torch.Tensor | None,
    offsets_t: torch.Tensor | None,
    prior_mus: list[torch.Tensor],
    prior_logvars: list[torch.Tensor],
    clamp_lo: float,
    clamp_hi: float,
    kl_logvar_coef: float,
    sample: bool,
    recompute: bool,
    preact: torch.Tensor,
    stats: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
           list[torch.Tensor], list[torch.Tensor]]:
    """``(grad_h, grad_w1s, grad_b1s, grad_w2s, grad_b2s, grad_prior_mus, grad_prior_logvars)``; a
    group without a prior gets empty ``[0]`` prior gradients."""
    return backends.module(backend).vib_bottleneck.backward(
        grad_out, grad_kl, h, order, group_sizes, w1s, b1s, w2s, b2s, value_or_tensor(alpha, alpha_t),
        value_or_tensor(seed, seed_t), value_or_tensor(offsets, offsets_t), prior_mus, prior_logvars, clamp_lo,
        clamp_hi, kl_logvar_coef, sample, recompute, preact, stats,
    )


_bottleneck_backward = torch.library.custom_op("vittle_fast::vib_bottleneck_backward",
                                              mutates_args=())(_launch_backward)


@_bottleneck_backward.register_fake
def _bottleneck_backward_fake(grad_out, grad_kl, h, order, group_sizes, w1s, b1s, w2s, b2s, alpha, seed, offsets,
                              alpha_t, seed_t, offsets_t, prior_mus, prior_logvars, clamp_lo, clamp_hi,
                              kl_logvar_coef, sample, recompute, preact, stats, backend):
    prior_grads = [torch.empty_like(p) for p in prior_mus]
    return (torch.empty_like(h), [torch.empty_like(w) for w in w1s], [torch.empty_like(b) for b in b1s],
            [torch.empty_like(w) for w in w2s], [torch.empty_like(b) for b in b2s], prior_grads,
            [torch.empty_like(g) for g in prior_grads])


_OPTION_ARGS = ("clamp_lo", "clamp_hi", "kl_logvar_coef", "sample", "recompute", "backend")


def _setup_context(ctx, inputs, output):
    (h, order, group_sizes, w1s, b1s, w2s, b2s, alpha, seed, offsets, alpha_t, seed_t, offsets_t, prior_mus,
     prior_logvars, *options) = inputs
    _, _, preact, stats = output
    ctx.mark_non_differentiable(preact, stats)
    ctx.set_materialize_grads(False)  # else autograd zero-fills [M, 3D] of grads for preact and stats per call
    ctx.n_groups = len(group_sizes)
    ctx.save_for_backward(h, order, preact, stats, alpha_t, seed_t, offsets_t, *w1s, *b1s, *w2s, *b2s, *prior_mus,
                          *prior_logvars)
    ctx.args = dict(group_sizes=group_sizes, alpha=alpha, seed=seed, offsets=offsets,
                    **dict(zip(_OPTION_ARGS, options)))


def _backward(ctx, grad_out, grad_kl, _grad_preact, _grad_stats):
    return _gradients(ctx, (grad_out, grad_kl), _bottleneck_backward)


def _gradients(ctx, grads, launch_backward):
    """The backward of the forward op, one gradient (or list of them) per input, computed by
    ``launch_backward`` (the backward custom op, or its launcher on the eager route)."""
    grad_out, grad_kl = grads[:2]
    h, order, preact, stats, alpha_t, seed_t, offsets_t, *rest = ctx.saved_tensors
    g = ctx.n_groups
    w1s, b1s, w2s, b2s, prior_mus, prior_logvars = (list(rest[i * g:(i + 1) * g]) for i in range(6))
    if grad_out is None:
        grad_out = torch.zeros_like(h)
    if grad_kl is None:
        grad_kl = preact.new_zeros((preact.shape[0],), dtype=torch.float32)
    a = ctx.args
    grad_h, gw1, gb1, gw2, gb2, gmu, glv = launch_backward(
        grad_out.contiguous(), grad_kl.float().contiguous(), h, order, a["group_sizes"], w1s, b1s, w2s, b2s,
        a["alpha"], a["seed"], a["offsets"], alpha_t, seed_t, offsets_t, prior_mus, prior_logvars, a["clamp_lo"],
        a["clamp_hi"], a["kl_logvar_coef"], a["sample"], a["recompute"], preact, stats, a["backend"],
    )
    return (grad_h, None, None, gw1, gb1, gw2, gb2) + (None,) * 6 + (gmu, glv) + (None,) * len(_OPTION_ARGS)


_bottleneck_forward.register_autograd(_backward, setup_context=_setup_context)
_EAGER_ROUTE = OpRoute(_launch_forward, _setup_context, _gradients, _launch_backward)


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------
def _check_weights(name: str, weights, h: torch.Tensor) -> None:
    """One group's ``(w1 [D, D], b1 [D], w2 [2D, D], b2 [2D])`` in h's dtype, on h's device."""
    if not (isinstance(weights, (tuple, list)) and len(weights) == 4):
        raise TypeError(f"{name} must be a (w1, b1, w2, b2) tuple, got {type(weights).__name__}")
    d = h.shape[-1]
    for part, value, shape in zip(("w1", "b1", "w2", "b2"), weights, ((d, d), (d,), (2 * d, d), (2 * d,))):
        label = f"{name}.{part}" if name != "weights" else part
        _check_tensor(label, value)
        if tuple(value.shape) != shape:
            raise ValueError(f"{label} must have shape {list(shape)} for D = {d}, got {list(value.shape)}")
        if value.dtype != h.dtype:
            raise TypeError(f"{label} must have h's dtype {h.dtype}, got {value.dtype}")
        if value.device != h.device:
            raise ValueError(f"{label} must be on h's device {h.device}, got {value.device}")


def _check_prior(name: str, prior, h: torch.Tensor) -> None:
    if prior is None:
        return
    if not (isinstance(prior, (tuple, list)) and len(prior) == 2):
        raise TypeError(f"{name} must be None or a (prior_mu, prior_logvar) pair, got {type(prior).__name__}")
    for part, value in zip(("prior_mu", "prior_logvar"), prior):
        label = f"{name}.{part}" if name != "prior" else part
        _check_tensor(label, value)
        if tuple(value.shape) != (h.shape[-1],):
            raise ValueError(f"{label} must have shape [D] = [{h.shape[-1]}], got {list(value.shape)}")
        if value.device != h.device:
            raise ValueError(f"{label} must be on h's device {h.device}, got {value.device}")


def _check_order(order, h: torch.Tensor, group_sizes) -> None:
    _check_tensor("order", order, float_only=False)
    if order.dtype != torch.int64 or order.dim() != 1:
        raise TypeError(f"order must be a 1-D int64 tensor, got {order.dtype} of shape {list(order.shape)}")
    if order.device != h.device:
        raise ValueError(f"order must be on h's device {h.device}, got {order.device}")
    if not isinstance(group_sizes, (list, tuple)) or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in group_sizes):
        raise TypeError(f"group_sizes must be a list of ints >= 0, got {group_sizes!r}")
    if sum(group_sizes) != order.numel():
        raise ValueError(f"group_sizes must sum to len(order) = {order.numel()}, got {list(group_sizes)}")
    n = h.shape[0]
    if order.numel() > n:
        raise ValueError(f"order lists {order.numel()} rows but h has only {n}")


def _check_order_rows(order: torch.Tensor, n: int) -> None:
    """Rows distinct and in [0, n), checked on the device without a host sync (CUDA: a device assert).
    The cpp backend on CPU checks them in C++ instead (one pass, before any row is read)."""
    if order.numel() and order.device.type != "meta":
        torch._assert_async(((order >= 0) & (order < n)).all(), f"order has rows outside [0, {n})")
        hits = torch.zeros(n, dtype=torch.int32, device=order.device).index_put_(
            (order.clamp(0, max(n - 1, 0)),), torch.ones_like(order, dtype=torch.int32), accumulate=True)
        torch._assert_async((hits <= 1).all(), "order has duplicate rows")


def _scalars(alpha, seed, offsets, device) -> tuple:
    """``alpha, seed, offsets, alpha_t, seed_t, offsets_t`` of the custom ops (ops/scalars.py); any
    offset given as a tensor puts all of them in one int64 [groups] tensor."""
    per_group = [scalar_args(alpha, seed, offset, device) for offset in offsets] or [scalar_args(alpha, seed, 0, device)]
    first = per_group[0]
    offsets_t = None
    if any(s.offset_t is not None for s in per_group):
        offsets_t = torch.stack([s.offset_t if s.offset_t is not None else torch.full((), s.offset, device=device)
                                 for s in per_group])
    return first.alpha, first.seed, [s.offset for s in per_group][:len(offsets)], first.alpha_t, first.seed_t, offsets_t


def _run(h, order, group_sizes, weights, scalars, priors, logvar_clamp, kl_form, sample, backend, recompute):
    """Validated arguments -> the reference composition or the custom op. h is [N, D]."""
    backend = resolve_backend(backend, h.device.type)
    if order is not None and not (backend == "cpp" and h.device.type == "cpu"):
        _check_order_rows(order, h.shape[0])
    alpha, seed, offsets, alpha_t, seed_t, offsets_t = scalars
    if backend == "reference":
        rows = order if order is not None else torch.arange(h.shape[0], device=h.device)
        offset_of = (lambda g: offsets[g]) if offsets_t is None else (lambda g: offsets_t[g])  # noqa: E731
        noises = [normal_noise(value_or_tensor(seed, seed_t), offset_of(g), size, h.shape[1], device=h.device)
                  if sample else None for g, size in enumerate(group_sizes)]
        priors_f = [None if p is None else (p[0].float(), p[1].float()) for p in priors]
        return vib_bottleneck_grouped_reference(h, rows, group_sizes, weights, value_or_tensor(alpha, alpha_t), noises,
                                                priors_f, logvar_clamp, kl_form, sample)
    clamp_lo, clamp_hi = (-math.inf, math.inf) if logvar_clamp is None else map(float, logvar_clamp)
    w1s, b1s, w2s, b2s = ([w[i].contiguous() for w in weights] for i in range(4))
    # The kernels read fp32 priors (autograd casts the gradient back); no prior: an empty tensor.
    no_prior = h.new_empty((0,), dtype=torch.float32)
    prior_mus = [no_prior if p is None else p[0].float().contiguous() for p in priors]
    prior_logvars = [no_prior if p is None else p[1].float().contiguous() for p in priors]
    inputs = (h.contiguous(), order, list(group_sizes), w1s, b1s, w2s, b2s, *scalars, prior_mus, prior_logvars,
              clamp_lo, clamp_hi, KL_LOGVAR_COEF[kl_form], sample, recompute, backend)
    if use_custom_op(h, *w1s, *b1s, *w2s, *b2s, *prior_mus, *prior_logvars):
        out, kl, _, _ = _bottleneck_forward(*inputs)
    else:
        out, kl, _, _ = run_eager(_EAGER_ROUTE, inputs)
    return out, kl


def vib_bottleneck(
    h: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    alpha: float | torch.Tensor,
    *,
    seed: int | torch.Tensor,
    offset: int | torch.Tensor = 0,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    logvar_clamp: tuple[float, float] | None = (-2.3025, 2.3025),
    kl_form: str = "standard",
    sample: bool = True,
    backend: str = "auto",
    recompute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``vib_sample_kl(h, F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2), alpha, ...)`` as one op.

    Args:
        h: ``[..., D]`` hidden states (float32 / bfloat16 / float16).
        w1, b1, w2, b2: the MLP in ``nn.Linear`` layout, ``[D, D]``, ``[D]``, ``[2D, D]``, ``[2D]``, h's dtype.
        alpha, seed, offset, prior_mu, prior_logvar, logvar_clamp, kl_form, sample, backend: as in
            ``vib_sample_kl`` (docs/DESIGN.md §2); alpha / seed / offset each a Python scalar or a 0-dim
            tensor on h's device (``vittle_fast.ops.scalars``).
        recompute: save only the GELU pre-activation for backward and recompute ``stats`` there.

    Returns:
        ``z_hat`` ``[..., D]`` in ``h.dtype`` and ``kl`` ``[...]`` float32. Gradients reach h, the
        weights and the priors.
    """
    _check_tensor("h", h)
    if h.dim() < 1 or h.shape[-1] < 1:
        raise ValueError(f"h must have shape [..., D] with D >= 1, got {list(h.shape)}")
    _check_weights("weights", (w1, b1, w2, b2), h)
    if (prior_mu is None) != (prior_logvar is None):
        raise ValueError("prior_mu and prior_logvar must be given together (learnable prior) or both be None")
    prior = None if prior_mu is None else (prior_mu, prior_logvar)
    _check_prior("prior", prior, h)
    scalars = _scalars(alpha, seed, [offset], h.device)
    _validate_tail_options(logvar_clamp, kl_form, sample)
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    flat = h.reshape(-1, h.shape[-1])
    out, kl = _run(flat, None, [flat.shape[0]], [(w1, b1, w2, b2)], scalars, [prior], logvar_clamp, kl_form,
                   sample, backend, recompute)
    return out.reshape(h.shape), kl.reshape(h.shape[:-1])


def vib_bottleneck_grouped(
    h: torch.Tensor,
    order: torch.Tensor,
    group_sizes: list[int],
    weights: list[Weights],
    alpha: float | torch.Tensor,
    *,
    seed: int | torch.Tensor,
    offsets: list[int | torch.Tensor],
    priors: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    logvar_clamp: tuple[float, float] | None = (-2.3025, 2.3025),
    kl_form: str = "standard",
    sample: bool = True,
    backend: str = "auto",
    recompute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Several groups of rows, each with its own MLP, prior and noise offset, in one launch per pass.

    Args:
        h: ``[N, D]`` flat token rows.
        order: int64 ``[M]``, distinct rows of h: group 0's rows, then group 1's, ... (M <= N).
        group_sizes: host ints, one per group, summing to M.
        weights: per group ``(w1, b1, w2, b2)`` (the module's own parameters, no stacking).
        offsets: per group Philox counter base (Python int or 0-dim int64 tensor). priors: None or per group ``(prior_mu, prior_logvar)`` | None.
        Other arguments as in ``vib_bottleneck``.

    Returns:
        ``out`` ``[N, D]``: row ``order[k]`` of group g is ``vib_bottleneck`` of that group's rows
        (row k within the group); rows not in ``order`` are h's rows unchanged. ``kl`` ``[M]`` float32,
        in ``order``'s order.
    """
    _check_tensor("h", h)
    if h.dim() != 2 or h.shape[-1] < 1:
        raise ValueError(f"h must be flat rows [N, D] with D >= 1, got {list(h.shape)}")
    _check_order(order, h, group_sizes)
    n_groups = len(group_sizes)
    for name, value in (("weights", weights), ("offsets", offsets)):
        if not isinstance(value, (list, tuple)) or len(value) != n_groups:
            raise ValueError(f"{name} must be a list with one entry per group ({n_groups}), got {value!r:.80}")
    if priors is None:
        priors = [None] * n_groups
    elif not isinstance(priors, (list, tuple)) or len(priors) != n_groups:
        raise ValueError(f"priors must be None or a list with one entry per group ({n_groups})")
    for g in range(n_groups):
        _check_weights(f"weights[{g}]", weights[g], h)
        _check_prior(f"priors[{g}]", priors[g], h)
    scalars = _scalars(alpha, seed, list(offsets), h.device)
    _validate_tail_options(logvar_clamp, kl_form, sample)
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    return _run(h, order, list(group_sizes), list(weights), scalars, list(priors), logvar_clamp, kl_form, sample,
                backend, recompute)
