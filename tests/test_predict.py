"""benchmarks.predict counts kernels, FLOPs, syncs and host->device bytes of each bottleneck
implementation; benchmarks.step_overhead's released mode does the released code's work. The oracles
are hand counts from the released code (vittle_llama.py) and the MLP shapes, not the code under test."""
import pytest
import torch
from torch import nn

from benchmarks import predict
from benchmarks.step_overhead import Host, released_bottleneck, released_kl

MODEL = predict.Model(d=64, n_layers=4, layer=2, params=1e6, vocab=100)
TOKENS = predict.SEQUENCES * predict.SEQ_LEN


def test_released_trace_counts_the_released_host_work():
    trace = predict.released_trace(MODEL, device_noise=False)
    # every token gets noise drawn on the host and copied in h's dtype (bf16)
    assert trace.host_noise_elements == TOKENS * MODEL.d
    assert trace.h2d_bytes == TOKENS * MODEL.d * 2
    # text KL: mu[mask], logvar[mask] forward and their index_put backward (a nonzero each), plus the
    # two `kl > 10000` checks
    assert trace.syncs == 4 + 2
    # one torch.cat of the whole sequence per modality, each reading and writing [16, 900, d] bf16;
    # the other two cats are the backward of torch.chunk (stats' gradient, [rows, 2d] per modality)
    cats = sorted(k.bytes for k in trace.kernels if k.name == "cat")
    visual = predict.SEQUENCES * predict.VISUAL_POSITIONS
    stats_grads = [2 * rows * 2 * MODEL.d * 2 for rows in (TOKENS - visual, visual)]
    assert cats == sorted([*stats_grads, 2 * TOKENS * MODEL.d * 2, 2 * TOKENS * MODEL.d * 2])
    # Linear(d, d) + Linear(d, 2d) over every token, forward + dgrad + wgrad
    assert sum(k.flops for k in trace.kernels) == 18 * MODEL.d**2 * TOKENS == predict.bottleneck_flops(MODEL)


def test_device_noise_variant_moves_no_host_bytes():
    trace = predict.released_trace(MODEL, device_noise=True)
    assert trace.host_noise_elements == trace.h2d_bytes == 0
    assert [k.name for k in trace.kernels].count("randn") == 2


def test_fused_variants_have_no_sync_and_the_expected_flops():
    tail = predict.fused_tail_trace(MODEL)
    assert tail.syncs == 0 and tail.h2d_bytes == 0
    assert sum(k.flops for k in tail.kernels) == 18 * MODEL.d**2 * TOKENS
    # the fused op: one forward and one backward kernel per modality; the MLPs eager (fused_mlp=False):
    # 2 GEMMs forward, 4 backward per modality, and no other path's kernels (a reference tail's Philox)
    assert sum(k.name.startswith("vib_sample_kl") for k in tail.kernels) == 4
    assert sum(k.flops > 0 for k in tail.kernels) == 12
    assert not {"bitwise_xor", "log", "cos"} & {k.name for k in tail.kernels}
    saved = predict.fused_bottleneck_trace(MODEL, recompute=False)
    recomputed = predict.fused_bottleneck_trace(MODEL, recompute=True)
    assert sum(k.flops for k in saved.kernels) == 18 * MODEL.d**2 * TOKENS
    # recomputing stats = GEMM2 forward again: 2 * d * 2d per token
    assert sum(k.flops for k in recomputed.kernels) == 22 * MODEL.d**2 * TOKENS


def test_predicted_time_is_the_roofline_of_each_kernel():
    gpu = predict.GPUS["A100-80GB"]
    trace = predict.Trace(kernels=[predict.Kernel("mm", 10, flops=10**12), predict.Kernel("add", 10**9)], syncs=2)
    result = predict.predict(trace, gpu, host_noise_s=0.0, flop_floor=10**12)
    peak = gpu.bf16 * predict.assumption("gemm_efficiency")
    bandwidth = gpu.hbm * predict.assumption("memory_efficiency")
    assert result["parts_ms"]["GEMMs"] == pytest.approx(1e12 / peak * 1e3)
    assert result["parts_ms"]["other kernels"] == pytest.approx(1e9 / bandwidth * 1e3)
    assert result["parts_ms"]["host syncs"] == pytest.approx(2 * predict.assumption("sync_us") * 1e-3)


class _FixedNoise(Host):
    def __init__(self):
        self.checks = 0

    def noise(self, shape, dtype, device):
        return torch.full(shape, 0.5, dtype=dtype, device=device)

    def exceeds(self, value, limit):
        self.checks += 1
        return super().exceeds(value, limit)


def test_released_bottleneck_is_the_released_expression_with_a_straight_through_clamp():
    torch.manual_seed(0)
    d, split = 8, 3
    h = torch.randn(2, 5, d, requires_grad=True)
    mlp = nn.Linear(d, 2 * d)
    with torch.no_grad():
        mlp.bias[d:] = 10.0  # log-variances far above the clamp
    out, mu, logvar = released_bottleneck(h, mlp, slice(0, split), 0.25, _FixedNoise())
    # written from vittle_llama.py: mu + exp(clamped lv / 2) * eps, interpolated, the rest untouched
    stats = mlp(h[:, :split])
    expected = 0.75 * h[:, :split] + 0.25 * (stats[..., :d] + torch.exp(stats[..., d:].clamp(-2.3025, 2.3025) / 2) * 0.5)
    torch.testing.assert_close(out[:, :split], expected)
    assert torch.equal(out[:, split:], h[:, split:])
    assert float(logvar.detach().max()) == pytest.approx(2.3025)
    # .data.clamp_ is invisible to autograd: the gradient reaches the clamped-away log-variances
    out.sum().backward()
    assert mlp.bias.grad[d:].abs().min() > 0


def test_released_kl_masks_rows_and_checks_for_explosions():
    host = _FixedNoise()
    mu, logvar = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.int32)
    kl = released_kl(mu, logvar, mask, host)
    rows = mask.bool()
    expected = -0.5 * (1 + logvar[rows] / 2 - mu[rows].pow(2) - logvar[rows].exp()).mean()
    torch.testing.assert_close(kl, expected)
    assert host.checks == 1
    big = released_kl(torch.full((1, 2, 3), 1e3), torch.zeros(1, 2, 3), None, host)
    assert float(big) == 10000.0
