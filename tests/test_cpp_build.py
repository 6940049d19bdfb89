"""The compiled backend (csrc/): CUDA kernels compile for sm_80/sm_90 without spills, the full CUDA
extension links and loads against a CUDA build of torch (slow), and the C++ kernel agrees with the
Triton backend (interpreter) bit for bit on the Philox stream and within tolerance elsewhere.

Correctness against the reference is the shared suite's job (tests/test_vib_sample_kl.py).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from op_inputs import launcher_priors, make_inputs
from tolerances import TOL

from vittle_fast.ops import cpp

ROOT = Path(__file__).resolve().parents[1]
KERNELS_ONLY = ROOT / "csrc" / "vib_sample_kl_kernels_only.cu"
ARCHS = ("80", "90")
CLAMP = (-2.3025, 2.3025)

needs_cpp = pytest.mark.skipif(not cpp.is_available(), reason=f"C++ extension unavailable: {cpp.load_error()}")


def _triton_backend():
    from vittle_fast.ops import triton as triton_backend

    if not triton_backend.is_available():
        pytest.skip(f"Triton backend unavailable: {triton_backend.load_error()}")
    return triton_backend


# ------------------------------------------------------------------------------------------------
# CUDA toolchain
# ------------------------------------------------------------------------------------------------
def parse_ptxas_report(text: str) -> list[dict]:
    """One dict per compiled kernel: arch, kernel, registers, spill stores/loads, stack frame."""
    entries = []
    for match in re.finditer(
        r"Compiling entry function '(?P<kernel>[^']+)' for 'sm_(?P<arch>\d+)'\s*\n"
        r".*?(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads\s*\n"
        r".*?Used (?P<regs>\d+) registers",
        text,
        flags=re.DOTALL,
    ):
        entries.append({k: (v if k == "kernel" else int(v)) for k, v in match.groupdict().items()})
    return entries


def test_ptxas_report_parser_reads_spills():
    """The parser must see spills when ptxas reports them, or the no-spill test could never fail."""
    report = (
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 0 barriers\n"
    )
    assert parse_ptxas_report(report) == [
        {"kernel": "_Z1kv", "arch": 90, "stack": 8, "stores": 4, "loads": 12, "regs": 255}
    ]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: CUDA kernels not compiled")
def test_cuda_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    result = subprocess.run(
        ["nvcc", "-c", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xptxas", "-v", *gencode,
         str(KERNELS_ONLY), "-o", str(tmp_path / "kernels.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    entries = parse_ptxas_report(result.stderr)
    print(f"\n{'arch':>5} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9}  kernel")
    for e in entries:
        print(f"sm_{e['arch']:<2} {e['regs']:>5} {e['stack']:>6} {e['stores']:>9} {e['loads']:>9}  {e['kernel']}")
    # 2 directions x 3 dtypes x (vector, scalar) + the reduction kernel, for each architecture.
    assert sorted({e["arch"] for e in entries}) == [int(a) for a in ARCHS]
    assert len(entries) == len(ARCHS) * 13
    spilling = [e for e in entries if e["stores"] or e["loads"]]
    assert not spilling, f"kernels spill registers: {spilling}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: cannot build the CUDA extension")
def test_cuda_extension_builds_links_and_loads():
    """Builds vittle_fast._C with its CUDA kernels against torch==2.14.1 (CUDA 13) in a separate venv,
    loads it with torch.ops.load_library and checks CPU, CUDA and Meta kernels are registered."""
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "build_cuda_extension.sh")],
        capture_output=True, text=True, timeout=3000, env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "OK: CUDA extension built, linked and loaded" in result.stdout


CUDA_MAX_GRID_X, CUDA_MAX_GRID_Y = 2**31 - 1, 65535


@needs_cpp
@pytest.mark.parametrize("elems_per_thread", [1, 4, 8])
@pytest.mark.parametrize("dim", [1, 7, 4096, 65535 * 256, 65535 * 256 + 1, 2**31 + 3, 2**40])
def test_cuda_launch_grid_covers_any_dim_within_limits(dim, elems_per_thread):
    """The CUDA launchers' grid (host code shared with this build): the backward's column tiles
    go on grid.y, capped at 65,535 with blocks looping over tiles y, y + grid.y, ..., so every
    column is covered for any D (D > 65,535 * 256 on the scalar path used to exceed the limit)."""
    n_tokens = 1000
    tpr, fwd_blocks, bwd_x, bwd_y, tiles = torch.ops.vittle_fast.cuda_launch_geometry(n_tokens, dim, elems_per_thread)
    assert tpr in (32, 64, 128, 256)
    assert fwd_blocks * (256 // tpr) >= n_tokens and fwd_blocks <= CUDA_MAX_GRID_X
    assert bwd_x * 32 >= n_tokens and bwd_x <= CUDA_MAX_GRID_X
    assert tiles * tpr * elems_per_thread >= dim > (tiles - 1) * tpr * elems_per_thread  # tiles cover D
    assert 1 <= bwd_y <= CUDA_MAX_GRID_Y and bwd_y == min(tiles, CUDA_MAX_GRID_Y)  # each tile has a block y


# ------------------------------------------------------------------------------------------------
# Cross-backend agreement (C++ vs Triton interpreter)
# ------------------------------------------------------------------------------------------------
@needs_cpp
def test_philox_known_answer():
    """Random123's Philox4x32-10 known-answer vector: counter 0, key 0 (kat_vectors)."""
    words = torch.ops.vittle_fast.philox_uint32(0, torch.zeros(1, dtype=torch.int64))
    assert words.tolist() == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]]


