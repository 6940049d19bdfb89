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

// x86-64 with GCC / Clang: the CPU kernels compile their AVX-512 loops (which run only where the CPU
// has AVX-512, see cpu_avx512_enabled); they include vib_sample_kl_cpu_avx512.h under this switch.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define VITTLE_CPU_AVX512 1
#endif

// True when the CPU kernels may use their AVX-512 loops: the CPU has AVX-512 F/BW/DQ/VL and
// VITTLE_FAST_CPU_AVX512=0 is not set (the switch lets tests compare them with the portable paths).
bool cpu_avx512_enabled();

// Row indirection of the CPU tail, for the fused bottleneck's rows picked by `order` (its rows are
// then read and written in place, without a gather or scatter copy): row i of a mapped tensor is
// its row rows[i]; nullptr: row i.
struct RowMap {
  const int64_t* rows = nullptr;
  int64_t operator[](int64_t i) const { return rows != nullptr ? rows[i] : i; }
};

// Outputs the CPU forward writes into instead of allocating them: z_hat row i to row z_rows[i] of
// `z_hat` ([>= N, D], stats.dtype, contiguous, not aliasing the inputs), kl to `kl` ([N] float32, contiguous).
struct CpuForwardInto {
  at::Tensor z_hat;
  RowMap z_rows;
  at::Tensor kl;
};

// Outputs: z_hat [N, D] in stats.dtype, kl [N] float32 (or `into`'s tensors, filled).
ForwardResult forward_cpu(const at::Tensor& h, const at::Tensor& stats, const OptionalTensor& prior_mu,
                          const OptionalTensor& prior_logvar, const FusedCall& call,
                          const std::optional<CpuForwardInto>& into = std::nullopt);
// Outputs: grad_h [N, D], grad_stats [N, 2D] in stats.dtype; prior gradients [D] float32 (or [0]).
// Row i of grad_z_hat is its row g_rows[i].
BackwardResult backward_cpu(const at::Tensor& grad_z_hat, const at::Tensor& grad_kl, const at::Tensor& stats,
                            const OptionalTensor& prior_mu, const OptionalTensor& prior_logvar,
                            const FusedCall& call, RowMap g_rows = {});

#ifdef VITTLE_FAST_WITH_CUDA
ForwardResult forward_cuda(const at::Tensor& h, const at::Tensor& stats, const OptionalTensor& prior_mu,
                           const OptionalTensor& prior_logvar, const FusedCall& call);
BackwardResult backward_cuda(const at::Tensor& grad_z_hat, const at::Tensor& grad_kl, const at::Tensor& stats,
                             const OptionalTensor& prior_mu, const OptionalTensor& prior_logvar,
                             const FusedCall& call);
#endif

}  // namespace vittle_fast
