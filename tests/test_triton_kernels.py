"""Kernel-level tests of the Triton backend, beyond the shared backend suite (test_vib_sample_kl.py).

They call the launchers directly (docs/interfaces.md §A) with forced launch configurations, to hit the
kernel's own edges: Philox-group alignment at row starts (D % 4 != 0, D < 4), several chunks per row
(D > BLOCK), row tiles and programs that are partly or entirely past the last row, counters and
keys that need their high 32-bit words, and 64-bit index arithmetic. Oracles: the PyTorch reference
math (``vittle_fast.ops.reference``) and the PyTorch Philox (``vittle_fast.ops.philox``).
Runs under TRITON_INTERPRET=1 (set by conftest.py before triton is imported).
"""
import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from op_inputs import launcher_priors, make_inputs  # noqa: E402
from tolerances import TOL, tol  # noqa: E402
from vittle_fast.ops.philox import normal_noise  # noqa: E402
from vittle_fast.ops.reference import KL_LOGVAR_COEF, vib_sample_kl_reference  # noqa: E402
from vittle_fast.ops.triton import vib_sample_kl as kernels  # noqa: E402
from vittle_fast.ops.triton.vib_sample_kl import (  # noqa: E402
    LaunchConfig, _chunk_columns, _element_offsets, _row_lead, _tile_rows,
)

CLAMP = (-2.3025, 2.3025)


def kernel_and_reference(n, d, dtype=torch.float32, *, learnable_prior=True, sample=True, kl_form="standard",
                         alpha=0.6, seed=1234, offset=0, config=None):
    """Outputs and gradients of the Triton launchers and of the reference fed the oracle's noise."""
    h, stats, (prior_mu, prior_logvar), grad_z_hat, grad_kl = make_inputs((n,), d, dtype, learnable_prior)
    launcher_mu, launcher_logvar = launcher_priors(prior_mu, prior_logvar)
    scalars = dict(alpha=alpha, seed=seed, offset=offset, prior_mu=launcher_mu, prior_logvar=launcher_logvar,
                   clamp_lo=CLAMP[0], clamp_hi=CLAMP[1], kl_logvar_coef=KL_LOGVAR_COEF[kl_form], sample=sample)
    z_hat, kl = kernels.forward(h, stats, config=config, **scalars)
    grads = kernels.backward(grad_z_hat, grad_kl, stats, config=config, **scalars)

    leaves = [t.clone().requires_grad_() if t is not None else None for t in (h, stats, prior_mu, prior_logvar)]
    ref_z_hat, ref_kl = vib_sample_kl_reference(*leaves[:2], alpha, normal_noise(seed, offset, n, d), *leaves[2:],
                                                logvar_clamp=CLAMP, kl_form=kl_form, sample=sample)
    torch.autograd.backward([ref_z_hat, ref_kl], [grad_z_hat, grad_kl])
    ref_grads = tuple(t.grad if t is not None else None for t in leaves)
    return (z_hat, kl, grads), (ref_z_hat, ref_kl, ref_grads)


def assert_matches_reference(ours, ref, dtype):
    (z_hat, kl, grads), (ref_z_hat, ref_kl, ref_grads) = ours, ref
    torch.testing.assert_close(z_hat, ref_z_hat, **tol(dtype))
    torch.testing.assert_close(kl, ref_kl, **TOL["float32"])
    for name, got, want in zip(("grad_h", "grad_stats"), grads[:2], ref_grads[:2]):
        torch.testing.assert_close(got, want, **tol(dtype), msg=lambda m, name=name: f"{name}: {m}")
    for name, got, want in zip(("grad_prior_mu", "grad_prior_logvar"), grads[2:], ref_grads[2:]):
        if want is None:  # fixed prior: empty gradients (docs/ops.md)
            assert got.shape == (0,), name
        else:
            torch.testing.assert_close(got, want, **TOL["fp32_sum"], msg=lambda m, name=name: f"{name}: {m}")


# n, d, config: (block, rows per tile, tiles per program)
BOUNDARY_CASES = {
    "D=1": (13, 1, (4, 2, 1)),
    "D=3<4, two chunks for lead>1": (9, 3, (4, 4, 2)),
    "D=7>BLOCK, N % (4*ROWS) != 0": (11, 7, (4, 2, 3)),
    "D=37, partial last chunk": (10, 37, (16, 2, 2)),
    "D=64, exact chunks": (6, 64, (16, 1, 1)),
    "N=1, three programs without rows": (1, 10, (8, 8, 1)),
    "tile taller than the program's rows": (5, 10, (8, 8, 1)),
}


