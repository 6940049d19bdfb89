"""Triton kernels and launchers of the fused Vittle op (contract: docs/DESIGN.md §2, docs/interfaces.md §A).

One forward kernel (noise -> sample -> interpolate -> per-token KL) and one backward kernel
(noise regenerated -> grad_h, grad_stats and per-program prior partial sums). Design choices:

* **Noise in registers, four elements per Philox call.** Element ``k = i*D + j`` of the flattened
  ``[N, D]`` call takes lane ``k % 4`` of ``tl.randn4x(seed, offset + k // 4)``. A chunk is a
  ``[BLOCK // 4, 4]`` tile of *flattened* indices that starts at a multiple of 4, so one Philox call
  serves four consecutive elements; lanes that fall outside the row are masked. The backward kernel
  regenerates exactly the same values (noise depends on ``k`` only, not on the tiling).
* **Rows interleaved by 4.** Program ``p`` owns rows ``i = p % 4 + 4*m``. All its rows then share
  ``lead = (i*D) % 4``, the offset of the row start inside its first Philox group, so a program's
  chunks cover the same columns ``j`` in every row. That lets one program process ``ROWS`` rows as a
  2-D tile (fast under the interpreter, efficient for small D on a GPU) and lets the backward kernel
  accumulate prior-gradient partials per column in registers across all of its rows.
* **Loop over D in chunks of BLOCK**, so any D runs with bounded registers; the row loop count
  (``tiles_per_program``) is a runtime argument, so the grid can be sized without recompiling.
* **64-bit indices.** Row numbers are int64 before they are multiplied by D; Philox counters are
  int64 (``offset`` can exceed 2**32, so the counter's high word matters).
* **Deterministic prior gradient.** Each program writes its column partials to its own rows of a
  ``[2, num_programs, D]`` fp32 buffer; ``torch.sum`` over programs reduces them in a fixed order.
  No atomics.
* **Scalars by value or from memory** (ops/scalars.py): ``alpha``, ``seed``, ``offset`` arrive as
  launch arguments, or, when given as 0-dim tensors, through ``*_ptr`` pointers loaded once per
  program (CUDA-graph safe). A None pointer specialises the load away.
* All math in fp32 registers; ``z_hat``/grads stored in the input dtype, ``kl`` in fp32.
"""
from __future__ import annotations

import contextlib
import functools
import os
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..scalars import split_scalar

ROW_INTERLEAVE = 4  # rows of one program are 4 apart, so they share (row * D) % 4 (see module doc)


