"""Every numerical tolerance of the test suite, in one place, each with its justification.

Kernels compute in float32 registers from the same inputs as the float32 reference, so the only
differences are (a) float32 rounding order and last-ulp differences of exp/log/sin/cos, and
(b) one rounding of an output stored in a low-precision dtype.
"""
import torch

TOL = {
    # fp32 math on both sides; Box-Muller transcendentals differ in the last ulps (~1e-6 relative).
    "float32": dict(rtol=2e-5, atol=2e-5),
    # one rounding to bfloat16 (8-bit significand: half-ulp = 2**-8 relative) of an fp32 result.
    "bfloat16": dict(rtol=2**-7, atol=2**-7),
    # one rounding to float16 (11-bit significand: half-ulp = 2**-11 relative) of an fp32 result.
    "float16": dict(rtol=2**-10, atol=2**-10),
    # noise of two backends: same uint32 stream, last-ulp differences of log/sqrt/sin/cos (DESIGN §2).
    "noise": dict(rtol=0.0, atol=1e-6),
    # a float32 sum over N tokens in a different order: error grows ~ sqrt(N) ulps of the terms.
    "fp32_sum": dict(rtol=1e-4, atol=1e-5),
    # a whole bf16 training run vs fp32: every matmul rounds its inputs to bf16 (2**-9 relative);
    # over a few layers and optimizer steps the loss drifts by well under 2%.
    "bf16_training_loss": dict(rtol=2e-2, atol=0.0),
    # one bf16 forward of a small LLaVA vs fp32: ~3 decoder layers of bf16 rounding on O(1) logits;
    # 5% is generous yet far below what a routing or dtype bug produces.
    "bf16_model_loss": dict(rtol=5e-2, atol=1e-3),
    # chunked fused linear + CE vs unfused, gradients relative to their max: the same logits and fp32
    # softmax, but dW is summed from chunk products rounded to the dtype, and both gradients are
    # rounded once more when backward scales them: two roundings instead of one (2 half-ulps).
    "fused_ce_bfloat16": dict(rtol=2**-6, atol=2**-6),
    "fused_ce_float16": dict(rtol=2**-9, atol=2**-9),
    # The fused bottleneck (MLP GEMMs + tail) vs the float64 oracle, atol relative to the tensor's
    # largest magnitude (GEMM rounding scales with the sum of |terms|, not each element):
    # fp32: K <= 300 products + the tail's transcendentals, ~1e-6 of the scale; 1e-4 leaves room for
    # weight gradients summed over a few hundred rows.
    "mlp_float32": dict(rtol=1e-4, atol=1e-4),
    # bf16: inputs exact, but the pre-activation, the GELU output, stats and every GEMM output are each
    # rounded to bf16 (2**-9 relative), and exp(lv/2) and the KL gradient amplify stats' rounding: a few
    # bf16 ulps of the scale.
    "mlp_bfloat16": dict(rtol=2**-5, atol=2**-5),
    # fp16: the same chain with 11-bit significands (3 bits finer than bf16).
    "mlp_float16": dict(rtol=2**-8, atol=2**-8),
    # The C++ CPU GELU (and GELU') vs float64, absolute error per unit of max(1, |x|): Abramowitz &
    # Stegun 7.1.26's erf is within 1.5e-7 (ATen's vectorized erf uses it too), plus a few fp32 ulps of
    # evaluation; reduced dtypes add one output rounding on top (the dtype's rtol).
    "gelu_cpu": dict(rtol=0.0, atol=1e-6),
}


def mlp_tol(dtype: torch.dtype) -> dict:
    """Tolerance of the fused bottleneck (MLP + tail) for inputs in ``dtype``, atol relative to scale."""
    return TOL["mlp_" + str(dtype).removeprefix("torch.")]


def tol(dtype: torch.dtype) -> dict:
    """Tolerance for an output stored in ``dtype``."""
    return TOL[str(dtype).removeprefix("torch.")]