@pytest.mark.parametrize("n,d,config", BOUNDARY_CASES.values(), ids=BOUNDARY_CASES.keys())
def test_chunk_and_row_group_boundaries(n, d, config):
    config = LaunchConfig(*config, num_warps=1)
    assert_matches_reference(*kernel_and_reference(n, d, config=config), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("learnable_prior,sample,kl_form", [(True, True, "released"), (False, False, "standard")])
def test_low_precision_with_several_chunks(dtype, learnable_prior, sample, kl_form):
    ours, ref = kernel_and_reference(7, 23, dtype, learnable_prior=learnable_prior, sample=sample, kl_form=kl_form,
                                     config=LaunchConfig(8, 2, 1, num_warps=1))
    assert ours[0].dtype == dtype and ours[2][0].dtype == dtype and ours[2][1].dtype == dtype
    assert_matches_reference(ours, ref, dtype)


def recovered_noise(n, d, seed, offset, config=None):
    """eps from the forward (alpha=1, mu=0, lv=0 => z_hat = eps exactly) and, independently, from the
    backward (grad_z_hat=1, grad_kl=0 => grad_logvar = eps / 2 exactly)."""
    h, stats = torch.randn(n, d), torch.zeros(n, 2 * d)
    scalars = dict(alpha=1.0, seed=seed, offset=offset, prior_mu=torch.empty(0), prior_logvar=torch.empty(0),
                   clamp_lo=float("-inf"), clamp_hi=float("inf"), kl_logvar_coef=1.0, sample=True)
    z_hat, _ = kernels.forward(h, stats, config=config, **scalars)
    _, grad_stats, _, _ = kernels.backward(torch.ones(n, d), torch.zeros(n), stats, config=config, **scalars)
    return z_hat, 2.0 * grad_stats[:, d:]


SEED_OFFSET_CASES = {
    "small": (0, 0),
    "seed hi word": (2**32 + 5, 0),
    "negative seed, counter crosses 2**32": (-1, 2**32 - 3),
    "large seed and offset": (2**62 + 12345, 2**40 + 7),
    "counter wraps mod 2**64": (-(2**63), 2**63 - 2),
}


@pytest.mark.parametrize("seed,offset", SEED_OFFSET_CASES.values(), ids=SEED_OFFSET_CASES.keys())
def test_noise_is_the_contract_philox_stream(seed, offset):
    """Every element's normal equals the oracle's lane k % 4 of counter offset + k // 4: a wrong
    counter, key word or lane would be off by O(1), not by the 1e-6 transcendental slack."""
    n, d = 6, 7  # D % 4 != 0: Philox groups straddle row boundaries
    from_forward, from_backward = recovered_noise(n, d, seed, offset)
    torch.testing.assert_close(from_forward, normal_noise(seed, offset, n, d), **TOL["noise"])
    assert torch.equal(from_forward, from_backward), "backward must regenerate the forward's noise bit for bit"


def test_noise_does_not_depend_on_tiling():
    default = recovered_noise(9, 13, seed=7, offset=3)
    for config in (LaunchConfig(4, 1, 1, 1), LaunchConfig(8, 2, 3, 1), LaunchConfig(16, 4, 1, 1)):
        tiled = recovered_noise(9, 13, seed=7, offset=3, config=config)
        assert torch.equal(default[0], tiled[0]) and torch.equal(default[1], tiled[1]), config


def test_distinct_seeds_and_offsets_give_distinct_noise():
    base = recovered_noise(4, 8, seed=1, offset=0)[0]
    assert not torch.equal(base, recovered_noise(4, 8, seed=2, offset=0)[0])
    assert not torch.equal(base, recovered_noise(4, 8, seed=1, offset=8)[0])
    # offsets that differ by ceil(N*D/4) counters continue the stream without overlap
    torch.testing.assert_close(recovered_noise(4, 8, seed=1, offset=8)[0], normal_noise(1, 0, 8, 8)[4:], **TOL["noise"])


@triton.jit
def _offsets_probe(out_ptr, pid, tile, tiles_per_program, n_rows, D, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Runs the kernels' own index helpers for an arbitrary program id and stores what they compute."""
    rows, _ = _tile_rows(pid, tile, tiles_per_program, n_rows, ROWS)
    cols, _ = _chunk_columns(1, _row_lead(pid, D), D, BLOCK)
    h_offsets, mu_offsets = _element_offsets(rows, cols, D)
    tile_index = tl.arange(0, ROWS)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(out_ptr + tile_index, h_offsets)
    tl.store(out_ptr + ROWS * BLOCK + tile_index, mu_offsets)


def test_index_arithmetic_is_64_bit():
    """A program far into a huge call: row*D and row*2D exceed 2**32, (pid // 4) * tiles too."""
    pid, tile, tiles_per_program, d, rows_per_tile, block = 4 * 600_000 + 3, 2, 3_000, 4099, 2, 8
    out = torch.empty(2, rows_per_tile, block, dtype=torch.int64)
    _offsets_probe[(1,)](out, pid, tile, tiles_per_program, 2**40, d, ROWS=rows_per_tile, BLOCK=block)

    first = (pid // 4 * tiles_per_program + tile) * rows_per_tile
    rows = [pid % 4 + 4 * (first + r) for r in range(rows_per_tile)]
    lead = rows[0] * d % 4
    assert all(row * d % 4 == lead for row in rows)  # the row interleave keeps Philox alignment
    cols = [block - lead + c for c in range(block)]
    assert rows[0] * d > 2**36
    assert out[0].tolist() == [[row * d + j for j in cols] for row in rows]
    assert out[1].tolist() == [[row * 2 * d + j for j in cols] for row in rows]


def test_gpu_launch_configs_are_the_ahead_of_time_compiled_ones(monkeypatch):
    """Whatever the shape, the GPU launcher picks a tile that tests/test_triton_aot.py compiles, and
    the learnable-prior backward keeps its grid (the partials buffer) to a few programs per SM."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sms = 132
    monkeypatch.setattr(kernels, "_sm_count", lambda device_index: sms)
    compiled = set(kernels.gpu_tile_configs())
    for d in (1, 2, 3, 4, 5, 7, 8, 63, 64, 257, 1000, 4096, 5120, 8191):
        for n in (1, 5, 1000, 100_000):
            for bounded in (False, True):
                config = kernels.launch_config(n, d, torch.device("cuda", 0), bounded_programs=bounded)
                assert (config.block, config.rows, config.num_warps, config.max_registers) in compiled
                assert config.block * config.rows == kernels.ELEMENTS_PER_THREAD * 32 * config.num_warps
                assert config.block >= min(d, kernels.GPU_MAX_BLOCK)
                programs = config.num_programs(n)
                assert programs * config.rows * config.tiles_per_program >= n  # every row is covered
                if bounded:
                    assert programs <= kernels.GPU_PROGRAMS_PER_SM * sms + kernels.ROW_INTERLEAVE


def test_interpreter_launch_config_uses_few_programs():
    config = kernels.launch_config(1000, 257, torch.device("cpu"), bounded_programs=False)
    assert config.block >= 257 + 3 and config.num_programs(1000) <= 16


def test_nan_logvar_propagates_like_the_reference():
    """The clamp keeps NaN (as torch.clamp does) instead of silently turning it into a bound."""
    h, stats, *_ = make_inputs((3,), 5, torch.float32, learnable_prior=False)
    stats[1, 5 + 2] = float("nan")
    scalars = dict(alpha=0.5, seed=3, offset=0, prior_mu=torch.empty(0), prior_logvar=torch.empty(0), clamp_lo=CLAMP[0],
                   clamp_hi=CLAMP[1], kl_logvar_coef=1.0, sample=True)
    z_hat, kl = kernels.forward(h, stats, **scalars)
    ref_z_hat, ref_kl = vib_sample_kl_reference(h, stats, 0.5, normal_noise(3, 0, 3, 5), logvar_clamp=CLAMP)
    assert torch.equal(z_hat.isnan(), ref_z_hat.isnan()) and torch.equal(kl.isnan(), ref_kl.isnan())
    assert kl.isnan().tolist() == [False, True, False]


def test_package_reports_available_under_the_interpreter():
    import vittle_fast.ops.triton as package

    assert package.is_available() and package.load_error() == ""
