"""``fused_linear_cross_entropy`` against the unfused ``F.cross_entropy(F.linear(h, W).float(), t)``:
loss and both gradients, fp32 exact (up to summation order), bf16/fp16 within stated tolerances,
odd shapes; it never holds [tokens, vocab] logits and runs the LM head on target rows only."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from tolerances import TOL
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from vittle_fast.ops import fused_linear_cross_entropy

flce = importlib.import_module("vittle_fast.ops.fused_linear_cross_entropy")  # the package attribute is the function

IGNORE = -100


def make_case(tokens, d, vocab, dtype, ignored_every=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    if ignored_every:
        targets[::ignored_every] = IGNORE
    return hidden, weight, targets


def unfused(hidden, weight, targets, reduction):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE, reduction=reduction)


def loss_and_grads(fn, hidden, weight, targets, reduction, upstream=1.7):
    loss = fn(hidden, weight, targets, reduction=reduction)
    return (loss.detach(), *torch.autograd.grad(loss * upstream, (hidden, weight)))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows at vocab 50: every multi-row case crosses several chunk boundaries."""
    monkeypatch.setattr(flce, "CHUNK_ELEMENTS", 7 * 50)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("tokens,d,vocab,ignored_every", [
    (40, 16, 50, 3), (41, 5, 50, 0), (1, 1, 50, 0), (9, 3, 1, 2), (23, 33, 50, 1 + 40)])
def test_fp32_matches_unfused(small_chunks, tokens, d, vocab, ignored_every, reduction):
    case = make_case(tokens, d, vocab, torch.float32, ignored_every)
    ours = loss_and_grads(fused_linear_cross_entropy, *case, reduction)
    ref = loss_and_grads(lambda h, w, t, reduction: unfused(h, w, t, reduction), *case, reduction)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, **TOL["fp32_sum"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_low_precision_matches_unfused(small_chunks, dtype, reduction):
    """Same logits and fp32 softmax; only dW differs: its chunks are rounded to ``dtype`` before
    the fp32 sum, and both gradients are rounded once more when scaled in backward."""
    case = make_case(60, 24, 50, dtype)
    loss, grad_h, grad_w = loss_and_grads(fused_linear_cross_entropy, *case, reduction)
    ref_loss, ref_h, ref_w = loss_and_grads(unfused, *case, reduction)
    torch.testing.assert_close(loss, ref_loss, **TOL["fp32_sum"])
    for got, want in ((grad_h, ref_h), (grad_w, ref_w)):
        assert got.dtype == dtype
        scale = want.float().abs().max()  # relative to the gradient's size, so "mean" is not vacuous
        torch.testing.assert_close(got.float() / scale, want.float() / scale, **TOL["fused_ce_" + str(dtype).removeprefix("torch.")])


def test_no_targets_gives_zero_sum_nan_mean_and_zero_grads():
    hidden, weight, targets = make_case(5, 4, 7, torch.float32)
    targets.fill_(IGNORE)
    loss = fused_linear_cross_entropy(hidden, weight, targets)
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0 and not grad_h.any() and not grad_w.any()
    assert fused_linear_cross_entropy(hidden, weight, targets, reduction="mean").isnan()
    assert unfused(hidden, weight, targets, "mean").isnan()  # the same convention as F.cross_entropy
    empty = fused_linear_cross_entropy(hidden[:0], weight, targets[:0])
    assert empty.item() == 0.0


def test_deterministic(small_chunks):
    case = make_case(40, 16, 50, torch.float32)
    first = loss_and_grads(fused_linear_cross_entropy, *case, "sum")
    second = loss_and_grads(fused_linear_cross_entropy, *case, "sum")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_head_runs_on_target_rows_only_and_only_for_the_grads_asked():
    """FLOPs of the matmuls: 2·K·V·d each for the logits, dh and dW, with K the target rows."""
    tokens, d, vocab, ignored_every = 30, 8, 50, 3
    hidden, weight, targets = make_case(tokens, d, vocab, torch.float32, ignored_every)
    kept = tokens - len(range(0, tokens, ignored_every))
    one_matmul = 2 * kept * vocab * d
    for needs_h, needs_w, matmuls in ((True, True, 3), (True, False, 2), (False, False, 1)):
        with FlopCounterMode(display=False) as counter:
            fused_linear_cross_entropy(hidden.detach().requires_grad_(needs_h),
                                       weight.detach().requires_grad_(needs_w), targets)
        assert counter.get_total_flops() == matmuls * one_matmul
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fused_linear_cross_entropy(hidden, weight, targets)
    assert counter.get_total_flops() == one_matmul


class LargestTensor(TorchDispatchMode):
    """Largest number of elements of any tensor an op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_never_holds_tokens_by_vocab_logits(small_chunks):
    tokens, d, vocab = 200, 4, 50
    hidden, weight, targets = make_case(tokens, d, vocab, torch.float32, ignored_every=0)
    with LargestTensor() as mode:
        loss = fused_linear_cross_entropy(hidden, weight, targets)
        loss.backward()
    assert mode.largest <= max(7 * vocab, vocab * d, tokens * d) < tokens * vocab // 4


@pytest.mark.parametrize("call,message", [
    (lambda h, w, t: fused_linear_cross_entropy(h[0], w, t), "hidden must be 2-D"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w[:, :3], t), "weight must be"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t[:-1]), "targets must be"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t.int()), "targets must be int64"),
    (lambda h, w, t: fused_linear_cross_entropy(h.int(), w, t), "hidden must be float"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w.double(), t), "weight must have hidden's dtype"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w.T.contiguous().T, t), "weight must be contiguous"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t, reduction="none"), "reduction must be"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t, ignore_index=1.5), "ignore_index must be"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t.tolist()), "targets must be a torch.Tensor"),
])
def test_errors_name_the_argument(call, message):
    hidden, weight, targets = make_case(6, 4, 4, torch.float32)
    with pytest.raises((TypeError, ValueError), match=message):
        call(hidden.detach(), weight.detach(), targets)


@pytest.mark.parametrize("packed", [False, True])
def test_llava_fused_loss_path_matches_full_logits(packed):
    """The model's switch: same CE sum, target count and parameter gradients as lm_head -> CE over
    every position (packed rows too: no target at a packed sequence start)."""
    from test_llava import IMAGE_TOKEN, make_batch, text_config, vision_config

    from vittle_fast.models import LlavaVittle
    from vittle_fast.nn import VittleConfig

    model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN, VittleConfig(layer_v=1, layer_t=1)).train()
    batch = make_batch()
    if packed:
        batch["position_ids"] = torch.tensor([list(range(9)) + list(range(5))] * 2)
    results = []
    for fused in (False, True):
        model.fused_cross_entropy = fused
        model.zero_grad()
        out = model(**batch, vittle_alpha=0.3, noise_seed=5)
        (out.ce_sum * 0.7 + out.vittle_loss).backward()
        assert (out.logits is None) == fused
        results.append((out.ce_sum.detach(), out.n_targets,
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ce_full, n_full, grads_full), (ce_fused, n_fused, grads_fused) = results
    torch.testing.assert_close(ce_fused, ce_full, **TOL["fp32_sum"])
    assert n_fused.item() == n_full.item() > 0
    assert grads_fused.keys() == grads_full.keys()
    for name in grads_full:
        torch.testing.assert_close(grads_fused[name], grads_full[name], **TOL["fp32_sum"], msg=name)
