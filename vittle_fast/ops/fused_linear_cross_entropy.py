"""Chunked fused linear + cross-entropy: the LM head and its loss over the target tokens only,
without ever holding the [tokens, vocab] logits.

Why: in LLaVA training most positions (image tokens, the prompt) carry no target, yet the usual
``lm_head(hidden)`` -> ``cross_entropy`` runs the vocabulary projection over all of them and keeps
several [tokens, vocab] fp32 tensors (upcast logits, log-softmax, their gradient) alive at once;
at vocab 152k that is ~0.6 MB per token per tensor.

How (Liger-Kernel's FusedLinearCrossEntropy is the reference point; this is our own version):
1. drop the rows whose target is ``ignore_index`` (one ``index_select``, whose backward scatters
   the gradient back; sizing it needs the target count on the host: one sync on CUDA);
2. walk the kept rows in chunks of ``chunk_rows(V)``: logits = h W^T in the input dtype, upcast to
   fp32, log-sum-exp (the exponentials in place of the logits), loss; because the loss is a scalar, its gradients are known right there:
   dlogits = softmax - onehot, dh = dlogits W, dW += dlogits^T h (fp32 accumulator);
3. backward only multiplies the stored gradients by the incoming scalar.
Peak extra memory: one fp32 chunk of [rows, V] (plus its input-dtype matmul output when that is
not fp32), the fp32 [V, d] accumulator and [K, d] for dh.

The same numerics as ``F.cross_entropy(F.linear(h, W).float(), t)``: identical per-row logits and
softmax; only the order of the sums (over chunks for the loss and dW) differs.
"""
from __future__ import annotations

import torch

REDUCTIONS = ("sum", "mean")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements of one chunk of fp32 logits (128 MiB): ~1000 rows at vocab 32k, ~220 at 152k. Fewer rows
# make dW += dlogits^T h memory-bound (it rereads the [V, d] accumulator per chunk: 2^21 elements ran
# 2x slower than unfused on CPU, 2^25 as fast), more rows cost memory.
CHUNK_ELEMENTS = 1 << 25


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one chunk of logits holds about ``CHUNK_ELEMENTS`` values."""
    return max(1, CHUNK_ELEMENTS // max(vocab_size, 1))


def linear_cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 grad_of_hidden: bool, grad_of_weight: bool
                                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed CE over all rows (every target valid) and, as asked, d(sum)/d hidden, d(sum)/d weight."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grad_of_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_of_weight else None
    step = chunk_rows(vocab)
    for start in range(0, rows, step):
        loss += _chunk(hidden[start:start + step], weight, targets[start:start + step, None],
                       None if grad_hidden is None else grad_hidden[start:start + step], grad_weight)
    return loss, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


def _chunk(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, grad_h: torch.Tensor | None,
           grad_weight: torch.Tensor | None) -> torch.Tensor:
    """One chunk: returns its summed CE, writes dh into ``grad_h``, adds dW into ``grad_weight``.
    A function of its own so the chunk's [rows, V] buffer is freed before the next one exists."""
    logits = (h @ weight.T).float()  # fp32 input: the matmul output itself, no copy
    target_logit = logits.gather(1, t)
    row_max = logits.amax(dim=1, keepdim=True)
    exp = logits.sub_(row_max).exp_()  # in place: the chunk's only [rows, V] fp32 buffer
    sum_exp = exp.sum(dim=1, keepdim=True)
    loss = (sum_exp.log() + row_max - target_logit).sum()  # log-sum-exp - target logit
    if grad_h is None and grad_weight is None:
        return loss
    dlogits = exp.div_(sum_exp)  # softmax
    dlogits.scatter_add_(1, t, torch.full_like(t, -1.0, dtype=dlogits.dtype))  # - onehot
    dlogits = dlogits.to(h.dtype)
    if grad_h is not None:
        torch.mm(dlogits, weight, out=grad_h)
    if grad_weight is None:
        return loss
    if h.dtype == torch.float32:
        torch.addmm(grad_weight, dlogits.T, h, out=grad_weight)  # in place: no [V, d] temporary per chunk
    else:  # low precision: product in the input dtype (fp32 accumulate inside), summed in fp32
        grad_weight += (dlogits.T @ h).float()
    return loss


class LinearCrossEntropySum(torch.autograd.Function):
    """Summed CE of ``hidden @ weight.T`` against ``targets`` (no ignored rows); the gradients the
    flags ask for are computed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, grad_of_hidden: bool, grad_of_weight: bool):
        loss, grad_hidden, grad_weight = linear_cross_entropy_forward(hidden, weight, targets,
                                                                      grad_of_hidden, grad_of_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype), None, None, None)


def _validate(hidden, weight, targets, ignore_index, reduction) -> None:
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be 2-D [T, d], got shape {tuple(hidden.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, d] with d = hidden.shape[1] = {hidden.shape[1]}, "
                         f"got shape {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [T] with T = hidden.shape[0] = {hidden.shape[0]}, "
                         f"got shape {tuple(targets.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64, got {targets.dtype}")
    if not hidden.device == weight.device == targets.device:
        raise ValueError(f"hidden, weight and targets must share a device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               ignore_index: int = -100, reduction: str = "sum") -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets, ignore_index, reduction)`` in fp32, chunked.

    hidden [T, d] and weight [V, d] (same float dtype), targets [T] int64. Rows whose target is
    ``ignore_index`` are skipped entirely. ``reduction="sum"`` sums over the kept rows, ``"mean"``
    divides by their count (NaN when there is none, as ``F.cross_entropy``). Returns an fp32 scalar
    with gradients to ``hidden`` and ``weight``. Targets must lie in [0, V) (not checked: that
    would cost a host sync).
    """
    _validate(hidden, weight, targets, ignore_index, reduction)
    kept = (targets != ignore_index).nonzero().squeeze(1)
    if kept.numel() != targets.numel():
        hidden, targets = hidden.index_select(0, kept), targets.index_select(0, kept)
    grad_enabled = torch.is_grad_enabled()  # the Function cannot tell: needs_input_grad ignores no_grad
    loss = LinearCrossEntropySum.apply(hidden.contiguous(), weight, targets.contiguous(),
                                       grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad)
    return loss / kept.numel() if reduction == "mean" else loss
