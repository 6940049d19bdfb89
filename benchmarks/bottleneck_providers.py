"""The three ways of running Vittle's whole bottleneck (MLP + sample + KL) that the benchmark compares,
and their predicted H100 cost (a prediction: no GPU here).

- ``eager``: the released code's way: ``nn.Sequential``-style MLP, then the sample/KL step one
  PyTorch op per line (``benchmarks.vib_sample_kl_providers.eager_released``).
- ``module``: today's unfused module path: the same MLP, then the fused tail
  ``vib_sample_kl(..., backend="cpp")`` (``VittleConfig.fused_mlp=False``).
- ``fused``: ``vib_bottleneck(..., backend="cpp")`` (``VittleConfig.fused_mlp=True``).

GPU model (a per-kernel roofline): each kernel takes max(FLOPs / (peak x ``GEMM_EFFICIENCY``),
bytes / HBM bandwidth). Every GEMM of this grid is compute-bound (arithmetic intensity >= ~450
FLOP/B for bf16 at D = 1024, above the H100's ~207 FLOP/B ridge at 70% of peak), so a GEMM takes its
FLOP time and the bytes of an epilogue fused into it are hidden unless they exceed it; an elementwise
pass takes its bytes. Hence predicted = GEMM-FLOP floor + the bytes of the passes that are not in a
GEMM (+ any GEMM's bytes beyond its FLOP time). Non-GEMM bytes and launches are counted from the
recorded ATen ops (eager, module: a ``TorchDispatchMode`` on meta tensors, as benchmarks/gpu_model.py)
or from the fused kernels' I/O (fused: the Triton launches of ops/triton/vib_bottleneck.py).
``bound``: the floor plus the one pass no design with a materialised ``dstats`` avoids (read
``stats`` and ``grad_out``, write ``dstats``: 5·N·D elements) -- computing ``dstats`` inside the dgrad
GEMM instead would redo the noise for every output column tile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.gpu_model import H100_BYTES_PER_S, _KernelCounter, _saved_bytes, fused_cost
from benchmarks.vib_sample_kl_providers import ALPHA, LOGVAR_CLAMP, eager_released
from vittle_fast.ops import vib_bottleneck, vib_sample_kl

PROVIDERS = ["eager", "module", "fused"]
# H100 SXM dense peaks: bf16 tensor cores 989 TFLOP/s; fp32 (no TF32, as torch's default) 67 TFLOP/s.
H100_PEAK_FLOPS = {torch.bfloat16: 989e12, torch.float32: 67e12}
GEMM_EFFICIENCY = 0.7  # the stated fraction of peak a large cuBLAS/Triton GEMM reaches
_GEMM_OPS = {"mm", "addmm", "bmm", "matmul"}


def mlp(h, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)


def provider_fn(name: str):
    """``fn(h, w1, b1, w2, b2) -> (z_hat, kl)``."""
    if name == "eager":
        return lambda h, *w: eager_released(h, mlp(h, *w))
    if name == "module":
        return lambda h, *w: vib_sample_kl(h, mlp(h, *w), ALPHA, seed=1234, logvar_clamp=LOGVAR_CLAMP, backend="cpp")
    return lambda h, *w: vib_bottleneck(h, *w, ALPHA, seed=1234, logvar_clamp=LOGVAR_CLAMP, backend="cpp")


def make_inputs(n: int, d: int, dtype: torch.dtype, device: str = "cpu"):
    """Leaves ``(h, w1, b1, w2, b2)`` (nn.Linear-like scales) and cotangents ``(grad_z, grad_kl)``."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        if device == "meta":
            return torch.empty(*shape, dtype=dtype, device="meta")
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    leaves = [rand(n, d), rand(d, d, scale=d**-0.5), rand(d, scale=0.1), rand(2 * d, d, scale=2 * d**-0.5),
              rand(2 * d, scale=0.1)]
    leaves = [t.requires_grad_() for t in leaves]
    return leaves, (rand(n, d), rand(n).float() if device != "meta" else torch.empty(n, device="meta"))


def run_step(fn, leaves, cotangents):
    z_hat, kl = fn(*leaves)
    torch.autograd.backward((z_hat, kl), cotangents)
    for t in leaves:
        t.grad = None


def saved_bytes(name: str, n: int, d: int, dtype: torch.dtype) -> tuple[int, int]:
    """Measured (saved_tensors_hooks, unique storages, CPU tensors): (all, beyond the inputs)."""
    leaves, _ = make_inputs(n, d, dtype)
    return _saved_bytes(lambda: provider_fn(name)(*leaves), leaves)


def gemm_flops(n: int, d: int) -> int:
    """Forward 2·N·D·D + 2·N·D·2D, backward twice that (dgrad + wgrad)."""
    return 3 * (2 * n * d * d + 2 * n * d * 2 * d)


