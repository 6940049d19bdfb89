"""CPU microbenchmark (pytest-benchmark) of the whole bottleneck, forward + backward: the released
code's eager way, today's module path (MLP + fused tail) and the fused ``vib_bottleneck``, in one run
so the ratios are comparable (benchmarks/bottleneck_providers.py; report: benchmarks/bottleneck_report.py).

    python -m pytest benchmarks/test_bench_vib_bottleneck.py --benchmark-json=out.json
    VITTLE_BENCH_QUICK=1 ...   # one small shape (CI)

The measured shapes are smaller than the predicted grid (N 4096/16384 x D 1024/4096): one fwd+bwd at
N = 16384, D = 4096 is ~5 TFLOP, minutes per round on a shared 2-core CPU.
"""
import statistics
import time

import pytest
import torch

from benchmarks.bottleneck_providers import PROVIDERS, make_inputs, provider_fn, run_step, saved_bytes
from benchmarks.vib_sample_kl_providers import QUICK
from vittle_fast.ops import available_backends

SHAPES = [(256, 256)] if QUICK else [(4096, 1024)]
DTYPES = [torch.bfloat16, torch.float32]
ROUNDS = 2 if QUICK else 3


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}xD{s[1]}")
def test_vib_bottleneck(benchmark, provider, dtype, shape):
    if "cpp" not in available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    leaves, cotangents = make_inputs(*shape, dtype)
    fn = provider_fn(provider)
    run_step(fn, leaves, cotangents)  # warm-up outside the timing
    saved, saved_extra = saved_bytes(provider, *shape, dtype)
    benchmark.extra_info.update(provider=provider, dtype=str(dtype).removeprefix("torch."), n=shape[0], d=shape[1],
                                threads=torch.get_num_threads(), saved_bytes=saved, saved_extra_bytes=saved_extra)
    benchmark.pedantic(run_step, args=(fn, leaves, cotangents), rounds=ROUNDS, iterations=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}xD{s[1]}")
def test_vib_bottleneck_paired(benchmark, dtype, shape):
    """The three providers round-robin in every round (the machine is shared: load drifts between
    the per-provider tests above); per-provider medians and the ratios go to extra_info."""
    if "cpp" not in available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    leaves, cotangents = make_inputs(*shape, dtype)
    fns = {name: provider_fn(name) for name in PROVIDERS}
    for fn in fns.values():
        run_step(fn, leaves, cotangents)
    times = {name: [] for name in PROVIDERS}

    def one_round():
        for name, fn in fns.items():
            start = time.perf_counter()
            run_step(fn, leaves, cotangents)
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=ROUNDS + 2, iterations=1)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    benchmark.extra_info.update(provider="paired", dtype=str(dtype).removeprefix("torch."), n=shape[0], d=shape[1],
                                threads=torch.get_num_threads(), median_ms=medians,
                                fused_vs_module=medians["module"] / medians["fused"],
                                fused_vs_eager=medians["eager"] / medians["fused"])
