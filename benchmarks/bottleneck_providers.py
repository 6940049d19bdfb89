"""The three ways of running Vittle's whole bottleneck (MLP + sample + KL) that the benchmark compares,
and their predicted H100 cost (a prediction: no GPU here).

- ``eager``: the released code's way: ``nn.Sequential``-style MLP, then the sample/KL step one
  PyTorch op per line (``benchmarks.vib_sample_kl_providers.eager_released``).
- ``module``: today's unfused module path: the same MLP, then the fused tail
  ``vib_sample_kl(..., backend="cpp")`` (``VittleConfig.fused_mlp=False``).
- ``fused``: ``vib_bottleneck(..., backend="cpp")`` (``VittleConfig.fused_mlp=True``).

GPU model: time = GEMM FLOPs / (peak x ``GEMM_EFFICIENCY``) + bytes of the non-GEMM passes / HBM
bandwidth. Non-GEMM bytes and launches are counted from the recorded ATen ops (eager, module: a
``TorchDispatchMode`` on meta tensors, as benchmarks/gpu_model.py) or from the fused kernels' I/O
(fused: the Triton launches of ops/triton/vib_bottleneck.py, whose GEMM epilogues hold the
elementwise work).
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


def _fused_non_gemm(n: int, d: int, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes and launches of the Triton path outside the GEMM operand streams (their epilogues'
    extra I/O and the backward's elementwise passes); one group."""
    e = torch.empty((), dtype=dtype).element_size()
    nd = n * d
    forward = (2 * nd) * e + (nd * e + nd * e + 4 * n * (d // 64))  # GEMM1 writes preact + GELU;
    # GEMM2 epilogue reads h, writes z_hat, KL partials (64-wide column tiles); stats is saved (2·N·D)
    forward += 2 * nd * e
    backward = 2 * nd * e  # GELU recomputed from preact
    backward += (nd + 2 * nd) * e + 4 * n  # tail epilogue: reads grad_out (+ grad_kl), writes dstats
    backward += 3 * nd * e  # gelu_backward: dG, preact -> dA
    backward += 2 * nd * e + 2 * nd * e  # (1 - alpha) dz, then + dA W1 (read/write of grad_h)
    launches = 2 + 1 + 1 + 1 + 4 + 2 + 1  # 2 fwd; GELU, tail, gelu_bwd, 4 GEMMs, 2 bias sums, scale
    return forward + backward, launches


def predicted(name: str, n: int, d: int, dtype: torch.dtype) -> dict:
    """Predicted H100 fwd+bwd: GEMM-FLOP floor, non-GEMM bytes, launches, time (µs)."""
    nongemm, launches = _fused_non_gemm(n, d, dtype) if name == "fused" else _recorded_non_gemm(name, n, d, dtype)
    floor_us = gemm_flops(n, d) / (H100_PEAK_FLOPS[dtype] * GEMM_EFFICIENCY) * 1e6
    return {"gemm_floor_us": floor_us, "bytes": nongemm, "launches": launches,
            "h100_us": floor_us + nongemm / H100_BYTES_PER_S * 1e6}