@needs_cpp
def test_philox_stream_matches_triton_randint4x():
    _triton_backend()
    import triton
    import triton.language as tl

    @triton.jit
    def randint4x_kernel(out_ptr, counters_ptr, seed, n, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        mask = idx < n
        counters = tl.load(counters_ptr + idx, mask=mask, other=0).to(tl.uint64)
        r0, r1, r2, r3 = tl.randint4x(seed, counters)
        for lane, r in enumerate((r0, r1, r2, r3)):
            tl.store(out_ptr + idx * 4 + lane, r.to(tl.int64) & 0xFFFFFFFF, mask=mask)

    counters = torch.tensor([0, 1, 2, 3, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 7, 2**62 + 3], dtype=torch.int64)
    for seed in (0, 123456789, -(2**62) - 17, 2**63 - 1):
        expected = torch.zeros(counters.numel(), 4, dtype=torch.int64)
        randint4x_kernel[(1,)](expected, counters, seed, counters.numel(), BLOCK=16)
        actual = torch.ops.vittle_fast.philox_uint32(seed, counters)
        assert torch.equal(actual, expected & 0xFFFFFFFF), f"seed {seed}"


@needs_cpp
@pytest.mark.parametrize("n, d, offset", [(3, 64, 0), (5, 7, 2**33 + 1)])
def test_noise_matches_triton_backend(n, d, offset):
    """alpha = 1, mu = 0, lv = 0 makes z_hat the raw noise eps of each backend."""
    triton_backend = _triton_backend()
    h = torch.randn(n, d)
    stats = torch.zeros(n, 2 * d)
    args = (h, stats, 1.0, -987654321, offset, *launcher_priors(None, None), -float("inf"), float("inf"), 1.0, True)
    eps_cpp, _ = cpp.vib_sample_kl.forward(*args)
    eps_triton, _ = triton_backend.vib_sample_kl.forward(*args)
    torch.testing.assert_close(eps_cpp, eps_triton, **TOL["noise"])


@needs_cpp
@pytest.mark.parametrize("learnable_prior", [False, True])
def test_outputs_and_gradients_match_triton_backend(learnable_prior):
    triton_backend = _triton_backend()
    h, stats, priors, grad_z, grad_kl = make_inputs((6,), 40, torch.float32, learnable_prior)
    scalars = (0.7, 2**40 + 3, 12, *launcher_priors(*priors), *CLAMP, 0.5, True)
    results = {}
    for name, backend in (("cpp", cpp), ("triton", triton_backend)):
        z_hat, kl = backend.vib_sample_kl.forward(h, stats, *scalars)
        grads = backend.vib_sample_kl.backward(grad_z, grad_kl, stats, *scalars)
        results[name] = (z_hat, kl, *grads)
    for got, expected in zip(results["cpp"], results["triton"]):
        torch.testing.assert_close(got, expected, **TOL["float32"])


@needs_cpp
def test_results_do_not_depend_on_the_thread_count():
    """Prior gradients are reduced over fixed-size row chunks in a fixed order: bitwise equal
    whatever the number of threads (D = 1024 makes every 64-row chunk its own parallel task, and
    N spans four chunks, the last one partial)."""
    h, stats, (prior_mu, prior_logvar), grad_z, grad_kl = make_inputs((200,), 1024, torch.float32, True)
    scalars = (0.3, 5, 0, prior_mu, prior_logvar, *CLAMP, 1.0, True)
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append((*cpp.vib_sample_kl.forward(h, stats, *scalars),
                         *cpp.vib_sample_kl.backward(grad_z, grad_kl, stats, *scalars)))
    finally:
        torch.set_num_threads(previous)
    for single, multi in zip(*runs):
        assert torch.equal(single, multi)


needs_avx512 = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512", reason="CPU without AVX-512: one CPU path only"
)


