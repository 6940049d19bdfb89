"""The fused ops' eager route (ops/eager.py) against their custom-op route: the same launchers and
autograd functions, so outputs and every gradient must agree bitwise; and the route picked where it
must be (the custom op under torch.compile, dispatch modes and tensor subclasses)."""
import sys
from unittest import mock

import pytest
import torch
from test_vib_bottleneck import SEED, leaves_of, make_case
from op_inputs import make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from vittle_fast.ops import available_backends, vib_bottleneck_grouped, vib_sample_kl
from vittle_fast.ops import eager

# The op modules themselves (the package re-exports the functions under the same names).
bottleneck_module = sys.modules["vittle_fast.ops.vib_bottleneck"]
sample_kl_module = sys.modules["vittle_fast.ops.vib_sample_kl"]

KERNELS = [b for b in available_backends("cpu") if b not in ("reference", "triton")]


class OpNames(TorchDispatchMode):
    """Records the name of every op dispatched below it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _custom_op_route(op_module):
    return mock.patch.object(op_module, "use_custom_op", lambda *tensors: True)


def _bottleneck_run(backend, tensor_scalars, learnable):
    h, order, weights, priors, grad_out, grad_kl = make_case(41, 24, torch.float32, [15, 20], learnable)
    h, weights, priors, flat = leaves_of(h, weights, priors)
    alpha, seed, offsets = 0.3, SEED, [5, 1 << 38]
    if tensor_scalars:
        alpha, seed, offsets = torch.tensor(alpha), torch.tensor(seed), [torch.tensor(o) for o in offsets]
    out, kl = vib_bottleneck_grouped(h, order, [15, 20], weights, alpha, seed=seed, offsets=offsets, priors=priors,
                                     backend=backend)
    grads = torch.autograd.grad((out, kl), flat, (grad_out, grad_kl))
    return (out, kl, *grads)


def _sample_kl_run(backend, tensor_scalars, learnable):
    h, stats, priors, grad_z, grad_kl = make_inputs((3, 11), 20, torch.float32, learnable)
    leaves = [t.clone().requires_grad_() for t in (h, stats, *priors) if t is not None]
    alpha, seed, offset = (torch.tensor(0.3), torch.tensor(SEED), torch.tensor(9)) if tensor_scalars else (0.3, SEED, 9)
    prior = leaves[2:] if learnable else (None, None)
    z_hat, kl = vib_sample_kl(leaves[0], leaves[1], alpha, seed=seed, offset=offset, prior_mu=prior[0],
                              prior_logvar=prior[1], backend=backend)
    grads = torch.autograd.grad((z_hat, kl), leaves, (grad_z, grad_kl))
    return (z_hat, kl, *grads)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("tensor_scalars", [False, True])
@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("op_module,run", [(bottleneck_module, _bottleneck_run), (sample_kl_module, _sample_kl_run)],
                         ids=["vib_bottleneck", "vib_sample_kl"])
def test_eager_route_equals_custom_op_route_bitwise(op_module, run, backend, tensor_scalars, learnable):
    priors = [learnable, False] if op_module is bottleneck_module else learnable
    eager_results = run(backend, tensor_scalars, priors)
    with _custom_op_route(op_module):
        custom_results = run(backend, tensor_scalars, priors)
    assert len(eager_results) == len(custom_results)
    for i, (a, b) in enumerate(zip(eager_results, custom_results)):
        assert torch.equal(a, b), f"result {i} differs between the eager and the custom-op route"


@pytest.mark.parametrize("backend", KERNELS)
def test_plain_eager_calls_skip_the_custom_op_and_modes_see_it(backend):
    h, order, weights, priors, _, _ = make_case(9, 8, torch.float32, [4, 5], [False, False])
    call = lambda: vib_bottleneck_grouped(h, order, [4, 5], weights, 0.5, seed=1, offsets=[0, 64],  # noqa: E731
                                          priors=priors, backend=backend)
    with mock.patch.object(bottleneck_module, "_bottleneck_forward", side_effect=AssertionError("custom op used")):
        call()  # plain tensors, no mode: the eager route
    with OpNames() as seen:
        call()
    assert "vittle_fast.vib_bottleneck" in seen.names  # a dispatch mode sees the op as one custom op


def test_use_custom_op_conditions():
    plain = torch.zeros(2)
    assert not eager.use_custom_op(plain, torch.nn.Linear(2, 2).weight)  # tensors and module parameters
    with OpNames():
        assert eager.use_custom_op(plain)

    class Subclass(torch.Tensor):
        pass

    assert eager.use_custom_op(plain, plain.as_subclass(Subclass))
    compiled = torch.compile(lambda t: t + float(eager.use_custom_op(t)), backend="eager", fullgraph=True)
    assert compiled(plain).eq(1).all()


def test_eager_route_under_activation_checkpointing_matches_without():
    h, order, weights, priors, grad_out, grad_kl = make_case(30, 16, torch.float32, [10, 12], [True, False])

    def run(checkpointed):
        leaf_h, leaf_w, leaf_p, flat = leaves_of(h, weights, priors)
        fn = lambda x: vib_bottleneck_grouped(x, order, [10, 12], leaf_w, 0.5, seed=3, offsets=[0, 99],  # noqa: E731
                                              priors=leaf_p)
        out, kl = torch.utils.checkpoint.checkpoint(fn, leaf_h, use_reentrant=False) if checkpointed else fn(leaf_h)
        return (out, kl, *torch.autograd.grad((out, kl), flat, (grad_out, grad_kl)))

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_the_module_takes_the_eager_route():
    """VittleBottleneck passes its nn.Parameters: still plain eager (a module test would miss a route
    that only plain tensors take, as the first version of ops/eager.py did)."""
    from vittle_fast.nn.bottleneck import VittleBottleneck, VittleConfig

    module = VittleBottleneck(8, VittleConfig(layer_v=0, layer_t=0, prior="learnable", backend=KERNELS[0]))
    hidden = torch.randn(6, 8, requires_grad=True)
    masks = {"visual": torch.ones(2, dtype=torch.bool), "text": torch.ones(4, dtype=torch.bool)}
    with mock.patch.object(bottleneck_module, "_bottleneck_forward", side_effect=AssertionError("custom op used")):
        out, kl = module.forward_both(hidden, torch.arange(6), 2, masks, alpha=0.5, noise_seed=1)
        (out.sum() + kl["visual"] + kl["text"]).backward()
    assert module.mlp_v[0].weight.grad is not None and module.prior_mu_t.grad is not None
