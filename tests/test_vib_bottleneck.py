"""One parametrized suite for every backend of ``vib_bottleneck`` / ``vib_bottleneck_grouped``.

The oracle is written from the definition: per group, gather the rows, run ``Linear -> GELU (erf) ->
Linear`` in float64 on the inputs, then the reference tail (``vittle_fast.ops.reference``) with the
contract's noise from the PyTorch Philox, and write the rows back. Outputs and the gradients of every
input (h, weights, priors) are compared, over dtypes, options, odd shapes and group layouts.
"""
import itertools

import pytest
import torch
from tolerances import TOL, mlp_tol

from vittle_fast.ops import available_backends, cpp, vib_bottleneck, vib_bottleneck_grouped, vib_sample_kl
from vittle_fast.ops.philox import normal_noise
from vittle_fast.ops.reference import bottleneck_stats_reference, vib_sample_kl_reference
from vittle_fast.ops.vib_bottleneck import _bottleneck_backward, _bottleneck_forward

BACKENDS = available_backends("cpu")
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]  # the Triton interpreter gets the small grid only
FAST_KERNELS = [b for b in FAST_BACKENDS if b != "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CLAMP = (-2.3025, 2.3025)
ALPHA, SEED = 0.7, 1234


def make_weights(d, dtype, g):
    """One group's MLP, scaled so the log-variances spread past the clamp both ways; biases large
    enough that a dropped bias shows."""
    w1 = torch.randn(d, d, generator=g) / d**0.5
    b1 = 0.5 * torch.randn(d, generator=g)
    w2 = 4.0 * torch.randn(2 * d, d, generator=g) / d**0.5
    b2 = 0.5 * torch.randn(2 * d, generator=g)
    return tuple(t.to(dtype) for t in (w1, b1, w2, b2))


def make_case(n, d, dtype, group_sizes, learnable, covered=None, seed=0):
    """h [n, d], order (a random choice of sum(group_sizes) distinct rows), weights and priors per group
    (learnable[g] says whether group g has a prior), output cotangents."""
    g = torch.Generator().manual_seed(seed)
    m = sum(group_sizes)
    order = torch.randperm(n, generator=g)[:m] if covered is None else covered
    weights = [make_weights(d, dtype, g) for _ in group_sizes]
    priors = [(0.5 * torch.randn(d, generator=g), 3.0 * torch.randn(d, generator=g)) if learn else None
              for learn in learnable]
    h = torch.randn(n, d, generator=g).to(dtype)
    grad_out = torch.randn(n, d, generator=g).to(dtype)
    grad_kl = torch.randn(m, generator=g)
    return h, order, weights, priors, grad_out, grad_kl


def leaves_of(h, weights, priors, dtype=None):
    """Fresh leaf copies (optionally cast) of every differentiable input, and the list of them."""
    cast = (lambda t: t.detach().to(dtype)) if dtype else (lambda t: t.detach().clone())
    h = cast(h).requires_grad_()
    weights = [tuple(cast(t).requires_grad_() for t in w) for w in weights]
    priors = [None if p is None else tuple(cast(t).requires_grad_() for t in p) for p in priors]
    flat = [h] + [t for w in weights for t in w] + [t for p in priors if p is not None for t in p]
    return h, weights, priors, flat


def oracle(h, order, group_sizes, weights, priors, offsets, options, grad_out, grad_kl):
    """Definition in float64 (MLP) + the reference tail; returns (out, kl, grads of every input)."""
    h64, w64, p64, flat = leaves_of(h, weights, priors, torch.float64)
    z_parts, kl_parts = [], []
    for rows, w, prior, offset in zip(order.split(group_sizes), w64, p64, offsets):
        tokens = h64[rows]
        noise = normal_noise(SEED, offset, len(rows), h.shape[1]) if options["sample"] else None
        prior_mu, prior_logvar = prior if prior is not None else (None, None)
        z, kl = vib_sample_kl_reference(tokens, bottleneck_stats_reference(tokens, *w), ALPHA, noise, prior_mu,
                                        prior_logvar, **options)
        z_parts.append(z)
        kl_parts.append(kl)
    out = h64.index_copy(0, order, torch.cat(z_parts))
    kl = torch.cat(kl_parts)
    grads = torch.autograd.grad((out, kl), flat, (grad_out.double(), grad_kl.double()), allow_unused=True)
    return out.detach(), kl.detach(), grads


def run_grouped(backend, h, order, group_sizes, weights, priors, offsets, options, grad_out, grad_kl,
                recompute=False):
    h, weights, priors, flat = leaves_of(h, weights, priors)
    out, kl = vib_bottleneck_grouped(h, order, group_sizes, weights, ALPHA, seed=SEED, offsets=offsets,
                                     priors=priors, backend=backend, recompute=recompute, **options)
    grads = torch.autograd.grad((out, kl), flat, (grad_out, grad_kl), allow_unused=True)
    return out.detach(), kl.detach(), grads


def assert_matches(actual, expected, dtype, what):
    """Scaled comparison: GEMM outputs carry rounding relative to the tensor's scale, not per element."""
    tol = mlp_tol(dtype)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0),
                               msg=lambda m: f"{what}: {m}")