def _bytes(t):
    return None if t is None else t.contiguous().view(torch.uint8)


@needs_cpp
@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, d", [(3, 64), (5, 77), (67, 4096)])
def test_avx512_rows_equal_portable_rows_bitwise(monkeypatch, dtype, n, d):
    """The AVX-512 row loops restate the portable ones operation for operation: same bytes out,
    including NaN / inf inputs, saturated exp, both priors, sampling on and off, clamp off, and
    rows that start mid-counter (d = 77)."""
    cases = []
    for learnable in (False, True):
        h, stats, priors, grad_z, grad_kl = make_inputs((n,), d, dtype, learnable)
        flat = stats.view(-1)
        flat[::97], flat[5::101], flat[7::103], flat[11::107] = float("nan"), 200.0, -300.0, float("inf")
        for sample, clamp in ((True, CLAMP), (False, CLAMP), (True, (-float("inf"), float("inf")))):
            cases.append((h, stats, grad_z, grad_kl,
                          (0.3, -(2**40) - 5, 2**33 + 3, *launcher_priors(*priors), *clamp, 0.5, sample)))
    outputs = {}
    for path in ("1", "0"):
        monkeypatch.setenv("VITTLE_FAST_CPU_AVX512", path)
        assert torch.ops.vittle_fast.cpu_row_kernel(d) == ("avx512" if path == "1" else "portable")
        outputs[path] = [
            (*cpp.vib_sample_kl.forward(h, stats, *scalars), *cpp.vib_sample_kl.backward(grad_z, grad_kl, stats, *scalars))
            for h, stats, grad_z, grad_kl, scalars in cases
        ]
    for simd, portable in zip(outputs["1"], outputs["0"]):
        for got, expected in zip(simd, portable):
            assert (got is None) == (expected is None)
            if got is not None:
                assert torch.equal(_bytes(got), _bytes(expected))


