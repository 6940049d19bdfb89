"""CPU microbenchmarks (pytest-benchmark): eager released-code style vs torch.compile vs the fused
C++ kernel, forward and forward + backward, in one run so the ratios are comparable.

    python -m pytest benchmarks/test_bench_vib_sample_kl.py --benchmark-json=out.json
    VITTLE_BENCH_QUICK=1 ...   # one small shape (CI)
"""
import pytest
import torch

from benchmarks.vib_sample_kl_providers import DTYPES, MODES, PROVIDERS, QUICK, SHAPES, make_inputs, provider_fn, run_step
from vittle_fast.ops import cpp

ROUNDS = 2 if QUICK else 5


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}xD{s[1]}")
def test_vib_sample_kl(benchmark, provider, mode, dtype, shape):
    if provider == "cpp" and not cpp.is_available():
        pytest.skip(cpp.load_error())
    inputs = make_inputs(*shape, dtype, requires_grad=(mode == "fwd+bwd"))
    fn = provider_fn(provider)
    run_step(fn, mode, *inputs)  # warm-up (and torch.compile's compilation) outside the timing
    benchmark.extra_info.update(provider=provider, mode=mode, dtype=str(dtype).removeprefix("torch."),
                                n=shape[0], d=shape[1], threads=torch.get_num_threads())
    benchmark.pedantic(run_step, args=(fn, mode, *inputs), rounds=ROUNDS, iterations=1)