def check(backend, n, d, dtype, group_sizes, learnable, *, kl_form="standard", logvar_clamp=CLAMP, sample=True,
          covered=None, recompute=False, offsets=None):
    h, order, weights, priors, grad_out, grad_kl = make_case(n, d, dtype, group_sizes, learnable, covered)
    offsets = offsets or [77 + (i << 20) for i in range(len(group_sizes))]
    options = dict(logvar_clamp=logvar_clamp, kl_form=kl_form, sample=sample)
    out, kl, grads = run_grouped(backend, h, order, group_sizes, weights, priors, offsets, options, grad_out,
                                 grad_kl, recompute)
    out_ref, kl_ref, grads_ref = oracle(h, order, group_sizes, weights, priors, offsets, options, grad_out, grad_kl)
    assert out.dtype == dtype and out.shape == h.shape and kl.dtype == torch.float32 and kl.shape == order.shape
    assert_matches(out, out_ref, dtype, "out")
    assert_matches(kl, kl_ref, dtype, "kl")
    uncovered = torch.ones(n, dtype=torch.bool)
    uncovered[order] = False
    assert torch.equal(out[uncovered], h[uncovered]), "rows not in order must pass unchanged"
    _, _, _, flat = leaves_of(h, weights, priors)
    for i, (leaf, grad, grad_ref) in enumerate(zip(flat, grads, grads_ref)):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, f"grad {i}"
        assert_matches(grad, grad_ref, dtype, f"grad of input {i}")


# ---------------------------------------------------------------------------------------------
# Against the oracle
# ---------------------------------------------------------------------------------------------
OPTION_GRID = [(dt, learn, "standard", CLAMP, sample) for dt in DTYPES for learn in (False, True)
               for sample in (True, False)]
OPTION_GRID += [(torch.float32, True, "released", CLAMP, True), (torch.float32, False, "standard", None, True)]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype,learnable,kl_form,logvar_clamp,sample", OPTION_GRID,
                         ids=lambda v: str(v).removeprefix("torch."))
def test_every_option_matches_reference(backend, dtype, learnable, kl_form, logvar_clamp, sample):
    check(backend, 23, 37, dtype, [9, 11], [learnable, not learnable], kl_form=kl_form, logvar_clamp=logvar_clamp,
          sample=sample)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("n,d", list(itertools.product([0, 1, 37, 300], [1, 7, 64, 257])), ids=str)
def test_odd_shapes_one_group(backend, n, d):
    check(backend, n, d, torch.float32, [n], [True], covered=torch.arange(n))


GROUP_LAYOUTS = {
    "two groups, every row": (12, [5, 7], None),
    "two groups, rows left out": (15, [4, 6], None),
    "first group empty": (9, [0, 9], None),
    "second group empty": (9, [9, 0], None),
    "no rows at all": (6, [0, 0], None),
    "three groups": (14, [3, 5, 4], None),
}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("layout", list(GROUP_LAYOUTS))
def test_group_layouts(backend, layout):
    n, sizes, covered = GROUP_LAYOUTS[layout]
    learnable = [i % 2 == 0 for i in range(len(sizes))]
    check(backend, n, 10, torch.float32, sizes, learnable, covered=covered)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_blocks_and_recompute(backend):
    """Groups longer than the CPU kernel's 4096-row block (a block starts mid-group, mid-Philox
    stream; D = 5, so that block's first element is mid-counter in the flat stream); recompute on."""
    check(backend, 8400, 5, torch.float32, [4101, 4200], [True, False], recompute=True)
    check(backend, 4200, 5, torch.bfloat16, [97, 4100], [False, True])


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_seed_and_offset(backend):
    check(backend, 9, 10, torch.float32, [4, 5], [False, True], offsets=[2**40 + 3, 2**62 + 1])