@needs_cpp
@pytest.mark.parametrize("path", ["1", "0"])  # the AVX-512 loops, and ATen's GELU they replace
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bottleneck_gelu_matches_float64(monkeypatch, path, dtype):
    """GELU and its backward of the C++ bottleneck on CPU against float64, over the whole range
    (very negative x, where GELU underflows; 0). NaN stays NaN; at +-inf the AVX-512 loops give
    float64's values (ATen's float32 GELU gives NaN at +inf, so only the AVX-512 path is held to it)."""
    monkeypatch.setenv("VITTLE_FAST_CPU_AVX512", path)
    x = torch.cat([torch.linspace(-12.0, 12.0, 4001), torch.randn(1000) * 3,
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")])]).to(dtype)
    grad = torch.linspace(-2.0, 2.0, x.numel()).to(dtype)
    x64 = x.double().requires_grad_()
    expected = torch.nn.functional.gelu(x64)
    (expected_grad,) = torch.autograd.grad(expected, x64, grad.double())
    got = torch.ops.vittle_fast.gelu_rows(x)
    got_grad = torch.ops.vittle_fast.gelu_rows_backward(grad, x)
    atol = TOL["gelu_cpu"]["atol"] * x.double().abs().clamp(min=1.0)
    for value, reference in ((got, expected.detach()), (got_grad, expected_grad)):
        assert value.dtype == dtype and value.shape == x.shape
        value = value.double()
        finite = x.isfinite()
        if path == "1":
            assert torch.equal(value[~finite].nan_to_num(), reference[~finite].nan_to_num())
        assert value[x.isnan()].isnan().all()
        error = (value - reference)[finite].abs()
        rounding = 0.0 if dtype == torch.float32 else TOL[str(dtype).removeprefix("torch.")]["rtol"]  # output rounding
        bound = atol[finite] + rounding * reference[finite].abs()
        assert (error <= bound).all(), f"max error {error.max():.3g}"


@needs_cpp
def test_meta_kernels_give_output_shapes():
    """The Meta registrations let FakeTensor / torch.compile trace the raw ops."""
    h = torch.empty(4, 8, device="meta", dtype=torch.bfloat16)
    stats = torch.empty(4, 16, device="meta", dtype=torch.bfloat16)
    prior = torch.empty(8, device="meta")
    no_prior = torch.empty(0, device="meta")
    z_hat, kl = torch.ops.vittle_fast.fused_sample_kl_fwd(h, stats, 0.5, 1, 0, *[None] * 3, no_prior, no_prior, *CLAMP,
                                                           1.0, True)
    assert (z_hat.shape, z_hat.dtype, kl.shape, kl.dtype) == (h.shape, h.dtype, (4,), torch.float32)
    grads = torch.ops.vittle_fast.fused_sample_kl_bwd(
        h, torch.empty(4, device="meta"), stats, 0.5, 1, 0, *[None] * 3, prior, prior, *CLAMP, 1.0, True
    )
    assert [tuple(g.shape) for g in grads] == [(4, 8), (4, 16), (8,), (8,)]


# ------------------------------------------------------------------------------------------------
# The GPU cost model of benchmarks/ (hand-counted oracles)
# ------------------------------------------------------------------------------------------------
def test_gpu_model_counts_eager_kernels_and_bytes():
    from benchmarks.gpu_model import _KernelCounter

    a = torch.empty(4, 8, device="meta")  # 128 bytes each
    b = torch.empty(4, 8, device="meta")
    with _KernelCounter() as counter:
        (a + b).chunk(2)  # one kernel: reads 2 x 128 B, writes 128 B; chunk is a view
        torch.randn_like(a)  # one kernel: writes 128 B, reads nothing
        torch.empty_like(a)  # no kernel
    assert (counter.cost.launches, counter.cost.bytes) == (2, 3 * 128 + 128)


def test_gpu_model_fused_io_matches_the_contract():
    from benchmarks.gpu_model import fused_cost

    n, d = 2, 3  # bf16: h 12 B, stats 24 B, z_hat 12 B, kl 8 B (fp32)
    assert fused_cost(n, d, torch.bfloat16, "fwd").bytes == 12 + 24 + 12 + 8
    # + backward: grad_z_hat 12, grad_kl 8, stats 24 -> grad_h 12, grad_stats 24
    assert fused_cost(n, d, torch.bfloat16, "fwd+bwd").bytes == 56 + 12 + 8 + 24 + 12 + 24
