"""Triton kernels and launchers of the fused bottleneck (contract: docs/DESIGN.md §2b; launcher
interface: docs/ops.md, the same as ``vittle_fast/ops/cpp/vib_bottleneck.py``).

Two grouped GEMM kernels; a "group" is a run of consecutive entries of ``order`` with its own MLP,
prior and Philox offset (Vittle: visual, text). Up to two groups share a launch: the program's row
tile picks its group (tiles ``[0, tiles_0)`` are group 0's), and with it the group's pointers.

* ``_linear_gelu_kernel`` (GEMM1): ``preact = h[order] W1^T + b1`` with the row gather in the
  A-operand load; the epilogue stores ``preact`` (saved for backward) and ``GELU(preact)`` (exact erf),
  the A operand of GEMM2.
* ``_linear_tail_kernel`` (GEMM2): each program holds the mu tile (rows ``j`` of W2) and the matching
  log-variance tile (rows ``j + D``) as two accumulators. Forward epilogue: biases, (optionally) store
  ``stats``, clamp, noise, sample, interpolate with ``h``, scatter ``z_hat`` to the rows, write per-token
  KL partials per column tile (summed in a fixed order afterwards: no atomics). Backward epilogue
  (same kernel, ``BACKWARD``): recompute or load ``stats``, write ``dstats``, dh's residual
  ``(1 - alpha) dz`` in the group's row order and per-tile column partials of db2 and the prior
  gradients. ``stats`` is never written in the forward unless it is saved for backward.
* ``_gelu_backward_kernel``: dG -> dA in place, db1's per-tile column partials and GELU(A) for dW2,
  from one erf.
* Backward GEMMs (dgrad / wgrad) go through ``torch.matmul`` (cuBLAS); ``dh = (1 - alpha) dz + dA W1``
  is an ``addmm_`` onto the residual, then written to the group's rows.

Noise: row ``r`` of a group, column ``j``, takes lane ``k % 4`` of ``randn4x(seed, offset_g + k // 4)``
with ``k = r * D + j`` — the ``vib_sample_kl`` contract on the group's rows. When ``D % 4 == 0`` a tile's
four consecutive columns share one Philox call (``join``/``reshape``); otherwise each element runs its
own call and picks its lane. Math in fp32; ``stats`` is rounded to the input dtype before the tail, as
the unfused path stores it. Under ``TRITON_INTERPRET=1`` the dots run in fp32 (the interpreter's bf16
dot is wrong) with one large tile configuration.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .vib_sample_kl import _scalar_launch_args, interpreting

MAX_GROUPS_PER_LAUNCH = 2


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_group(pid_m, tiles_0, size_0, size_1, first_1, BLOCK_M: tl.constexpr):
    """(is group 1, local rows [BLOCK_M] int64, row mask, index of the rows in ``order``)."""
    in_second = pid_m >= tiles_0
    tile = tl.where(in_second, pid_m - tiles_0, pid_m)
    size = tl.where(in_second, size_1, size_0)
    first = tl.where(in_second, first_1, 0)
    local = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    return in_second, local, local < size, first.to(tl.int64) + local


@triton.jit
def _source_rows(order_ptr, positions, row_mask, HAS_ORDER: tl.constexpr):
    """Rows of h for entries ``positions`` of ``order`` (identity without order), int64."""
    if HAS_ORDER:
        return tl.load(order_ptr + positions, mask=row_mask, other=0)
    return positions


@triton.jit
def _gelu(x):
    """Exact (erf) GELU, as nn.GELU()."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _noise(seed, offset, local, col_start, cols, D, ALIGNED4: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr):
    """Contract noise [BLOCK_M, BLOCK_N] of the group's local rows x columns (k = row * D + col)."""
    if ALIGNED4:  # D % 4 == 0, col_start % 4 == 0: one Philox call per four consecutive columns
        groups = col_start // 4 + tl.arange(0, BLOCK_N // 4)
        n0, n1, n2, n3 = tl.randn4x(seed, offset + local[:, None] * (D // 4) + groups[None, :])
        # join(join(n0, n2), join(n1, n3))[r, g, a, b] is lane 2*a + b -> row-major reshape interleaves.
        return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK_M, BLOCK_N))
    k = local[:, None] * D + cols[None, :]
    n0, n1, n2, n3 = tl.randn4x(seed, offset + k // 4)
    lane = k % 4
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


@triton.jit
def _group_prior(mu_a, lv_a, mu_b, lv_b, in_second, learn_a, learn_b, cols, col_mask, clamp_lo, clamp_hi,
                 ANY_PRIOR: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile's group prior as [1, BLOCK_N] rows (mu_p, clamped lv_p, 1/var_p); N(0, I) when the
    group has none."""
    mu_p = tl.zeros((BLOCK_N,), tl.float32)
    logvar_p = tl.zeros((BLOCK_N,), tl.float32)
    if ANY_PRIOR:
        learn = (cols * 0 + tl.where(in_second, learn_b, learn_a)) != 0  # [BLOCK_N]: a no-prior group loads nothing
        mask = col_mask & learn
        if in_second:
            mu_p = tl.load(mu_b + cols, mask=mask, other=0.0)
            logvar_p = tl.load(lv_b + cols, mask=mask, other=0.0)
        else:
            mu_p = tl.load(mu_a + cols, mask=mask, other=0.0)
            logvar_p = tl.load(lv_a + cols, mask=mask, other=0.0)
        clamped = tl.clamp(logvar_p, clamp_lo, clamp_hi, propagate_nan=tl.PropagateNan.ALL)
        logvar_p = tl.where(learn, clamped, 0.0)
    return mu_p[None, :], logvar_p[None, :], tl.exp(-logvar_p)[None, :]


@triton.jit
def _matmul_tiles(a_ptr, a_rows, row_mask, w_ptr, w_rows, col_mask, D, acc, DOT_FP32: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """acc += A[a_rows, :] @ W[w_rows, :]^T over K = D (both row-major with row length D)."""
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        a = tl.load(a_ptr + a_rows[:, None] * D + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + w_rows[None, :] * D + ks[:, None], mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    return acc


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _linear_gelu_kernel(
    h_ptr, order_ptr, preact_ptr, gelu_ptr,
    w1_a, b1_a, w1_b, b1_b,
    D, tiles_0, size_0, size_1, first_1,
    HAS_ORDER: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """preact = h[order] W1^T + b1, gelu = GELU(preact), for rows [M] x output columns [D]."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    in_second, _, row_mask, positions = _tile_group(pid_m, tiles_0, size_0, size_1, first_1, BLOCK_M)
    rows = _source_rows(order_ptr, positions, row_mask, HAS_ORDER)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D
    if in_second:
        w1, b1 = w1_b, b1_b
    else:
        w1, b1 = w1_a, b1_a
    acc = _matmul_tiles(h_ptr, rows, row_mask, w1, cols, col_mask, D, tl.zeros((BLOCK_M, BLOCK_N), tl.float32),
                        DOT_FP32, BLOCK_K)
    preact = acc + tl.load(b1 + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    preact = preact.to(preact_ptr.dtype.element_ty)  # GELU of the stored value, as the unfused path
    out = positions[:, None] * D + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(preact_ptr + out, preact, mask=mask)
    tl.store(gelu_ptr + out, _gelu(preact.to(tl.float32)).to(gelu_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset_0", "offset_1"])
def _linear_tail_kernel(
    gelu_ptr, h_ptr, order_ptr, stats_ptr, out_ptr, kl_partials_ptr,
    grad_out_ptr, grad_kl_ptr, grad_stats_ptr, grad_rows_ptr, grad_partials_ptr,
    w2_a, b2_a, w2_b, b2_b, mu_a, lv_a, mu_b, lv_b, learn_a, learn_b,
    D, tiles_0, size_0, size_1, first_1, n_tiles,
    alpha: tl.float32, seed: tl.int64, offset_0: tl.int64, offset_1: tl.int64,
    alpha_ptr, seed_ptr, offsets_ptr, group_0, group_1,
    clamp_lo: tl.float32, clamp_hi: tl.float32, kl_logvar_coef: tl.float32,
    HAS_ORDER: tl.constexpr, BACKWARD: tl.constexpr, STATS_IN: tl.constexpr, STATS_OUT: tl.constexpr,
    SAMPLE: tl.constexpr, ANY_PRIOR: tl.constexpr, ALIGNED4: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """GEMM2 (mu and log-variance tiles) + the sampling/KL tail, forward or backward (see module doc).

    ``STATS_IN``: read the saved ``stats`` instead of recomputing them (backward); ``STATS_OUT``: store
    them for backward (forward). Scalars given as tensors (ops/scalars.py) are read from their pointers;
    ``offsets_ptr`` holds one offset per group of the call, the launch's are ``group_0`` / ``group_1``.
    """
    if alpha_ptr is not None:
        alpha = tl.load(alpha_ptr)
    if seed_ptr is not None:
        seed = tl.load(seed_ptr)
    if offsets_ptr is not None:
        offset_0 = tl.load(offsets_ptr + group_0)
        offset_1 = tl.load(offsets_ptr + group_1)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    in_second, local, row_mask, positions = _tile_group(pid_m, tiles_0, size_0, size_1, first_1, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    stats_offsets = positions[:, None] * (2 * D) + cols[None, :]
    if STATS_IN:
        mu = tl.load(stats_ptr + stats_offsets, mask=mask, other=0.0).to(tl.float32)
        logvar = tl.load(stats_ptr + stats_offsets + D, mask=mask, other=0.0).to(tl.float32)
    else:
        if in_second:
            w2, b2 = w2_b, b2_b
        else:
            w2, b2 = w2_a, b2_a
        zeros = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        mu = _matmul_tiles(gelu_ptr, positions, row_mask, w2, cols, col_mask, D, zeros, DOT_FP32, BLOCK_K)
        logvar = _matmul_tiles(gelu_ptr, positions, row_mask, w2, cols + D, col_mask, D, zeros, DOT_FP32, BLOCK_K)
        ty = gelu_ptr.dtype.element_ty  # stats rounded to the input dtype, as the unfused path stores them
        mu = (mu + tl.load(b2 + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]).to(ty)
        logvar = (logvar + tl.load(b2 + D + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]).to(ty)
        if STATS_OUT:
            tl.store(stats_ptr + stats_offsets, mu, mask=mask)
            tl.store(stats_ptr + stats_offsets + D, logvar, mask=mask)
        mu, logvar = mu.to(tl.float32), logvar.to(tl.float32)
    logvar = tl.clamp(logvar, clamp_lo, clamp_hi, propagate_nan=tl.PropagateNan.ALL)
    mu_p, logvar_p, inv_var_p = _group_prior(mu_a, lv_a, mu_b, lv_b, in_second, learn_a, learn_b, cols, col_mask,
                                             clamp_lo, clamp_hi, ANY_PRIOR, BLOCK_N)
    std = tl.exp(0.5 * logvar)
    diff = mu - mu_p
    rows = _source_rows(order_ptr, positions, row_mask, HAS_ORDER)
    element = rows[:, None] * D + cols[None, :]
    if SAMPLE:
        eps = _noise(seed, tl.where(in_second, offset_1, offset_0), local, pid_n * BLOCK_N, cols, D, ALIGNED4,
                     BLOCK_M, BLOCK_N)
    if not BACKWARD:
        z_tilde = mu
        if SAMPLE:
            z_tilde = mu + std * eps
        h = tl.load(h_ptr + element, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + element, ((1.0 - alpha) * h + alpha * z_tilde).to(out_ptr.dtype.element_ty), mask=mask)
        kl = 0.5 * (kl_logvar_coef * (logvar_p - logvar) + (std * std + diff * diff) * inv_var_p - 1.0)
        tl.store(kl_partials_ptr + positions * n_tiles + pid_n, tl.sum(tl.where(mask, kl, 0.0), axis=1),
                 mask=row_mask)
    else:
        g = tl.load(grad_out_ptr + element, mask=mask, other=0.0).to(tl.float32)
        w = (tl.load(grad_kl_ptr + positions, mask=row_mask, other=0.0) / D)[:, None]  # dL/dKL_ij
        var = std * std
        kl_grad_mu = w * diff * inv_var_p
        grad_logvar = w * 0.5 * (var * inv_var_p - kl_logvar_coef)
        if SAMPLE:
            grad_logvar += alpha * g * eps * (0.5 * std)
        ty = grad_stats_ptr.dtype.element_ty
        grad_mu = (alpha * g + kl_grad_mu).to(ty)
        grad_logvar = grad_logvar.to(ty)
        tl.store(grad_stats_ptr + stats_offsets, grad_mu, mask=mask)
        tl.store(grad_stats_ptr + stats_offsets + D, grad_logvar, mask=mask)
        # dh's residual term (1 - alpha) dz, in the group's row order: the dgrad GEMM adds dA W1 to it
        residual = ((1.0 - alpha) * g).to(grad_rows_ptr.dtype.element_ty)
        tl.store(grad_rows_ptr + positions[:, None] * D + cols[None, :], residual, mask=mask)
        # [4, row tiles, D] column partials, reduced per group in a fixed order: db2's two halves (of
        # dstats as stored) and, with a learnable prior, the prior gradients
        partial = grad_partials_ptr + pid_m.to(tl.int64) * D + cols
        slot = tl.num_programs(0).to(tl.int64) * D
        tl.store(partial + 2 * slot, tl.sum(tl.where(mask, grad_mu.to(tl.float32), 0.0), axis=0), mask=col_mask)
        tl.store(partial + 3 * slot, tl.sum(tl.where(mask, grad_logvar.to(tl.float32), 0.0), axis=0), mask=col_mask)
        if ANY_PRIOR:
            tl.store(partial, tl.sum(tl.where(mask, -kl_grad_mu, 0.0), axis=0), mask=col_mask)
            grad_logvar_p = w * 0.5 * (kl_logvar_coef - (var + diff * diff) * inv_var_p)
            tl.store(partial + slot, tl.sum(tl.where(mask, grad_logvar_p, 0.0), axis=0), mask=col_mask)


@triton.jit
def _gelu_backward_kernel(preact_ptr, grad_ptr, gelu_ptr, partials_ptr, M, D, STORE_GELU: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """On a [M, D] group: in place ``grad = grad * GELU'(preact)`` (dG -> dA), per row tile the column
    sums of dA as stored (db1's partials, [row tiles, D] fp32) and, with ``STORE_GELU``,
    ``gelu = GELU(preact)`` (the B operand of dW2) -- one erf, one pass over ``preact``, instead of a
    GELU recompute, ``aten.gelu_backward`` and a bias sum. Same formula as ATen's: ``dy * (cdf + x * pdf)``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(preact_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)
    dy = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad = (dy * (cdf + x * pdf)).to(grad_ptr.dtype.element_ty)
    tl.store(grad_ptr + offs, grad, mask=mask)
    tl.store(partials_ptr + tl.program_id(0).to(tl.int64) * D + cols,
             tl.sum(tl.where(mask, grad.to(tl.float32), 0.0), axis=0), mask=cols < D)
    if STORE_GELU:
        tl.store(gelu_ptr + offs, (x * cdf).to(gelu_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # maxnreg; None: ptxas decides


# GPU tiles (bf16/fp16, tensor cores): GEMM1 one accumulator, GEMM2 two plus the tail epilogue.
# Evidence for the register budget: the AOT table (python -m vittle_fast.ops.triton.aot --op
# vib_bottleneck --full), zero spills. The tail kernel states maxnreg=255 (the hardware limit): left
# to itself, ptxas gave the sm_80 fixed-prior sampling backward 80 registers and 32 B of spills
# (with 255 stated: 89, no spill); a cap of 128 made 64 forward variants, which use up to ~230, spill.
GPU_CONFIGS = {"linear_gelu": GemmConfig(128, 128, 64, 8, 3), "linear_tail": GemmConfig(64, 64, 64, 8, 3, 255),
               # elementwise on [rows, D] tiles (block_k unused); 8 warps: 64-76 registers (4 warps: ~125)
               "gelu_backward": GemmConfig(32, 128, 1, 8, 1)}


def gemm_config(kernel: str, m_max: int, d: int) -> GemmConfig:
    """Interpreter: one large tile (it pays per operation, not per element); GPU: the fixed tiles."""
    if interpreting():
        block = lambda n, cap: max(16, min(cap, triton.next_power_of_2(max(n, 1))))  # noqa: E731
        return GemmConfig(block(m_max, 64), block(d, 128), block(d, 256), 1, 1)
    return GPU_CONFIGS[kernel]


def _on_device(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Launchers: inputs validated and contiguous; groups taken two at a time
# --------------------------------------------------------------------------------------------
@dataclass
class _Launch:
    """Up to two consecutive groups: their indices, sizes, first entry in order and row tiles."""

    groups: list[int]
    sizes: list[int]
    first: int
    tiles: list[int]

    def pick(self, values, index):
        """values[group] for slot ``index`` (the first group's again when the launch has one group)."""
        return values[self.groups[min(index, len(self.groups) - 1)]]


def _launches(group_sizes, block_m):
    first = 0
    for start in range(0, len(group_sizes), MAX_GROUPS_PER_LAUNCH):
        groups = list(range(start, min(start + MAX_GROUPS_PER_LAUNCH, len(group_sizes))))
        sizes = [group_sizes[g] for g in groups] + [0] * (MAX_GROUPS_PER_LAUNCH - len(groups))
        tiles = [triton.cdiv(s, block_m) for s in sizes]
        yield _Launch(groups, sizes, first, tiles)
        first += sum(sizes)


def _output_like(x, order, m):
    """Rows not in ``order`` keep ``x``'s values; nothing to copy when every row is listed."""
    return x.clone() if order is not None and m < x.shape[0] else torch.empty_like(x)


def _tail_launch(launch, config, m_offset_tensors, w2s, b2s, offsets, prior_mus, prior_logvars, d, **kwargs):
    """Launch ``_linear_tail_kernel`` for one group launch; tensors in ``m_offset_tensors`` are offset to
    the launch's first entry of order."""
    n_tiles = triton.cdiv(d, config.block_n)
    learn = [launch.pick(prior_mus, i).numel() > 0 and i < len(launch.groups) for i in range(2)]
    grid = (sum(launch.tiles), n_tiles)
    alpha, seed, _, alpha_ptr, seed_ptr, _ = _scalar_launch_args(kwargs.pop("alpha"), kwargs.pop("seed"), 0)
    offsets_ptr = offsets if isinstance(offsets, torch.Tensor) else None
    offset_of = (lambda i: 0) if offsets_ptr is not None else (lambda i: launch.pick(offsets, i))  # noqa: E731
    groups = [launch.groups[min(i, len(launch.groups) - 1)] for i in range(2)]
    _linear_tail_kernel[grid](
        *m_offset_tensors,
        launch.pick(w2s, 0), launch.pick(b2s, 0), launch.pick(w2s, 1), launch.pick(b2s, 1),
        launch.pick(prior_mus, 0), launch.pick(prior_logvars, 0), launch.pick(prior_mus, 1),
        launch.pick(prior_logvars, 1), int(learn[0]), int(learn[1]),
        d, launch.tiles[0], launch.sizes[0], launch.sizes[1], launch.sizes[0], n_tiles,
        alpha, seed, offset_of(0), offset_of(1), alpha_ptr, seed_ptr, offsets_ptr, *groups,
        kwargs.pop("clamp_lo"), kwargs.pop("clamp_hi"), kwargs.pop("kl_logvar_coef"),
        ANY_PRIOR=any(learn), ALIGNED4=d % 4 == 0, DOT_FP32=interpreting(),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.max_registers, **kwargs,
    )
    return grid[0]


def forward(h, order, group_sizes, w1s, b1s, w2s, b2s, alpha, seed, offsets, prior_mus, prior_logvars,
            clamp_lo, clamp_hi, kl_logvar_coef, sample, recompute):
    """``(out [N, D], kl [M] fp32, preact [M, D], stats [M or 0, 2D])``: two launches per two groups."""
    m, d = sum(group_sizes), h.shape[1]
    out = _output_like(h, order, m)
    preact = torch.empty(m, d, dtype=h.dtype, device=h.device)
    gelu = torch.empty_like(preact)
    stats = torch.empty(0 if recompute else m, 2 * d, dtype=h.dtype, device=h.device)
    gemm1, gemm2 = gemm_config("linear_gelu", max(group_sizes, default=0), d), \
        gemm_config("linear_tail", max(group_sizes, default=0), d)
    kl_partials = torch.empty(m, triton.cdiv(d, gemm2.block_n), dtype=torch.float32, device=h.device)
    order_arg = order if order is not None else h  # unused pointer when HAS_ORDER is False
    with _on_device(h):
        for launch in _launches(group_sizes, gemm1.block_m):
            if not sum(launch.sizes):
                continue
            rows = slice(launch.first, launch.first + sum(launch.sizes))
            order_part = order_arg[rows] if order is not None else order_arg
            h_part = h if order is not None else h[rows]
            _linear_gelu_kernel[(sum(launch.tiles), triton.cdiv(d, gemm1.block_n))](
                h_part, order_part, preact[rows], gelu[rows],
                launch.pick(w1s, 0), launch.pick(b1s, 0), launch.pick(w1s, 1), launch.pick(b1s, 1),
                d, launch.tiles[0], launch.sizes[0], launch.sizes[1], launch.sizes[0],
                HAS_ORDER=order is not None, DOT_FP32=interpreting(),
                BLOCK_M=gemm1.block_m, BLOCK_N=gemm1.block_n, BLOCK_K=gemm1.block_k,
                num_warps=gemm1.num_warps, num_stages=gemm1.num_stages,
            )
        for launch in _launches(group_sizes, gemm2.block_m):
            if not sum(launch.sizes):
                continue
            rows = slice(launch.first, launch.first + sum(launch.sizes))
            _tail_launch(
                launch, gemm2,
                (gelu[rows], h if order is not None else h[rows], order_arg[rows] if order is not None else order_arg,
                 stats[rows] if not recompute else gelu, out if order is not None else out[rows], kl_partials[rows],
                 None, None, None, None, None),
                w2s, b2s, offsets, prior_mus, prior_logvars, d,
                alpha=alpha, seed=seed, clamp_lo=clamp_lo, clamp_hi=clamp_hi, kl_logvar_coef=kl_logvar_coef,
                HAS_ORDER=order is not None, BACKWARD=False, STATS_IN=False, STATS_OUT=not recompute, SAMPLE=sample,
            )
    return out, kl_partials.sum(dim=1) / d, preact, stats


def backward(grad_out, grad_kl, h, order, group_sizes, w1s, b1s, w2s, b2s, alpha, seed, offsets, prior_mus,
             prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef, sample, recompute, preact, stats):
    """``(grad_h, grad_w1s, grad_b1s, grad_w2s, grad_b2s, grad_prior_mus, grad_prior_logvars)``."""
    m, d = sum(group_sizes), h.shape[1]
    # GELU's output feeds dW2; recomputing stats needs it first, otherwise the GELU-backward pass makes it
    gelu = F.gelu(preact) if recompute else torch.empty_like(preact)
    grad_stats = torch.empty(m, 2 * d, dtype=h.dtype, device=h.device)
    grad_rows = torch.empty(m, d, dtype=grad_out.dtype, device=h.device)  # (1 - alpha) dz, then + dA W1
    config = gemm_config("linear_tail", max(group_sizes, default=0), d)
    grad_mus = [torch.empty_like(p) for p in prior_mus]
    grad_logvars = [torch.empty_like(p) for p in prior_logvars]
    grad_b2s = [torch.zeros(2 * d, dtype=h.dtype, device=h.device) for _ in group_sizes]  # an empty group: 0
    order_arg = order if order is not None else h
    with _on_device(h):
        for launch in _launches(group_sizes, config.block_m):
            rows = slice(launch.first, launch.first + sum(launch.sizes))
            partials = torch.zeros(4, sum(launch.tiles), d, dtype=torch.float32, device=h.device)
            if sum(launch.sizes):
                _tail_launch(
                    launch, config,
                    (gelu[rows], h, order_arg[rows] if order is not None else order_arg,
                     gelu if recompute else stats[rows], None, None,
                     grad_out if order is not None else grad_out[rows], grad_kl[rows], grad_stats[rows],
                     grad_rows[rows], partials),
                    w2s, b2s, offsets, prior_mus, prior_logvars, d,
                    alpha=alpha, seed=seed, clamp_lo=clamp_lo, clamp_hi=clamp_hi, kl_logvar_coef=kl_logvar_coef,
                    HAS_ORDER=order is not None, BACKWARD=True, STATS_IN=not recompute, STATS_OUT=False,
                    SAMPLE=sample,
                )
            tile_ranges = (slice(0, launch.tiles[0]), slice(launch.tiles[0], sum(launch.tiles)))
            for slot, g in enumerate(launch.groups):  # fixed-order sums over the group's row tiles
                if launch.tiles[slot]:
                    grad_b2s[g] = partials[2:, tile_ranges[slot]].sum(dim=1).flatten().to(h.dtype)
                if prior_mus[g].numel():
                    grad_mus[g] = partials[0, tile_ranges[slot]].sum(dim=0)
                    grad_logvars[g] = partials[1, tile_ranges[slot]].sum(dim=0)
        grad_h, grad_w1s, grad_b1s, grad_w2s = _input_grads(grad_out, grad_rows, grad_stats, h, order, group_sizes,
                                                            w1s, w2s, preact, gelu, not recompute)
        return grad_h, grad_w1s, grad_b1s, grad_w2s, grad_b2s, grad_mus, grad_logvars


def _gelu_backward_(grad, preact, gelu, store_gelu):
    """``grad *= GELU'(preact)`` in place on a [M, D] group; with ``store_gelu`` also ``gelu = GELU(preact)``.
    Returns db1, the column sum of the new ``grad`` (fp32 partials per row tile, summed in order)."""
    m, d = grad.shape
    if not m:
        return torch.zeros(d, dtype=grad.dtype, device=grad.device)
    config = gemm_config("gelu_backward", m, d)
    partials = torch.empty(triton.cdiv(m, config.block_m), d, dtype=torch.float32, device=grad.device)
    _gelu_backward_kernel[(partials.shape[0], triton.cdiv(d, config.block_n))](
        preact, grad, gelu, partials, m, d, STORE_GELU=store_gelu, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        num_warps=config.num_warps)
    return partials.sum(dim=0).to(grad.dtype)


def _input_grads(grad_out, grad_rows, grad_stats, h, order, group_sizes, w1s, w2s, preact, gelu, store_gelu):
    """Per group, from dstats: dW2, GELU's backward with db1 (one pass), dW1 and
    ``dh = (1 - alpha) dz + dA W1`` (the tail kernel wrote the first term to ``grad_rows``) written to
    the group's rows (cuBLAS GEMMs on a GPU)."""
    grads = {name: [] for name in ("w1", "b1", "w2")}
    first = 0
    for g, size in enumerate(group_sizes):
        part = slice(first, first + size)
        grad_part = grad_stats[part]
        grad_preact = grad_part @ w2s[g]  # dG; dA in place below
        grads["b1"].append(_gelu_backward_(grad_preact, preact[part], gelu[part], store_gelu))
        grads["w2"].append(grad_part.t() @ gelu[part])
        grads["w1"].append(grad_preact.t() @ (h[part] if order is None else h.index_select(0, order[part])))
        grad_rows[part].addmm_(grad_preact, w1s[g])
        first += size
    if order is None:  # every row, in order
        grad_h = grad_rows
    else:  # rows not in order pass their gradient through
        grad_h = _output_like(grad_out, order, sum(group_sizes)).index_copy_(0, order, grad_rows)
    return grad_h, grads["w1"], grads["b1"], grads["w2"]
