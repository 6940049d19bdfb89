"""One parametrized suite for every compiled backend of ``vib_sample_kl`` against the reference.

Each kernel backend (Triton under the interpreter, the C++ CPU kernel) is compared with
``vittle_fast.ops.reference`` fed the contract's noise from the PyTorch Philox oracle, on the forward
outputs and on every gradient, over dtypes, options and odd shapes.
"""
import itertools
import math
import os

import pytest
import torch
import torch._dynamo.testing
from op_inputs import launcher_priors, make_inputs
from tolerances import TOL, tol

from vittle_fast.ops import available_backends, vib_sample_kl
from vittle_fast.ops.philox import normal_noise
from vittle_fast.ops.reference import vib_sample_kl_reference
from vittle_fast.ops.backends import resolve_backend
from vittle_fast.ops.vib_sample_kl import _fused_backward, _fused_forward

CPU_KERNEL_BACKENDS = [b for b in available_backends("cpu") if b != "reference"]
# On a machine with a GPU the correctness tests also run every CUDA backend ("name@cuda"; run with
# TRITON_INTERPRET=0 to test the compiled Triton kernels rather than the interpreter).
KERNEL_BACKENDS = CPU_KERNEL_BACKENDS + (
    [f"{b}@cuda" for b in available_backends("cuda") if b != "reference"] if torch.cuda.is_available() else []
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CLAMP = (-2.3025, 2.3025)
ALPHA = 0.7  # not 0.5, so swapping alpha and 1 - alpha cannot pass


def test_required_backends_are_available():
    """CI names the backends it built (VITTLE_REQUIRE_BACKENDS); a broken import must fail, not skip."""
    required = [b for b in os.environ.get("VITTLE_REQUIRE_BACKENDS", "").split(",") if b]
    missing = [b for b in required if b not in available_backends("cpu")]
    assert not missing, f"backends {missing} required but unavailable; available: {available_backends('cpu')}"


def backend_device(case: str) -> tuple[str, str]:
    """``"triton"`` -> (triton, cpu); ``"cpp@cuda"`` -> (cpp, cuda)."""
    backend, _, device = case.partition("@")
    return backend, device or "cpu"


def on_device(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def run(fn, h, stats, priors, grad_z, grad_kl, **kwargs):
    """Forward + backward through ``fn``; returns outputs and the gradients of every input."""
    leaves = [h.clone().requires_grad_(), stats.clone().requires_grad_()]
    leaves += [p.clone().requires_grad_() for p in priors if p is not None]
    prior_mu, prior_logvar = (leaves[2], leaves[3]) if len(leaves) == 4 else (None, None)
    z_hat, kl = fn(leaves[0], leaves[1], prior_mu=prior_mu, prior_logvar=prior_logvar, **kwargs)
    grads = torch.autograd.grad((z_hat, kl), leaves, (grad_z, grad_kl), allow_unused=True)
    return z_hat.detach(), kl.detach(), grads


def reference_fn(seed, offset, alpha, **options):
    """The oracle: reference math on fp32 copies, noise from the PyTorch Philox."""
    def fn(h, stats, prior_mu, prior_logvar):
        d = h.shape[-1]
        noise = normal_noise(seed, offset, h.numel() // d, d).reshape(h.shape)
        return vib_sample_kl_reference(h, stats, alpha, noise, prior_mu, prior_logvar, **options)
    return fn


def check_against_reference(backend, lead_shape, d, dtype, learnable_prior, kl_form="standard",
                            logvar_clamp=CLAMP, sample=True, alpha=ALPHA, seed=1234, offset=77, inputs=None):
    """``inputs`` (``make_inputs``' tuple) replaces the random inputs of ``lead_shape``, ``d``."""
    backend, device = backend_device(backend)
    h, stats, priors, grad_z, grad_kl = inputs or make_inputs(lead_shape, d, dtype, learnable_prior)
    options = dict(logvar_clamp=logvar_clamp, kl_form=kl_form, sample=sample)
    z, kl, grads = run(
        lambda *a, **k: vib_sample_kl(*a, alpha, seed=seed, offset=offset, backend=backend, **k, **options),
        *on_device(device, h, stats), on_device(device, *priors), *on_device(device, grad_z, grad_kl),
    )
    z, kl, grads = z.cpu(), kl.cpu(), [None if g is None else g.cpu() for g in grads]
    fp32 = lambda t: None if t is None else t.float()  # noqa: E731
    z_ref, kl_ref, grads_ref = run(
        reference_fn(seed, offset, alpha, **options),
        fp32(h), fp32(stats), tuple(map(fp32, priors)), fp32(grad_z), grad_kl,
    )
    assert z.dtype == dtype and z.shape == h.shape
    assert kl.dtype == torch.float32 and kl.shape == h.shape[:-1]
    torch.testing.assert_close(z.float(), z_ref.to(dtype).float(), **tol(dtype), msg="z_hat")
    torch.testing.assert_close(kl, kl_ref, **TOL["float32"], msg="kl")
    names = ["h", "stats", "prior_mu", "prior_logvar"]
    for name, grad, grad_ref in zip(names, grads, grads_ref):
        assert grad.dtype == {"h": h, "stats": stats}.get(name, torch.empty(0)).dtype, f"grad {name} dtype"
        expected_tol = tol(dtype) if name in ("h", "stats") else TOL["fp32_sum"]
        torch.testing.assert_close(grad.float(), grad_ref.to(grad.dtype).float(), **expected_tol,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


OPTION_GRID = list(itertools.product(DTYPES, [False, True], ["standard", "released"], [CLAMP, None], [True, False]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype,learnable_prior,kl_form,logvar_clamp,sample", OPTION_GRID,
                         ids=lambda v: str(v).removeprefix("torch."))
def test_every_option_matches_reference(backend, dtype, learnable_prior, kl_form, logvar_clamp, sample):
    check_against_reference(backend, (19,), 37, dtype, learnable_prior, kl_form, logvar_clamp, sample)


SHAPES = [(lead, d) for lead in [(0,), (1,), (37,), (2, 9)] for d in (1, 7, 64, 257)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("lead_shape,d", SHAPES, ids=str)
@pytest.mark.parametrize("learnable_prior", [False, True])
def test_odd_shapes_match_reference(backend, lead_shape, d, learnable_prior):
    check_against_reference(backend, lead_shape, d, torch.float32, learnable_prior)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_endpoints(backend, alpha):
    check_against_reference(backend, (5,), 9, torch.float32, True, alpha=alpha)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_large_seed_and_offset_use_the_high_words(backend):
    """Seeds >= 2**63 and offsets >= 2**32 exercise the high key and counter words."""
    check_against_reference(backend, (3,), 10, torch.float32, False, seed=2**64 - 12345, offset=2**40 + 3)


# ---------------------------------------------------------------------------------------------
# Noise: reproducibility, independence of streams, distribution
# ---------------------------------------------------------------------------------------------
def recovered_noise(backend, n, d, seed, offset):
    """With h = 0, mu = 0, lv = 0 and alpha = 1, z_hat is exactly the noise the kernel drew."""
    backend, device = backend_device(backend)
    h = torch.zeros(n, d, device=device)
    stats = torch.zeros(n, 2 * d, device=device)
    z, _ = vib_sample_kl(h, stats, 1.0, seed=seed, offset=offset, backend=backend)
    return z.cpu()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_noise_reproducible_and_seed_offset_sensitive(backend):
    base = recovered_noise(backend, 6, 10, seed=5, offset=0)
    assert torch.equal(base, recovered_noise(backend, 6, 10, seed=5, offset=0))
    assert not torch.allclose(base, recovered_noise(backend, 6, 10, seed=6, offset=0))
    assert not torch.allclose(base, recovered_noise(backend, 6, 10, seed=5, offset=1))
    # The contract: offset + 1 shifts the stream by one counter = four elements.
    shifted = recovered_noise(backend, 6, 10, seed=5, offset=1)
    torch.testing.assert_close(shifted.flatten()[:-4], base.flatten()[4:], **TOL["noise"])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_noise_equals_philox_oracle(backend):
    torch.testing.assert_close(recovered_noise(backend, 7, 13, seed=99, offset=5), normal_noise(99, 5, 7, 13),
                               **TOL["noise"])


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_noise_is_standard_normal_and_uncorrelated(backend):
    n, d = 256, 512
    eps = recovered_noise(backend, n, d, seed=2024, offset=0).double()
    count = eps.numel()
    five_sigma = 5.0 / math.sqrt(count)
    assert abs(eps.mean().item()) < five_sigma
    assert abs(eps.var().item() - 1.0) < 5.0 * math.sqrt(2.0 / count)
    kurtosis = ((eps - eps.mean()) ** 4).mean().item() / eps.var().item() ** 2
    assert abs(kurtosis - 3.0) < 5.0 * math.sqrt(24.0 / count)

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return ((a * b).mean() / (a.std() * b.std())).item()

    assert abs(corr(eps[:, :-1], eps[:, 1:])) < 5.0 / math.sqrt(n * (d - 1)), "neighbouring elements"
    assert abs(corr(eps[:, ::4][:, :-1], eps[:, ::4][:, 1:])) < 5.0 / math.sqrt(n * d / 4), "neighbouring counters"
    assert abs(corr(eps[:-1], eps[1:])) < 5.0 / math.sqrt((n - 1) * d), "neighbouring tokens"


# ---------------------------------------------------------------------------------------------
# Determinism, autograd plumbing, memory
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(backend, dtype):
    backend, device = backend_device(backend)
    h, stats, priors, grad_z, grad_kl = make_inputs((3, 33), 40, dtype, learnable_prior=True)
    inputs = (*on_device(device, h, stats), on_device(device, *priors), *on_device(device, grad_z, grad_kl))
    call = lambda *a, **k: vib_sample_kl(*a, ALPHA, seed=3, offset=11, backend=backend, **k)  # noqa: E731
    first, second = run(call, *inputs), run(call, *inputs)
    for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_saved_for_backward_is_only_stats(backend):
    h, stats, priors, _, _ = make_inputs((64,), 96, torch.bfloat16, learnable_prior=True)
    h.requires_grad_(), stats.requires_grad_()
    prior_mu, prior_logvar = (p.requires_grad_() for p in priors)
    saved_bytes = []

    def pack(t):
        saved_bytes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vib_sample_kl(h, stats, ALPHA, seed=0, prior_mu=prior_mu, prior_logvar=prior_logvar, backend=backend)
    stats_bytes = stats.numel() * stats.element_size()
    assert stats_bytes <= sum(saved_bytes) <= stats_bytes + 4096, saved_bytes


def tensor_scalars(alpha, seed, offset, device="cpu"):
    """The 0-dim tensors equal to Python scalars (ops/scalars.py): the seed as its int64 view."""
    return (torch.tensor(alpha, dtype=torch.float32, device=device),
            torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64, device=device),
            torch.tensor(offset, dtype=torch.int64, device=device))


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("learnable_prior", [False, True])
@pytest.mark.parametrize("as_tensors", [False, True], ids=["python_scalars", "tensor_scalars"])
def test_opcheck(backend, learnable_prior, as_tensors):
    h, stats, priors, grad_z, grad_kl = make_inputs((4,), 12, torch.float32, learnable_prior)
    prior_mu, prior_logvar = launcher_priors(*priors)
    scalars = (0.0, 0, 0, *tensor_scalars(ALPHA, 7, 3)) if as_tensors else (ALPHA, 7, 3, None, None, None)
    options = (-2.3025, 2.3025, 1.0, True, backend)
    leaf = lambda t: None if t is None else t.clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(_fused_forward, (leaf(h), leaf(stats), *scalars, leaf(prior_mu), leaf(prior_logvar),
                                           *options))
    # The backward op has no autograd formula of its own (no double backward): plain tensors.
    torch.library.opcheck(_fused_backward, (grad_z, grad_kl, stats, *scalars, prior_mu, prior_logvar, *options))


SCALAR_CASES = {  # alpha, seed, offset; which of them go as tensors
    "all tensors": (0.3, 2**63 + 5, 2**40 + 3, "alpha seed offset"),
    "seed above 2**63": (0.7, 2**64 - 1, 9, "seed"),
    "alpha only": (1 / 3, 11, 0, "alpha"),
    "offset only": (0.5, 123, 2**33 + 1, "offset"),
}


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("case", list(SCALAR_CASES), ids=str)
def test_tensor_scalars_equal_python_scalars_bitwise(backend, case):
    """alpha / seed / offset as 0-dim tensors give bitwise the outputs and gradients of the Python
    scalars (a seed >= 2**63 as its int64 view)."""
    alpha, seed, offset, as_tensors = SCALAR_CASES[case]
    tensors = dict(zip(("alpha", "seed", "offset"), tensor_scalars(alpha, seed, offset)))
    python = dict(alpha=alpha, seed=seed, offset=offset)
    mixed = {name: tensors[name] if name in as_tensors.split() else value for name, value in python.items()}
    h, stats, priors, grad_z, grad_kl = make_inputs((5,), 11, torch.bfloat16, learnable_prior=True)
    results = []
    for scalars in (python, mixed):
        call = lambda *a, s=scalars, **k: vib_sample_kl(*a, **s, backend=backend, **k)  # noqa: E731
        z_hat, kl, grads = run(call, h, stats, priors, grad_z, grad_kl)
        results.append([z_hat, kl, *grads])
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_scalar_tensor_changed_before_backward_raises(backend):
    """The backward regenerates the forward's noise from the saved scalar tensors: advancing them in
    place between a forward and its backward must fail loudly, not draw other noise."""
    h, stats, _, _, _ = make_inputs((3,), 8, torch.float32, learnable_prior=False)
    alpha_t, seed_t, offset_t = tensor_scalars(0.5, 3, 0)
    z, _ = vib_sample_kl(h, stats.requires_grad_(), alpha_t, seed=seed_t, offset=offset_t, backend=backend)
    seed_t.fill_(4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


COMPILE_CASES = [  # the interpreter makes the Triton case slow: its tensor-scalar variant runs in the slow tier
    pytest.param(backend, as_tensors, id=f"{backend}-{'tensor' if as_tensors else 'python'}_scalars",
                 marks=[pytest.mark.slow] if backend == "triton" and as_tensors else [])
    for backend in available_backends("cpu") for as_tensors in (False, True)
]


@pytest.mark.parametrize("backend,as_tensors", COMPILE_CASES)
def test_torch_compile_with_moving_scalars(backend, as_tensors):
    """A compiled training step whose alpha, seed and offset change every call: fullgraph holds, at
    most two compiles for ten values (the first specialisation, then one dynamic graph; one with
    tensors), and the loss and every gradient equal eager's bitwise."""
    def loss_fn(h, stats, prior_mu, prior_logvar, alpha, seed, offset):
        z, kl = vib_sample_kl(h, stats, alpha, seed=seed, offset=offset, prior_mu=prior_mu,
                              prior_logvar=prior_logvar, backend=backend)
        return (z * z).sum() + kl.sum()

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    h, stats, priors, _, _ = make_inputs((2, 5), 11, torch.float32, learnable_prior=True)
    for step in range(10):
        scalars = (0.05 + 0.1 * step, 1000 + 7919 * step, 64 * step)
        if as_tensors:
            scalars = tensor_scalars(*scalars)
        results = []
        for fn in (loss_fn, compiled):
            leaves = [t.clone().requires_grad_() for t in (h, stats, *priors)]
            loss = fn(*leaves, *scalars)
            results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
        for eager, traced in zip(*results):
            assert torch.equal(traced, eager), f"step {step}"
    assert counter.frame_count <= (1 if as_tensors else 2), counter.frame_count


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_empty_input_gives_empty_outputs_and_a_graph(backend):
    h = torch.randn(0, 8, requires_grad=True)
    stats = torch.randn(0, 16, requires_grad=True)
    z, kl = vib_sample_kl(h, stats, ALPHA, seed=0, backend=backend)
    assert z.shape == (0, 8) and kl.shape == (0,)
    grad_h, grad_stats = torch.autograd.grad(z.sum() + kl.sum(), (h, stats))
    assert grad_h.shape == (0, 8) and grad_stats.shape == (0, 16)


# ---------------------------------------------------------------------------------------------
# The reference itself, against an independent formulation
# ---------------------------------------------------------------------------------------------
def test_reference_kl_equals_torch_distributions():
    """Eq. 8 (standard form, learnable prior, no clamp) equals torch.distributions' Gaussian KL."""
    mu, logvar = torch.randn(6, 5), torch.randn(6, 5)
    prior_mu, prior_logvar = torch.randn(5), torch.randn(5)
    _, kl = vib_sample_kl_reference(torch.zeros(6, 5), torch.cat([mu, logvar], -1), 0.5, None, prior_mu,
                                    prior_logvar, logvar_clamp=None, sample=False)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(prior_mu, torch.exp(0.5 * prior_logvar))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(posterior, prior).mean(-1), **TOL["float32"])


def released_kl(mu, logsigma_sq, mu_prior=None, logsigma_sq_prior=None):
    """Per-token KL as the released code writes it (vittle_llama.py ``vib_kld_loss`` for the fixed
    prior, ``vib_kld_loss_lp`` for the learnable one), averaged over D instead of over everything."""
    logsigma = logsigma_sq / 2
    if mu_prior is None:
        return -0.5 * (1 + logsigma - mu.pow(2) - logsigma_sq.exp()).mean(-1)
    logsigma_prior = logsigma_sq_prior / 2
    return -0.5 * (1 + (logsigma - logsigma_prior) - (mu - mu_prior).pow(2) / (2 * logsigma_prior).exp()
                   - (2 * logsigma).exp() / (2 * logsigma_prior).exp()).mean(-1)


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("learnable_prior", [False, True])
def test_released_form_matches_the_released_code(backend, learnable_prior):
    """kl_form="released": KL and every gradient (prior_logvar's included: the released code halves
    the prior's log-variance too) equal the released code's expression."""
    _, stats, priors, _, grad_kl = make_inputs((6,), 5, torch.float32, learnable_prior)
    leaves = [t.clone().requires_grad_() for t in (stats, *priors) if t is not None]
    prior_mu, prior_logvar = leaves[1:] if learnable_prior else (None, None)
    _, kl = vib_sample_kl(torch.zeros(6, 5), leaves[0], 0.5, seed=0, prior_mu=prior_mu, prior_logvar=prior_logvar,
                          logvar_clamp=None, kl_form="released", sample=False, backend=backend)
    released = [t.clone().requires_grad_() for t in (stats, *priors) if t is not None]
    expected = released_kl(*released[0].split(5, dim=-1), *released[1:])
    torch.testing.assert_close(kl, expected, **TOL["float32"])
    grads = torch.autograd.grad(kl, leaves, grad_kl)
    expected_grads = torch.autograd.grad(expected, released, grad_kl)
    for name, got, want in zip(("stats", "prior_mu", "prior_logvar"), grads, expected_grads):
        torch.testing.assert_close(got, want, **TOL["fp32_sum"], msg=lambda m, n=name: f"grad of {n}: {m}")


def test_reference_clamp_is_straight_through():
    """Forward uses the clamped log-variance; its gradient ignores the clamp."""
    logvar = torch.tensor([[-5.0, 0.0, 5.0]], requires_grad=True)
    stats = torch.cat([torch.zeros(1, 3), logvar], -1)
    z, _ = vib_sample_kl_reference(torch.zeros(1, 3), stats, 1.0, torch.ones(1, 3))
    torch.testing.assert_close(z, torch.exp(0.5 * torch.tensor([[-2.3025, 0.0, 2.3025]])))
    (grad,) = torch.autograd.grad(z.sum(), logvar)
    torch.testing.assert_close(grad, 0.5 * z.detach())


EXTREME_LOGVARS = [1e7, -1e7, 1e30, -1e30, math.inf, -math.inf]


def extreme_inputs(learnable_prior):
    """One log-variance per token (and the prior's) far outside the clamp or infinite."""
    n, d = len(EXTREME_LOGVARS), 4
    h, stats, _, grad_z, grad_kl = make_inputs((n,), d, torch.float32, learnable_prior=False)
    stats[:, d] = torch.tensor(EXTREME_LOGVARS)
    priors = (torch.zeros(d), torch.tensor(EXTREME_LOGVARS[:d])) if learnable_prior else (None, None)
    return h, stats, priors, grad_z, grad_kl


@pytest.mark.parametrize("learnable_prior", [False, True])
def test_reference_clamp_is_exact_for_extreme_logvars(learnable_prior):
    """Straight-through clamping equals clamping beforehand, bitwise (a ``x + (clamp(x) - x).detach()``
    clamp gives 2.0 for 1e7 and NaN for inf)."""
    h, stats, (prior_mu, prior_logvar), _, _ = extreme_inputs(learnable_prior)
    d = h.shape[-1]
    noise = normal_noise(1, 0, *h.shape)
    got = vib_sample_kl_reference(h, stats, ALPHA, noise, prior_mu, prior_logvar, logvar_clamp=CLAMP)
    clamped = torch.cat([stats[:, :d], stats[:, d:].clamp(*CLAMP)], dim=-1)
    prior_logvar = None if prior_logvar is None else prior_logvar.clamp(*CLAMP)
    expected = vib_sample_kl_reference(h, clamped, ALPHA, noise, prior_mu, prior_logvar, logvar_clamp=None)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.isfinite(got[1]).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("learnable_prior", [False, True])
def test_extreme_logvars_match_reference(backend, learnable_prior):
    """The compiled kernels and the reference agree on outputs and every gradient at +-1e7, +-1e30, +-inf."""
    inputs = extreme_inputs(learnable_prior)
    check_against_reference(backend, None, None, torch.float32, learnable_prior, inputs=inputs)


# ---------------------------------------------------------------------------------------------
# Input validation at the public boundary
# ---------------------------------------------------------------------------------------------
BAD_CALLS = {
    "stats width": (dict(stats=torch.randn(4, 7)), ValueError, "stats"),
    "leading shapes": (dict(stats=torch.randn(5, 8)), ValueError, "stats"),
    "integer h": (dict(h=torch.ones(4, 4, dtype=torch.int64)), TypeError, "h"),
    "integer stats": (dict(stats=torch.ones(4, 8, dtype=torch.int32)), TypeError, "stats"),
    "mixed dtypes": (dict(stats=torch.randn(4, 8, dtype=torch.float64)), TypeError, "stats"),
    "h not a tensor": (dict(h=[[1.0]]), TypeError, "h"),
    "alpha above 1": (dict(alpha=1.5), ValueError, "alpha"),
    "alpha negative": (dict(alpha=-0.1), ValueError, "alpha"),
    "alpha nan": (dict(alpha=float("nan")), ValueError, "alpha"),
    "alpha float64 tensor": (dict(alpha=torch.tensor(0.5, dtype=torch.float64)), TypeError, "alpha"),
    "alpha 1-dim tensor": (dict(alpha=torch.tensor([0.5])), ValueError, "alpha"),
    "alpha on meta": (dict(alpha=torch.tensor(0.5, device="meta")), ValueError, "alpha"),
    "seed int32 tensor": (dict(seed=torch.tensor(1, dtype=torch.int32)), TypeError, "seed"),
    "seed float": (dict(seed=1.0), TypeError, "seed"),
    "offset 1-dim tensor": (dict(offset=torch.tensor([1])), ValueError, "offset"),
    "offset on meta": (dict(offset=torch.tensor(1, device="meta")), ValueError, "offset"),
    "negative seed": (dict(seed=-1), ValueError, "seed"),
    "seed too big": (dict(seed=2**64), ValueError, "seed"),
    "float offset": (dict(offset=1.0), TypeError, "offset"),
    "prior alone": (dict(prior_mu=torch.zeros(4)), ValueError, "prior_mu"),
    "prior shape": (dict(prior_mu=torch.zeros(5), prior_logvar=torch.zeros(5)), ValueError, "prior_mu"),
    "prior on meta": (dict(prior_mu=torch.zeros(4, device="meta"), prior_logvar=torch.zeros(4)), ValueError,
                      "prior_mu"),
    "stats on meta": (dict(stats=torch.randn(4, 8, device="meta")), ValueError, "stats"),
    "clamp order": (dict(logvar_clamp=(2.0, -2.0)), ValueError, "logvar_clamp"),
    "kl form": (dict(kl_form="paper"), ValueError, "kl_form"),
    "sample int": (dict(sample=1), TypeError, "sample"),
    "backend": (dict(backend="cuda"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=str)
def test_bad_input_names_the_argument(case):
    overrides, error, argument = BAD_CALLS[case]
    kwargs = dict(h=torch.randn(4, 4), stats=torch.randn(4, 8), alpha=0.5, seed=0) | overrides
    with pytest.raises(error, match=argument):
        vib_sample_kl(kwargs.pop("h"), kwargs.pop("stats"), kwargs.pop("alpha"), **kwargs)


def test_unavailable_backend_explains_why():
    with pytest.raises(RuntimeError, match="Available"):
        vib_sample_kl(torch.randn(2, 2, device="meta"), torch.randn(2, 4, device="meta"), 0.5, seed=0,
                      backend="cpp")


def test_auto_backend_on_cpu_prefers_the_compiled_kernel_never_the_interpreter():
    """'auto' picks the C++ kernel for CPU tensors when built, else the reference; the Triton
    interpreter is a correctness tool and must never be chosen implicitly."""
    expected = "cpp" if "cpp" in available_backends("cpu") else "reference"
    assert resolve_backend("auto", "cpu") == expected
    assert resolve_backend("reference", "cpu") == "reference"