TRITON_GRID = [(torch.float32, [True, False], True, "standard"), (torch.bfloat16, [False, True], False, "released"),
               (torch.float16, [True, True], True, "standard")]


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton backend unavailable")
@pytest.mark.parametrize("dtype,learnable,sample,kl_form", TRITON_GRID, ids=str)
def test_triton_matches_reference(dtype, learnable, sample, kl_form):
    """The interpreter is slow: one grouped case per dtype, uncovered rows, mixed priors."""
    check("triton", 21, 12, dtype, [6, 9], learnable, sample=sample, kl_form=kl_form)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton backend unavailable")
@pytest.mark.parametrize("n,d,sizes", [(0, 7, [0, 0]), (1, 1, [1, 0]), (5, 257, [2, 3]), (9, 64, [0, 9]),
                                       (14, 12, [3, 5, 4])], ids=str)
def test_triton_odd_shapes(n, d, sizes):
    """D = 1, 7, 257 (per-element noise path), 64, 12 (four-per-Philox path); empty groups; three groups
    (two launches); recompute."""
    check("triton", n, d, torch.float32, sizes, [i % 2 == 1 for i in range(len(sizes))], recompute=True)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton backend unavailable")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (7, 3), (130, 20)], ids=str)
def test_triton_gelu_backward_pass_matches_aten(dtype, shape):
    """The backward's one-pass GELU (dA = dG * GELU'(A) in place, db1 = column sums of dA, GELU(A)
    beside it) against ATen's ``gelu_backward``, a sum and ``F.gelu`` (exact erf), ragged tiles; without
    STORE_GELU the buffer is untouched."""
    from vittle_fast.ops.triton.vib_bottleneck import _gelu_backward_

    tol = TOL[str(dtype).removeprefix("torch.")]
    g = torch.Generator().manual_seed(shape[0])
    preact = (torch.randn(*shape, generator=g) * 3).to(dtype)
    grad = torch.randn(*shape, generator=g).to(dtype)
    expected_grad = torch.ops.aten.gelu_backward(grad.float(), preact.float()).to(dtype)
    for store in (True, False):
        out, gelu = grad.clone(), torch.full_like(preact, 7.0)
        bias_grad = _gelu_backward_(out, preact, gelu, store)
        torch.testing.assert_close(out, expected_grad, **tol)
        assert bias_grad.dtype == dtype and bias_grad.shape == (shape[1],)
        torch.testing.assert_close(bias_grad, out.float().sum(0).to(dtype), **tol)
        if store:
            torch.testing.assert_close(gelu, torch.nn.functional.gelu(preact.float()).to(dtype), **tol)
        else:
            assert torch.equal(gelu, torch.full_like(preact, 7.0))


# ---------------------------------------------------------------------------------------------
# The contract's equalities
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_equals_unfused_composition_and_grouped(backend):
    """vib_bottleneck == vib_sample_kl(h, MLP(h)) (same noise) == the grouped op's rows; [B, S, D] input."""
    h, _, (weights,), (prior,), _, _ = make_case(10, 8, torch.float32, [10], [True])
    h3 = h.reshape(2, 5, 8)
    z, kl = vib_bottleneck(h3, *weights, ALPHA, seed=SEED, offset=5, prior_mu=prior[0], prior_logvar=prior[1],
                           backend=backend)
    z_unfused, kl_unfused = vib_sample_kl(h3, bottleneck_stats_reference(h3, *weights), ALPHA, seed=SEED, offset=5,
                                          prior_mu=prior[0], prior_logvar=prior[1], backend=backend)
    torch.testing.assert_close(z, z_unfused, **TOL["float32"])
    torch.testing.assert_close(kl, kl_unfused, **TOL["float32"])
    order = torch.tensor([3, 0, 7, 1, 9, 4])
    out, kl_grouped = vib_bottleneck_grouped(h, order, [2, 4], [weights, weights], ALPHA, seed=SEED, offsets=[5, 5],
                                             priors=[prior, prior], backend=backend)
    for rows in (order[:2], order[2:]):
        z_rows, kl_rows = vib_bottleneck(h[rows], *weights, ALPHA, seed=SEED, offset=5, prior_mu=prior[0],
                                         prior_logvar=prior[1], backend=backend)
        torch.testing.assert_close(out[rows], z_rows, **TOL["float32"])
    torch.testing.assert_close(kl_grouped[2:], vib_bottleneck(h[order[2:]], *weights, ALPHA, seed=SEED, offset=5,
                                                              prior_mu=prior[0], prior_logvar=prior[1],
                                                              backend=backend)[1], **TOL["float32"])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic_and_recompute_identical(backend, dtype):
    h, order, weights, priors, grad_out, grad_kl = make_case(150, 24, dtype, [70, 60], [True, False])
    options = dict(logvar_clamp=CLAMP, kl_form="standard", sample=True)
    runs = [run_grouped(backend, h, order, [70, 60], weights, priors, [1, 2 << 30], options, grad_out, grad_kl,
                        recompute) for recompute in (False, False, True)]
    for other in runs[1:]:
        for a, b in zip([runs[0][0], runs[0][1], *runs[0][2]], [other[0], other[1], *other[2]]):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Memory: what backward keeps beyond the inputs
