"""VittleBottleneck vs the reference math (vittle_fast.ops.reference), token by token, every backend."""
import pytest
import torch
import torch._dynamo.testing
from tolerances import TOL

from vittle_fast.nn import VittleBottleneck, VittleConfig
from vittle_fast.nn.bottleneck import NOISE_CALL_INDEX, NOISE_CALL_SHIFT, split_token_rows
from vittle_fast.ops import available_backends
from vittle_fast.ops.philox import normal_noise
from vittle_fast.ops.reference import vib_sample_kl_reference

D = 16
SEED, OFFSET, ALPHA = 1234, 3 << 44, 0.4


def make_bottleneck(backend, prior="fixed", kl_form="standard") -> VittleBottleneck:
    bottleneck = VittleBottleneck(D, VittleConfig(layer_v=0, layer_t=0, prior=prior, kl_form=kl_form, backend=backend))
    if prior == "learnable":  # non-zero priors, so a wrong prior would show
        with torch.no_grad():
            for param in bottleneck.parameters(recurse=False):
                param.normal_(0.0, 0.5)
    return bottleneck


def reference_bottleneck(bottleneck, hidden, modality, rows, kl_mask, sample):
    """The module's contract spelled with plain tensors: gather, MLP, reference op, scatter, masked mean."""
    tokens = hidden[rows]
    stats = bottleneck.mlp(modality)(tokens)
    noise = None
    if sample:
        offset = OFFSET + (NOISE_CALL_INDEX[modality] << NOISE_CALL_SHIFT)
        noise = normal_noise(SEED, offset, len(rows), D)
    prior_mu, prior_logvar = bottleneck.prior(modality)
    z_hat, kl = vib_sample_kl_reference(tokens, stats, ALPHA, noise, prior_mu, prior_logvar,
                                        bottleneck.config.logvar_clamp, bottleneck.config.kl_form, sample)
    out = hidden.clone()
    out[rows] = z_hat
    return out, kl[kl_mask].mean() if kl_mask.any() else kl.sum() * 0


def gradients(outputs, tensors):
    out, kl = outputs
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + 3.0 * kl
    return torch.autograd.grad(loss, tensors, allow_unused=False)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("modality", ["visual", "text"])