def _recorded_non_gemm(name: str, n: int, d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes, launches) of the eager ops of a step (GEMMs launch but their bytes are in the FLOP
    term). ``module``: the MLP's ops recorded, plus the fused tail's I/O (gpu_model.fused_cost)."""
    leaves, (grad_z, grad_kl) = make_inputs(n, d, dtype, device="meta")

    class NonGemmCounter(_KernelCounter):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in _GEMM_OPS:
                self.cost.launches += 1
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    counter = NonGemmCounter()
    with counter:
        if name == "eager":
            torch.autograd.backward(provider_fn("eager")(*leaves), (grad_z, grad_kl))
        else:
            torch.autograd.backward(mlp(*leaves), torch.empty(n, 2 * d, dtype=dtype, device="meta"))
    if name == "eager":
        return counter.cost.bytes, counter.cost.launches
    tail = fused_cost(n, d, dtype, "fwd+bwd")
    return counter.cost.bytes + tail.bytes, counter.cost.launches + tail.launches


def fused_kernels(n: int, d: int, dtype: torch.dtype, recompute: bool = False) -> list[tuple[str, int, int]]:
    """(kernel, FLOPs, bytes) of every launch of the Triton path (ops/triton/vib_bottleneck.py) for
    one group of ``n`` rows, forward + backward; ``stats`` saved (the default) or recomputed. Bytes:
    everything the kernel reads or writes. benchmarks/predict.py counts its (d)/(d') rows from this."""
    e = torch.empty((), dtype=dtype).element_size()
    nd, dd = n * d * e, d * d * e
    kl_partials = 4 * n * (d // 64)  # fp32, one per 64-wide column tile
    stats_io = 0 if recompute else 2 * nd
    # fp32 column partials of the bias gradients, one row per row tile (64 rows: tail, 32: GELU pass)
    db2_partials, db1_partials = 4 * 2 * d * -(-n // 64), 4 * d * -(-n // 32)
    # backward tail: grad_out, grad_kl -> dstats, (1 - alpha) dz, db2 partials; stats read, or
    # recomputed by GEMM2
    tail_io = nd + 4 * n + 2 * nd + nd + db2_partials
    tail = [("GELU recompute", 0, 2 * nd),
            ("gemm2 recompute + tail backward", 2 * n * d * 2 * d, nd + 2 * dd + tail_io)] \
        if recompute else [("tail backward", 0, 2 * nd + tail_io)]
    return [
        # forward: GEMM1 (gathered h, W1 -> preact, GELU), GEMM2 + tail (GELU, W2, h -> z_hat, stats, KL)
        ("gemm1 + bias + GELU", 2 * n * d * d, nd + dd + 2 * nd),
        ("gemm2 + sample/KL", 2 * n * d * 2 * d, nd + 2 * dd + nd + nd + stats_io + kl_partials),
        ("KL partial sum", 0, kl_partials + 4 * n),
        # backward: tail, dG, GELU pass (dA in place, db1 partials; GELU(A) too unless recomputed
        # above), wgrads, the partials' sums, dh = (1 - alpha) dz + dA W1 (addmm_: reads and writes its C)
        *tail,
        ("db2 = sum of partials", 0, db2_partials + 2 * d * e),
        ("dG = dstats W2", 2 * n * 2 * d * d, 2 * nd + 2 * dd + nd),
        ("GELU backward" + ("" if recompute else " + GELU"), 0, (3 if recompute else 4) * nd + db1_partials),
        ("db1 = sum of partials", 0, db1_partials + d * e),
        ("dW2 = dstats^T G", 2 * 2 * d * n * d, 2 * nd + nd + 2 * dd),
        ("dW1 = dA^T h", 2 * d * n * d, 2 * nd + dd),
        ("dh += dA W1", 2 * n * d * d, nd + dd + 2 * nd),
    ]


def _roofline_us(flops: int, nbytes: int, dtype: torch.dtype) -> float:
    return max(flops / (H100_PEAK_FLOPS[dtype] * GEMM_EFFICIENCY), nbytes / H100_BYTES_PER_S) * 1e6


def predicted(name: str, n: int, d: int, dtype: torch.dtype) -> dict:
    """Predicted H100 fwd+bwd (per-kernel roofline, module doc): GEMM-FLOP floor, bytes of the passes
    outside the GEMMs, launches, time (µs); ``name`` is a provider or ``"bound"``."""
    floor_us = gemm_flops(n, d) / (H100_PEAK_FLOPS[dtype] * GEMM_EFFICIENCY) * 1e6
    if name == "fused":
        kernels = fused_kernels(n, d, dtype)
        nongemm = sum(nbytes for _, flops, nbytes in kernels if not flops)
        launches, time_us = len(kernels), sum(_roofline_us(flops, nbytes, dtype) for _, flops, nbytes in kernels)
    else:  # GEMMs compute-bound (module doc), the rest memory-bound
        if name == "bound":
            nongemm, launches = 5 * n * d * torch.empty((), dtype=dtype).element_size(), None
        else:  # recorded ops
            nongemm, launches = _recorded_non_gemm(name, n, d, dtype)
        time_us = floor_us + nongemm / H100_BYTES_PER_S * 1e6
    return {"gemm_floor_us": floor_us, "bytes": nongemm, "launches": launches, "h100_us": time_us}
