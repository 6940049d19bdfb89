// ATen-level entry points of the fused Vittle op, shared by the operator registration
// (vib_sample_kl_ops.cpp), the CPU kernel and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "vib_sample_kl_math.h"

namespace vittle_fast {

// Validated arguments of one call, in the form the kernels consume.
struct FusedCall {
  int64_t n_tokens;
  int64_t dim;
  OpScalars scalars;
  int64_t seed;     // int64 view of the 64-bit Philox key
  uint64_t offset;  // Philox counter base
  bool learnable_prior;
  ScalarPointers device_scalars;  // 0-dim CUDA tensors given for alpha / seed / offset (CPU ones are read above)
};

using OptionalTensor = std::optional<at::Tensor>;

// The op schemas take the fixed prior as an empty [0] tensor ("no prior" below the Python API);
// the kernels take None.
inline OptionalTensor prior_or_none(const at::Tensor& prior) {
  return prior.numel() ? OptionalTensor(prior) : std::nullopt;
}
using ForwardResult = std::tuple<at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Outputs: z_hat [N, D] in stats.dtype, kl [N] float32.
ForwardResult forward_cpu(const at::Tensor& h, const at::Tensor& stats, const OptionalTensor& prior_mu,
                          const OptionalTensor& prior_logvar, const FusedCall& call);
// Outputs: grad_h [N, D], grad_stats [N, 2D] in stats.dtype; prior gradients [D] float32 (or [0]).
BackwardResult backward_cpu(const at::Tensor& grad_z_hat, const at::Tensor& grad_kl, const at::Tensor& stats,
                            const OptionalTensor& prior_mu, const OptionalTensor& prior_logvar,
                            const FusedCall& call);

#ifdef VITTLE_FAST_WITH_CUDA
ForwardResult forward_cuda(const at::Tensor& h, const at::Tensor& stats, const OptionalTensor& prior_mu,
                           const OptionalTensor& prior_logvar, const FusedCall& call);
BackwardResult backward_cuda(const at::Tensor& grad_z_hat, const at::Tensor& grad_kl, const at::Tensor& stats,
                             const OptionalTensor& prior_mu, const OptionalTensor& prior_logvar,
                             const FusedCall& call);
#endif

}  // namespace vittle_fast