@pytest.mark.parametrize("prior,kl_form", [("fixed", "standard"), ("learnable", "released")])
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference_token_by_token(backend, modality, prior, kl_form, training):
    bottleneck = make_bottleneck(backend, prior, kl_form).train(training)
    hidden = torch.randn(13, D, requires_grad=True)
    rows = torch.tensor([2, 3, 4, 7, 8, 11])  # not contiguous, not at the start
    kl_mask = torch.tensor([True, False, True, True, False, True])

    got = bottleneck(hidden, modality, rows, kl_mask, alpha=ALPHA, noise_seed=SEED, noise_offset=OFFSET)
    expected = reference_bottleneck(bottleneck, hidden, modality, rows, kl_mask, sample=training)
    torch.testing.assert_close(got[0], expected[0], **TOL["float32"])
    torch.testing.assert_close(got[1], expected[1], **TOL["float32"])
    untouched = torch.ones(13, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(got[0][untouched], hidden[untouched])

    params = [hidden, *bottleneck.mlp(modality).parameters()] + [p for p in bottleneck.prior(modality) if p is not None]
    for g, e in zip(gradients(got, params), gradients(expected, params)):
        torch.testing.assert_close(g, e, **TOL["fp32_sum"])


def test_visual_and_text_calls_draw_different_noise():
    bottleneck = make_bottleneck("reference")
    hidden = torch.zeros(4, D)
    rows, mask = torch.arange(4), torch.ones(4, dtype=torch.bool)
    with torch.no_grad():  # identical MLPs and inputs: any difference comes from the noise stream
        bottleneck.mlp_t.load_state_dict(bottleneck.mlp_v.state_dict())
        visual, _ = bottleneck(hidden, "visual", rows, mask, alpha=1.0, noise_seed=SEED, noise_offset=OFFSET)
        text, _ = bottleneck(hidden, "text", rows, mask, alpha=1.0, noise_seed=SEED, noise_offset=OFFSET)
    assert not torch.allclose(visual, text)


def test_empty_modality_gives_zero_gradients_not_none():
    bottleneck = make_bottleneck("reference", prior="learnable")
    hidden = torch.randn(5, D, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.int64)
    out, kl = bottleneck(hidden, "visual", empty, empty.bool(), alpha=ALPHA, noise_seed=SEED)
    assert torch.equal(out, hidden) and kl.item() == 0.0
    (out.sum() + kl).backward()
    for name, param in bottleneck.named_parameters():
        if name.startswith("mlp_v") or name.endswith("_v"):
            assert param.grad is not None and not param.grad.any(), name


def test_kl_mean_is_zero_when_no_token_is_selected():
    bottleneck = make_bottleneck("reference")
    hidden = torch.randn(5, D)
    _, kl = bottleneck(hidden, "text", torch.arange(5), torch.zeros(5, dtype=torch.bool), alpha=ALPHA, noise_seed=1)
    assert kl.item() == 0.0


def test_split_token_rows_keeps_sequence_order():
    is_visual = torch.tensor([[False, True, True, False], [True, False, False, True]])
    visual, other = split_token_rows(is_visual, 4)
    flat = is_visual.flatten()
    assert torch.equal(visual, flat.nonzero().squeeze(1))
    assert torch.equal(other, (~flat).nonzero().squeeze(1))


def test_config_and_argument_validation():
    with pytest.raises(ValueError, match="prior"):
        VittleConfig(layer_v=1, layer_t=1, prior="gaussian")
    with pytest.raises(ValueError, match="kl_text_tokens"):
        VittleConfig(layer_v=1, layer_t=1, kl_text_tokens="response")
    with pytest.raises(ValueError, match="layer_v"):
        VittleConfig(layer_v=-1, layer_t=1)
    with pytest.raises(ValueError, match="logvar_clamp"):
        VittleConfig(layer_v=1, layer_t=1, logvar_clamp=(2.0, -2.0))
    with pytest.raises(TypeError, match="VittleConfig"):
        VittleBottleneck(D, {"layer_v": 1})
    bottleneck = make_bottleneck("reference")
    with pytest.raises(ValueError, match="modality"):
        bottleneck(torch.randn(3, D), "audio", torch.arange(3), torch.ones(3, dtype=torch.bool), alpha=0.1, noise_seed=0)
    with pytest.raises(ValueError, match="flat token rows"):
        bottleneck(torch.randn(1, 3, D), "text", torch.arange(3), torch.ones(3, dtype=torch.bool), alpha=0.1,
                   noise_seed=0)


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("prior", ["fixed", "learnable"])
def test_forward_both_equals_two_single_modality_calls(backend, prior):
    """The one-permutation path (layer_v == layer_t) is the two-call path, bit for bit, gradients too."""
    torch.manual_seed(3)
    n, num_visual = 23, 9
    is_visual = torch.zeros(n, dtype=torch.bool)
    is_visual[torch.randperm(n)[:num_visual]] = True
    rows_v, rows_t = split_token_rows(is_visual, num_visual)
    masks = {"visual": torch.rand(num_visual) < 0.7, "text": torch.rand(n - num_visual) < 0.5}
    hidden = torch.randn(n, D)
    results = []
    for both in (True, False):
        torch.manual_seed(5)  # identical parameters (and non-zero learnable priors) for both paths
        bottleneck = make_bottleneck(backend, prior).train()
        leaf = hidden.clone().requires_grad_()
        noise = dict(alpha=ALPHA, noise_seed=SEED, noise_offset=OFFSET)
        if both:
            out, kl = bottleneck.forward_both(leaf, torch.cat([rows_v, rows_t]), num_visual, masks, **noise)
        else:
            out, kl = leaf, {}
            for modality, rows in (("visual", rows_v), ("text", rows_t)):
                out, kl[modality] = bottleneck(out, modality, rows, masks[modality], **noise)
        loss = (out * torch.linspace(-1, 1, D)).sum() + 3 * kl["visual"] + 2 * kl["text"]
        grads = torch.autograd.grad(loss, [leaf, *bottleneck.parameters()])
        results.append([out.detach(), kl["visual"].detach(), kl["text"].detach(), *grads])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("both", [True, False])
def test_fused_mlp_switch_keeps_results_and_noise_stream(backend, both):
    """VittleConfig.fused_mlp (one vib_bottleneck_grouped call) == the unfused nn.Sequential + vib_sample_kl
    path: same noise stream, same outputs and gradients up to GEMM rounding."""
    torch.manual_seed(4)
    n, num_visual = 19, 8
    order = torch.randperm(n)
    masks = {"visual": torch.rand(num_visual) < 0.7, "text": torch.rand(n - num_visual) < 0.5}
    hidden = torch.randn(n, D)
    results = []
    for fused in (True, False):
        torch.manual_seed(5)
        bottleneck = make_bottleneck(backend, "learnable").train()
        bottleneck.config.fused_mlp = fused
        leaf = hidden.clone().requires_grad_()
        noise = dict(alpha=ALPHA, noise_seed=SEED, noise_offset=OFFSET)
        if both:
            out, kl = bottleneck.forward_both(leaf, order, num_visual, masks, **noise)
            kl = kl["visual"] + 2 * kl["text"]
        else:
            out, kl = bottleneck(leaf, "text", order[num_visual:], masks["text"], **noise)
        loss = (out * torch.linspace(-1, 1, D)).sum() + 3 * kl
        params = list(bottleneck.parameters()) if both else [*bottleneck.mlp_t.parameters(), *bottleneck.prior("text")]
        results.append([out.detach(), kl.detach(), *torch.autograd.grad(loss, [leaf, *params])])
    for fused, unfused in zip(*results):
        torch.testing.assert_close(fused, unfused, **TOL["fp32_sum"])


def tensor_scalars(alpha, seed, offset):
    """The 0-dim device tensors a CUDA-graph-safe trainer passes (ops/scalars.py convention)."""
    return (torch.tensor(alpha, dtype=torch.float32), torch.tensor(seed, dtype=torch.int64),
            torch.tensor(offset, dtype=torch.int64))


@pytest.mark.parametrize("fused_mlp", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_compiled_bottleneck_with_moving_scalars(fused_mlp):
    """torch.compile of the module with alpha, seed and offset changing every call (a training run):
    fullgraph, at most 2 compiles (the first specialisation + one dynamic graph; 1 with tensor
    scalars), loss and every gradient bitwise equal to eager; tensor scalars == Python scalars."""
    torch.manual_seed(0)
    bottleneck = VittleBottleneck(D, VittleConfig(layer_v=0, layer_t=0, prior="learnable", fused_mlp=fused_mlp))
    hidden = torch.randn(10, D)
    is_visual = torch.zeros(10, dtype=torch.bool)
    is_visual[2:5] = True
    order = torch.cat(split_token_rows(is_visual, 3))
    kl_masks = {"visual": torch.ones(3, dtype=torch.bool), "text": torch.arange(7) % 2 == 0}

    def loss_fn(h, alpha, seed, offset):
        out, kl = bottleneck.forward_both(h, order, 3, kl_masks, alpha=alpha, noise_seed=seed, noise_offset=offset)
        return (out * out).sum() + kl["visual"] + kl["text"]

    def loss_and_grads(fn, scalars):
        h = hidden.clone().requires_grad_()
        loss = fn(h, *scalars)
        return [loss.detach(), *torch.autograd.grad(loss, [h, *bottleneck.parameters()])]

    check_compiled_with_moving_scalars(loss_fn, loss_and_grads)


def check_compiled_with_moving_scalars(loss_fn, loss_and_grads):
    """Compile ``loss_fn(*inputs, alpha, seed, offset)`` (fullgraph, aot_eager) and call it with 10
    different scalars, first as Python numbers, then as 0-dim tensors: every output of
    ``loss_and_grads(fn, scalars)`` equals eager's bit for bit (tensor scalars equal Python ones too),
    with at most 2 compilations (1 with tensors)."""
    for as_tensors in (False, True):
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
        for step in range(10):
            scalars = (0.05 + 0.09 * step, 1000 + 7919 * step, (step * 64) << 20)
            eager = loss_and_grads(loss_fn, scalars)
            if as_tensors:
                scalars = tensor_scalars(*scalars)
                assert all(torch.equal(a, b) for a, b in zip(loss_and_grads(loss_fn, scalars), eager)), f"step {step}"
            traced = loss_and_grads(compiled, scalars)
            assert all(torch.equal(a, b) for a, b in zip(traced, eager)), f"step {step}"
        assert counter.frame_count <= (1 if as_tensors else 2), counter.frame_count


@pytest.mark.parametrize("fused_mlp", [True, False])
def test_module_call_with_both_is_forward_both(fused_mlp):
    """``module(h, "both", order, kl_masks)`` -- the call the layer hook makes, so FSDP's hooks run --
    is ``forward_both`` bit for bit, outputs and gradients; a tensor kl_mask is refused by name."""
    torch.manual_seed(0)
    bottleneck = VittleBottleneck(D, VittleConfig(layer_v=0, layer_t=0, fused_mlp=fused_mlp))
    order = torch.randperm(10)
    kl_masks = {"visual": torch.ones(3, dtype=torch.bool), "text": torch.arange(7) % 2 == 0}
    noise = dict(alpha=ALPHA, noise_seed=SEED, noise_offset=OFFSET)
    results = []
    for call in (lambda h: bottleneck(h, "both", order, kl_masks, **noise),
                 lambda h: bottleneck.forward_both(h, order, 3, kl_masks, **noise)):
        h = torch.randn(10, D, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out, kl = call(h)
        grads = torch.autograd.grad((out * out).sum() + kl["visual"] + 2 * kl["text"], [h, *bottleneck.parameters()])
        results.append([out, kl["visual"], kl["text"], *grads])
    for got, expected in zip(*results):
        assert torch.equal(got, expected)
    with pytest.raises(TypeError, match="kl_mask"):
        bottleneck(torch.randn(10, D), "both", order, torch.ones(10, dtype=torch.bool), **noise)