# ---------------------------------------------------------------------------------------------
def saved_bytes(fn, *, exclude):
    """Bytes of the tensors autograd saves during ``fn()`` that are not ``exclude`` (the inputs)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    excluded = {t.data_ptr() for t in exclude}
    return sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in excluded or t.numel() == 0)


@pytest.mark.parametrize("backend", FAST_KERNELS)
def test_saved_for_backward_within_budget(backend):
    """Beyond its inputs: at most preact + stats (N·3D elements), preact alone (N·D) with recompute;
    the eager module (nn.Sequential + fused tail) keeps more."""
    n, d, dtype = 96, 32, torch.bfloat16
    h, order, weights, priors, _, _ = make_case(n, d, dtype, [40, 56], [True, True])
    h, weights, priors, flat = leaves_of(h, weights, priors)
    inputs = flat + [order] + [t.float() for p in priors for t in p]  # the fp32 prior copies are inputs too

    def call(recompute):
        return lambda: vib_bottleneck_grouped(h, order, [40, 56], weights, ALPHA, seed=0, offsets=[0, 1 << 20],
                                              priors=priors, backend=backend, recompute=recompute)

    element = h.element_size()
    eager = saved_bytes(lambda: vib_sample_kl(h, torch.nn.functional.linear(torch.nn.functional.gelu(
        torch.nn.functional.linear(h, *weights[0][:2])), *weights[0][2:]), ALPHA, seed=0, backend=backend),
        exclude=inputs)
    default, recompute = saved_bytes(call(False), exclude=inputs), saved_bytes(call(True), exclude=inputs)
    assert default <= n * 3 * d * element, (default, n * 3 * d * element)
    assert recompute <= n * d * element, (recompute, n * d * element)
    assert recompute < default < eager, (recompute, default, eager)


# ---------------------------------------------------------------------------------------------
# torch.library / torch.compile plumbing
# ---------------------------------------------------------------------------------------------
def op_args(backend, learnable, recompute, tensor_scalars):
    h, order, weights, priors, grad_out, grad_kl = make_case(11, 6, torch.float32, [4, 5], learnable)
    w1s, b1s, w2s, b2s = ([w[i] for w in weights] for i in range(4))
    no_prior = torch.empty(0)  # the convention below the public API
    mus = [no_prior if p is None else p[0] for p in priors]
    logvars = [no_prior if p is None else p[1] for p in priors]
    scalars = (ALPHA, 7, [3, 1 << 20], None, None, None)
    if tensor_scalars:  # (value placeholders, tensors): ops/scalars.py
        scalars = (0.0, 0, [0, 0], torch.tensor(ALPHA), torch.tensor(7), torch.tensor([3, 1 << 20]))
    forward = (h, order, [4, 5], w1s, b1s, w2s, b2s, *scalars, mus, logvars, -2.3025, 2.3025, 1.0, True, recompute,
               backend)
    return forward, grad_out, grad_kl


@pytest.mark.parametrize("backend", FAST_KERNELS)
@pytest.mark.parametrize("learnable,recompute,tensor_scalars", [([False, False], False, False),
                                                                ([True, False], True, True)])
def test_opcheck(backend, learnable, recompute, tensor_scalars):
    forward, grad_out, grad_kl = op_args(backend, learnable, recompute, tensor_scalars)
    leaf = lambda t: t.clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    args = [[leaf(t) for t in a] if isinstance(a, list) else leaf(a) for a in forward]
    torch.library.opcheck(_bottleneck_forward, tuple(args))
    out, kl, preact, stats = _bottleneck_forward(*forward)
    torch.library.opcheck(_bottleneck_backward, (grad_out, grad_kl, *forward[:-1], preact, stats, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_scalars_equal_python_scalars_bitwise(backend):
    """alpha / seed / offsets as 0-dim tensors (ops/scalars.py) give exactly the Python-scalar results,
    also for a seed >= 2**63 (its int64 view) and a mix of tensor and Python offsets."""
    h, order, weights, priors, grad_out, grad_kl = make_case(13, 8, torch.float32, [6, 5], [True, False])
    seed, offsets = 2**63 + 5, [9, 1 << 33]
    results = []
    for alpha_, seed_, offsets_ in ((ALPHA, seed, offsets),
                                    (torch.tensor(ALPHA), torch.tensor(seed - 2**64), [offsets[0], torch.tensor(offsets[1])])):
        leaf_h, leaf_w, leaf_p, flat = leaves_of(h, weights, priors)
        out, kl = vib_bottleneck_grouped(leaf_h, order, [6, 5], leaf_w, alpha_, seed=seed_, offsets=offsets_,
                                         priors=leaf_p, backend=backend)
        results.append([out, kl, *torch.autograd.grad((out, kl), flat, (grad_out, grad_kl))])
    for python, tensor in zip(*results):
        assert torch.equal(python, tensor)


@pytest.mark.parametrize("backend", FAST_KERNELS)
def test_compiled_step_does_not_recompile_as_alpha_seed_offsets_move(backend):
    h, order, weights, priors, _, _ = make_case(12, 9, torch.float32, [5, 7], [True, False])
    counts = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counts.clear()  # the counters outlive reset(): count this test's graphs only

    def step(h, alpha, seed, offset):
        out, kl = vib_bottleneck_grouped(h, order, [5, 7], weights, alpha, seed=seed, offsets=[offset, offset + 64],
                                         priors=priors, backend=backend)
        return out.sum() + kl.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for i in range(5):
        torch.testing.assert_close(compiled(h, 0.1 * i, 100 + i, 8 * i), step(h, 0.1 * i, 100 + i, 8 * i),
                                   **TOL["float32"])
    assert counts["stats"]["unique_graphs"] <= 2, dict(counts["stats"])


@pytest.mark.parametrize("backend", FAST_KERNELS)
def test_torch_compile_fullgraph_matches_eager(backend):
    h, order, weights, priors, _, _ = make_case(12, 9, torch.float32, [5, 7], [True, False])

    def loss_fn(h, order, weights, priors):
        out, kl = vib_bottleneck_grouped(h, order, [5, 7], weights, ALPHA, seed=42, offsets=[0, 1 << 20],
                                         priors=priors, backend=backend)
        return (out * out).sum() + kl.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        leaf_h, leaf_w, leaf_p, flat = leaves_of(h, weights, priors)
        loss = fn(leaf_h, order, leaf_w, leaf_p)
        results.append([loss.detach(), *torch.autograd.grad(loss, flat)])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, **TOL["float32"])


# ---------------------------------------------------------------------------------------------
# Input validation at the public boundary
# ---------------------------------------------------------------------------------------------
D = 4


def _w(d=D, dtype=torch.float32):
    return (torch.randn(d, d, dtype=dtype), torch.randn(d, dtype=dtype), torch.randn(2 * d, d, dtype=dtype),
            torch.randn(2 * d, dtype=dtype))


BAD_GROUPED = {
    "w1 shape": (dict(weights=[(torch.randn(D, D + 1), *_w()[1:]), _w()]), ValueError, r"weights\[0\].w1"),
    "w2 shape": (dict(weights=[_w(), (*_w()[:2], torch.randn(D, D), _w()[3])]), ValueError, r"weights\[1\].w2"),
    "b2 shape": (dict(weights=[(*_w()[:3], torch.randn(D)), _w()]), ValueError, r"weights\[0\].b2"),
    "weight dtype": (dict(weights=[_w(dtype=torch.bfloat16), _w()]), TypeError, r"weights\[0\].w1"),
    "weight device": (dict(weights=[_w(), tuple(t.to("meta") for t in _w())]), ValueError, r"weights\[1\].w1"),
    "weights count": (dict(weights=[_w()]), ValueError, "weights"),
    "offsets count": (dict(offsets=[0]), ValueError, "offsets"),
    "sizes sum": (dict(group_sizes=[2, 2]), ValueError, "group_sizes"),
    "sizes negative": (dict(group_sizes=[-1, 6]), TypeError, "group_sizes"),
    "order dtype": (dict(order=torch.arange(5, dtype=torch.int32)), TypeError, "order"),
    "order too long": (dict(order=torch.arange(7), group_sizes=[3, 4]), ValueError, "order"),
    "order out of range": (dict(order=torch.tensor([0, 1, 2, 3, 6])), RuntimeError, "order"),
    "order negative": (dict(order=torch.tensor([0, 1, 2, 3, -1])), RuntimeError, "order"),
    "order duplicate": (dict(order=torch.tensor([0, 1, 2, 2, 3])), RuntimeError, "order"),
    "order device": (dict(order=torch.arange(5, device="meta")), ValueError, "order"),
    "prior shape": (dict(priors=[None, (torch.zeros(D + 1), torch.zeros(D + 1))]), ValueError, r"priors\[1\]"),
    "prior not a pair": (dict(priors=[torch.zeros(D), None]), TypeError, r"priors\[0\]"),
    "priors count": (dict(priors=[None]), ValueError, "priors"),
    "h 3-d": (dict(h=torch.randn(1, 6, D)), ValueError, "h"),
    "h integer": (dict(h=torch.ones(6, D, dtype=torch.int64)), TypeError, "h"),
    "alpha": (dict(alpha=2.0), ValueError, "alpha"),
    "seed": (dict(seed=-1), ValueError, "seed"),
    "offset": (dict(offsets=[0, -1]), ValueError, "offset"),
    "kl form": (dict(kl_form="paper"), ValueError, "kl_form"),
    "recompute": (dict(recompute=1), TypeError, "recompute"),
}


@pytest.mark.parametrize("case", list(BAD_GROUPED), ids=str)
def test_grouped_bad_input_names_the_argument(case):
    overrides, error, argument = BAD_GROUPED[case]
    kwargs = dict(h=torch.randn(6, D), order=torch.tensor([5, 0, 2, 3, 1]), group_sizes=[2, 3], weights=[_w(), _w()],
                  alpha=0.5, seed=0, offsets=[0, 8]) | overrides
    with pytest.raises(error, match=argument):
        vib_bottleneck_grouped(kwargs.pop("h"), kwargs.pop("order"), kwargs.pop("group_sizes"), kwargs.pop("weights"),
                               kwargs.pop("alpha"), **kwargs)


@pytest.mark.parametrize("backend", ["cpp", "reference"])  # checked in C++ / by device asserts
@pytest.mark.parametrize("case", ["order out of range", "order negative", "order duplicate"])
def test_grouped_bad_order_rows_are_refused_on_every_backend(case, backend):
    if backend == "cpp" and not cpp.is_available():
        pytest.skip(cpp.load_error())
    overrides, error, argument = BAD_GROUPED[case]
    with pytest.raises(error, match=argument):
        vib_bottleneck_grouped(torch.randn(6, D), overrides["order"], [2, 3], [_w(), _w()], 0.5, seed=0,
                               offsets=[0, 8], backend=backend)


BAD_SINGLE = {
    "w1 shape": (dict(w1=torch.randn(D + 1, D)), ValueError, "w1"),
    "b1 dtype": (dict(b1=torch.randn(D, dtype=torch.float64)), TypeError, "b1"),
    "prior alone": (dict(prior_mu=torch.zeros(D)), ValueError, "prior_mu"),
    "prior device": (dict(prior_mu=torch.zeros(D, device="meta"), prior_logvar=torch.zeros(D)), ValueError,
                     "prior_mu"),
    "offset": (dict(offset=1.5), TypeError, "offset"),
    "sample": (dict(sample=1), TypeError, "sample"),
    "backend": (dict(backend="cuda"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(BAD_SINGLE), ids=str)
def test_single_bad_input_names_the_argument(case):
    overrides, error, argument = BAD_SINGLE[case]
    w1, b1, w2, b2 = _w()
    kwargs = dict(h=torch.randn(3, D), w1=w1, b1=b1, w2=w2, b2=b2, alpha=0.5, seed=0) | overrides
    with pytest.raises(error, match=argument):
        positional = [kwargs.pop(k) for k in ("h", "w1", "b1", "w2", "b2", "alpha")]
        vib_bottleneck(*positional, **kwargs)