# --------------------------------------------------------------------------------------------
# Device helpers shared by the forward and backward kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_rows(pid, tile, tiles_per_program, n_rows, ROWS: tl.constexpr):
    """Rows (int64) of the program's ``tile``-th row tile and their validity mask.

    Rows are ROW_INTERLEAVE = 4 apart (a jit function can't read a plain module global).
    """
    phase = pid % 4
    first = (pid // 4).to(tl.int64) * tiles_per_program + tile
    rows = phase + 4 * (first * ROWS + tl.arange(0, ROWS).to(tl.int64))
    return rows, rows < n_rows


@triton.jit
def _row_lead(pid, D):
    """``(row * D) % 4`` for every row of the program: how far into a Philox group its rows start."""
    return ((pid % 4) * (D % 4)) % 4


@triton.jit
def _chunk_columns(chunk, lead, D, BLOCK: tl.constexpr):
    """Columns ``j`` [BLOCK] of ``chunk`` and their in-row mask.

    Chunks start ``lead`` columns before the row so that their flattened indices start on a Philox
    group boundary; ``cdiv(D + lead, BLOCK)`` chunks cover the row.
    """
    cols = chunk * BLOCK - lead + tl.arange(0, BLOCK)
    return cols, (cols >= 0) & (cols < D)


@triton.jit
def _normal_tile(seed, offset, rows, lead, chunk, D, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Contract noise [ROWS, BLOCK] for the chunk: one ``randn4x`` call per group of 4 elements.

    Counter of the group that starts at flattened index ``row*D - lead + chunk*BLOCK + 4*g`` is
    ``offset + that_index // 4``; its four normals are laid side by side with join/reshape.
    """
    group_base = (rows * D - lead) // 4 + chunk * (BLOCK // 4)  # int64, exact (multiple of 4)
    counters = offset.to(tl.int64) + group_base[:, None] + tl.arange(0, BLOCK // 4)[None, :]
    n0, n1, n2, n3 = tl.randn4x(seed, counters)
    # join(join(n0, n2), join(n1, n3))[r, g, a, b] is lane 2*a + b -> row-major reshape interleaves.
    quad = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(quad, (ROWS, BLOCK))


@triton.jit
def _load_scalars(alpha, seed, offset, alpha_ptr, seed_ptr, offset_ptr):
    """The call's scalars: each from memory when its pointer is given (a tensor scalar: CUDA-graph
    safe), else the launch argument. A None pointer is a compile-time constant: no branch at run time."""
    if alpha_ptr is not None:
        alpha = tl.load(alpha_ptr)
    if seed_ptr is not None:
        seed = tl.load(seed_ptr)
    if offset_ptr is not None:
        offset = tl.load(offset_ptr)
    return alpha, seed, offset


@triton.jit
def _element_offsets(rows, cols, D):
    """int64 [ROWS, BLOCK] offsets of (i, j) into an [N, D] tensor and into mu = stats[:, :D]."""
    return D * rows[:, None] + cols[None, :], (2 * D) * rows[:, None] + cols[None, :]


@triton.jit
def _load_posterior(stats_ptr, mu_offsets, mask, D, clamp_lo, clamp_hi):
    """mu and clamped logvar (stats = [mu | logvar], each half D wide) in fp32; a NaN logvar stays
    NaN, as with torch.clamp (a plain max/min would turn it into a clamp bound)."""
    mu = tl.load(stats_ptr + mu_offsets, mask=mask, other=0.0).to(tl.float32)
    logvar = tl.load(stats_ptr + mu_offsets + D, mask=mask, other=0.0).to(tl.float32)
    return mu, tl.clamp(logvar, clamp_lo, clamp_hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_prior(prior_mu_ptr, prior_logvar_ptr, cols, col_mask, clamp_lo, clamp_hi,
                LEARNABLE_PRIOR: tl.constexpr, BLOCK: tl.constexpr):
    """Prior mean, clamped log-variance and 1/variance as [1, BLOCK] rows (N(0, I) when fixed)."""
    if LEARNABLE_PRIOR:
        mu_p = tl.load(prior_mu_ptr + cols, mask=col_mask, other=0.0)
        logvar_p = tl.load(prior_logvar_ptr + cols, mask=col_mask, other=0.0)
        logvar_p = tl.clamp(logvar_p, clamp_lo, clamp_hi, propagate_nan=tl.PropagateNan.ALL)
        inv_var_p = tl.exp(-logvar_p)
    else:
        mu_p = tl.zeros((BLOCK,), tl.float32)
        logvar_p = tl.zeros((BLOCK,), tl.float32)
        inv_var_p = tl.full((BLOCK,), 1.0, tl.float32)
    return mu_p[None, :], logvar_p[None, :], inv_var_p[None, :]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed", "offset"])
def _vib_sample_kl_fwd_kernel(
    h_ptr, stats_ptr, prior_mu_ptr, prior_logvar_ptr, z_hat_ptr, kl_ptr,
    n_rows, D, tiles_per_program,
    alpha: tl.float32, seed: tl.int64, offset: tl.int64, alpha_ptr, seed_ptr, offset_ptr,
    clamp_lo: tl.float32, clamp_hi: tl.float32, kl_logvar_coef: tl.float32,
    LEARNABLE_PRIOR: tl.constexpr, SAMPLE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """z_hat = (1-a) h + a (mu + exp(lv/2) eps); kl_i = mean_j KL_ij. Rows outer, chunks inner."""
    alpha, seed, offset = _load_scalars(alpha, seed, offset, alpha_ptr, seed_ptr, offset_ptr)
    pid = tl.program_id(0)
    lead = _row_lead(pid, D)
    for tile in range(tiles_per_program):
        rows, row_mask = _tile_rows(pid, tile, tiles_per_program, n_rows, ROWS)
        kl_acc = tl.zeros((ROWS, BLOCK), tl.float32)
        for chunk in range(tl.cdiv(D + lead, BLOCK)):
            cols, col_mask = _chunk_columns(chunk, lead, D, BLOCK)
            mask = row_mask[:, None] & col_mask[None, :]
            h_offsets, mu_offsets = _element_offsets(rows, cols, D)
            mu, logvar = _load_posterior(stats_ptr, mu_offsets, mask, D, clamp_lo, clamp_hi)
            mu_p, logvar_p, inv_var_p = _load_prior(prior_mu_ptr, prior_logvar_ptr, cols, col_mask,
                                                    clamp_lo, clamp_hi, LEARNABLE_PRIOR, BLOCK)
            std = tl.exp(0.5 * logvar)
            if SAMPLE:
                eps = _normal_tile(seed, offset, rows, lead, chunk, D, ROWS, BLOCK)
                z_tilde = mu + std * eps
            else:
                z_tilde = mu
            h = tl.load(h_ptr + h_offsets, mask=mask, other=0.0).to(tl.float32)
            z_hat = (1.0 - alpha) * h + alpha * z_tilde
            tl.store(z_hat_ptr + h_offsets, z_hat.to(z_hat_ptr.dtype.element_ty), mask=mask)

            diff = mu - mu_p
            kl = 0.5 * (kl_logvar_coef * (logvar_p - logvar) + (std * std + diff * diff) * inv_var_p - 1.0)
            kl_acc += tl.where(mask, kl, 0.0)
        tl.store(kl_ptr + rows, tl.sum(kl_acc, axis=1) / D, mask=row_mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _vib_sample_kl_bwd_kernel(
    grad_z_hat_ptr, grad_kl_ptr, stats_ptr, prior_mu_ptr, prior_logvar_ptr,
    grad_h_ptr, grad_stats_ptr, prior_partials_ptr,
    n_rows, D, tiles_per_program,
    alpha: tl.float32, seed: tl.int64, offset: tl.int64, alpha_ptr, seed_ptr, offset_ptr,
    clamp_lo: tl.float32, clamp_hi: tl.float32, kl_logvar_coef: tl.float32,
    LEARNABLE_PRIOR: tl.constexpr, SAMPLE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad_h, grad_stats and (learnable prior) this program's column partials of the prior grads.

    Chunks outer, rows inner: a chunk's columns are the same in every row of the program, so the
    prior partials of a chunk accumulate in registers over all rows and are stored once.
    """
    alpha, seed, offset = _load_scalars(alpha, seed, offset, alpha_ptr, seed_ptr, offset_ptr)
    pid = tl.program_id(0)
    lead = _row_lead(pid, D)
    for chunk in range(tl.cdiv(D + lead, BLOCK)):
        cols, col_mask = _chunk_columns(chunk, lead, D, BLOCK)
        mu_p, logvar_p, inv_var_p = _load_prior(prior_mu_ptr, prior_logvar_ptr, cols, col_mask,
                                                clamp_lo, clamp_hi, LEARNABLE_PRIOR, BLOCK)
        grad_mu_p_acc = tl.zeros((ROWS, BLOCK), tl.float32)
        grad_logvar_p_acc = tl.zeros((ROWS, BLOCK), tl.float32)
        for tile in range(tiles_per_program):
            rows, row_mask = _tile_rows(pid, tile, tiles_per_program, n_rows, ROWS)
            mask = row_mask[:, None] & col_mask[None, :]
            h_offsets, mu_offsets = _element_offsets(rows, cols, D)
            mu, logvar = _load_posterior(stats_ptr, mu_offsets, mask, D, clamp_lo, clamp_hi)
            w = (tl.load(grad_kl_ptr + rows, mask=row_mask, other=0.0) / D)[:, None]  # dL/dKL_ij
            g = tl.load(grad_z_hat_ptr + h_offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_h_ptr + h_offsets, ((1.0 - alpha) * g).to(grad_h_ptr.dtype.element_ty), mask=mask)

            var = tl.exp(logvar)
            diff = mu - mu_p
            kl_grad_mu = w * diff * inv_var_p  # dKL/dmu = -dKL/dmu_p
            grad_mu = alpha * g + kl_grad_mu
            grad_logvar = w * 0.5 * (var * inv_var_p - kl_logvar_coef)
            if SAMPLE:
                eps = _normal_tile(seed, offset, rows, lead, chunk, D, ROWS, BLOCK)
                grad_logvar += alpha * g * eps * (0.5 * tl.exp(0.5 * logvar))
            out_ty = grad_stats_ptr.dtype.element_ty
            tl.store(grad_stats_ptr + mu_offsets, grad_mu.to(out_ty), mask=mask)
            tl.store(grad_stats_ptr + mu_offsets + D, grad_logvar.to(out_ty), mask=mask)
            if LEARNABLE_PRIOR:
                grad_mu_p_acc -= tl.where(mask, kl_grad_mu, 0.0)
                grad_logvar_p = w * 0.5 * (kl_logvar_coef - (var + diff * diff) * inv_var_p)
                grad_logvar_p_acc += tl.where(mask, grad_logvar_p, 0.0)
        if LEARNABLE_PRIOR:
            mu_p_partials = prior_partials_ptr + pid.to(tl.int64) * D  # [2, num_programs, D]
            logvar_p_partials = mu_p_partials + tl.num_programs(0).to(tl.int64) * D
            tl.store(mu_p_partials + cols, tl.sum(grad_mu_p_acc, axis=0), mask=col_mask)
            tl.store(logvar_p_partials + cols, tl.sum(grad_logvar_p_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """Tile ``[rows, block]`` (both powers of two, block >= 4), row tiles per program, warps, and
    the ptxas register cap (None: ptxas chooses)."""

    block: int
    rows: int
    tiles_per_program: int
    num_warps: int
    max_registers: int | None = None

    def num_programs(self, n_rows: int) -> int:
        rows_per_phase = triton.cdiv(n_rows, ROW_INTERLEAVE)
        return ROW_INTERLEAVE * triton.cdiv(rows_per_phase, self.rows * self.tiles_per_program)


# GPU tiles give each thread one Philox group: 4 consecutive elements, one randn4x call, 8-byte
# (bf16) / 16-byte (fp32) accesses. Rows of > 512 columns: 1024-wide chunks, 8 warps, maxnreg=80:
# left alone, ptxas picks 48 registers for the bf16 sm_90 sampling kernels with tensor scalars and
# spills 8 (fwd) / 16 (bwd) bytes; capped at 80 every 1024-wide variant uses 55-79 and spills none
# (a cap of 64 spills 8-40 B in the learnable-prior backward), 3 programs of 256 threads per SM.
# Shorter rows: [512 // block, block] tiles, 4 warps, maxnreg=128: left alone, ptxas trims those
# multi-row tiles to 64 registers and spills 8-24 bytes; with the cap it uses 48-116 and spills
# none, still 4 programs per SM. Evidence: docs/triton.md (AOT sweep).
GPU_MAX_BLOCK = 1024
GPU_LONG_ROW_MAX_REGISTERS = 80
GPU_SHORT_ROW_MAX_REGISTERS = 128
GPU_PROGRAMS_PER_SM = 4  # learnable-prior backward: bounds the [2, programs, D] partials buffer
ELEMENTS_PER_THREAD = 4
INTERPRETER_TILE_ELEMENTS = 1 << 16  # one numpy op per tile; the interpreter's cost is per op


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gpu_tile(block: int) -> tuple[int, int, int]:
    """(rows, num_warps, max_registers) of the GPU tile for chunk width ``block`` (power of 2, 4..1024)."""
    if block == GPU_MAX_BLOCK:
        return 1, GPU_MAX_BLOCK // (32 * ELEMENTS_PER_THREAD), GPU_LONG_ROW_MAX_REGISTERS
    num_warps = 4
    return ELEMENTS_PER_THREAD * 32 * num_warps // block, num_warps, GPU_SHORT_ROW_MAX_REGISTERS


def gpu_tile_configs() -> list[tuple[int, int, int, int]]:
    """Every (block, rows, num_warps, max_registers) the GPU launcher can pick (for AOT compiles)."""
    return [(block, *gpu_tile(block)) for block in (1 << p for p in range(2, GPU_MAX_BLOCK.bit_length()))]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(n_rows: int, d: int, device: torch.device, *, bounded_programs: bool) -> LaunchConfig:
    """Pick the tile and grid for an ``[n_rows, d]`` call.

    A chunk spans the row plus up to 3 columns of a leading partial Philox group (at most 1024
    columns on a GPU). GPU: ``gpu_tile`` rows per tile, one tile per program, unless
    ``bounded_programs`` (learnable-prior backward): then at most a few programs per SM loop over
    row tiles, so the prior partials stay at ``GPU_PROGRAMS_PER_SM * SMs * 2 * D`` floats.
    Interpreter: one chunk per row, tall tiles and 4 programs (one per row phase) when possible,
    because it runs programs one after another and pays per operation, not per element.
    """
    block = triton.next_power_of_2(d if d % 4 == 0 else d + 3)  # + the largest lead
    rows_per_phase = max(1, triton.cdiv(n_rows, ROW_INTERLEAVE))
    if interpreting():
        rows = max(1, min(INTERPRETER_TILE_ELEMENTS // block, triton.next_power_of_2(rows_per_phase)))
        return LaunchConfig(block, rows, triton.cdiv(rows_per_phase, rows), num_warps=1)
    block = min(block, GPU_MAX_BLOCK)
    rows, num_warps, max_registers = gpu_tile(block)
    tiles = 1
    if bounded_programs:
        max_programs_per_phase = max(1, GPU_PROGRAMS_PER_SM * _sm_count(device.index or 0) // ROW_INTERLEAVE)
        tiles = triton.cdiv(triton.cdiv(rows_per_phase, rows), max_programs_per_phase)
    return LaunchConfig(block, rows, tiles, num_warps, max_registers)


# --------------------------------------------------------------------------------------------
# Launchers (docs/interfaces.md §A): inputs already validated, contiguous, on one device
# --------------------------------------------------------------------------------------------
def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (no-op on CPU)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _scalar_launch_args(alpha, seed, offset) -> tuple:
    """``(alpha, seed, offset, alpha_ptr, seed_ptr, offset_ptr)``: a tensor scalar goes as a pointer.

    A Python alpha is rounded to float32 here: a GPU launch does that anyway, but the interpreter
    keeps the double, and ``1.0 - alpha`` would then round differently from the float32 tensor's.
    """
    (alpha, alpha_ptr), (seed, seed_ptr), (offset, offset_ptr) = map(split_scalar, (alpha, seed, offset))
    alpha = struct.unpack("f", struct.pack("f", alpha))[0]
    return alpha, seed, offset, alpha_ptr, seed_ptr, offset_ptr


def forward(h, stats, alpha, seed, offset, prior_mu, prior_logvar, clamp_lo, clamp_hi,
            kl_logvar_coef, sample, *, config: LaunchConfig | None = None):
    """(z_hat [N, D] h.dtype, kl [N] fp32); the fixed prior is an empty ``prior_mu`` / ``prior_logvar``.
    ``config`` overrides the launch choice (tests)."""
    n_rows, d = h.shape
    if not prior_mu.numel():  # the kernel's fixed prior: no pointers (LEARNABLE_PRIOR compiled out)
        prior_mu = prior_logvar = None
    z_hat = torch.empty_like(h)
    kl = torch.empty(n_rows, dtype=torch.float32, device=h.device)
    if n_rows == 0:
        return z_hat, kl
    config = config or launch_config(n_rows, d, h.device, bounded_programs=False)
    with _on_device(h):
        _vib_sample_kl_fwd_kernel[(config.num_programs(n_rows),)](
            h, stats, prior_mu, prior_logvar, z_hat, kl,
            n_rows, d, config.tiles_per_program,
            *_scalar_launch_args(alpha, seed, offset), clamp_lo, clamp_hi, kl_logvar_coef,
            LEARNABLE_PRIOR=prior_mu is not None, SAMPLE=sample, ROWS=config.rows, BLOCK=config.block,
            num_warps=config.num_warps, maxnreg=config.max_registers,
        )
    return z_hat, kl


def backward(grad_z_hat, grad_kl, stats, alpha, seed, offset, prior_mu, prior_logvar, clamp_lo,
             clamp_hi, kl_logvar_coef, sample, *, config: LaunchConfig | None = None):
    """(grad_h, grad_stats [N, 2D], grad_prior_mu, grad_prior_logvar); prior grads empty if fixed."""
    n_rows, d = grad_z_hat.shape
    learnable = prior_mu.numel() > 0
    grad_h = torch.empty_like(grad_z_hat)
    grad_stats = torch.empty_like(stats)
    config = config or launch_config(n_rows, d, stats.device, bounded_programs=learnable)
    num_programs = config.num_programs(n_rows) if n_rows else 0
    partials = torch.empty((2, num_programs, d), dtype=torch.float32, device=stats.device) if learnable else None
    if n_rows:
        with _on_device(stats):
            _vib_sample_kl_bwd_kernel[(num_programs,)](
                grad_z_hat, grad_kl, stats, prior_mu if learnable else None, prior_logvar if learnable else None,
                grad_h, grad_stats, partials,
                n_rows, d, config.tiles_per_program,
                *_scalar_launch_args(alpha, seed, offset), clamp_lo, clamp_hi, kl_logvar_coef,
                LEARNABLE_PRIOR=learnable, SAMPLE=sample, ROWS=config.rows, BLOCK=config.block,
                num_warps=config.num_warps, maxnreg=config.max_registers,
            )
    if not learnable:  # two distinct tensors: custom-op outputs may not alias each other
        return grad_h, grad_stats, torch.empty_like(prior_mu), torch.empty_like(prior_logvar)
    # Fixed-order reductions over programs (zeros when N = 0); two sums so the grads don't alias.
    return grad_h, grad_stats, partials[0].sum(dim=0), partials[1].sum(dim=0)
