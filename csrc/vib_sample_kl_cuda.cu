// ATen glue of the CUDA kernels: allocate outputs with the caching allocator, map ATen dtypes to
// CUDA ones and launch on the current stream. No host synchronisation.
#include "vib_sample_kl.h"
#include "vib_sample_kl_kernels.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

namespace vittle_fast {
namespace {

template <typename AtenType>
using CudaType = std::conditional_t<std::is_same_v<AtenType, at::BFloat16>, __nv_bfloat16,
                                    std::conditional_t<std::is_same_v<AtenType, at::Half>, __half, float>>;

template <typename T>
const T* data_as(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_data_as(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

const float* optional_data(const OptionalTensor& t) { return t.has_value() ? t->const_data_ptr<float>() : nullptr; }

cuda::KernelArgs kernel_args(const FusedCall& call) {
  return {call.n_tokens, call.dim, call.scalars, call.seed, call.offset, call.device_scalars, cuda::kMinThreadsPerRow};
}

}  // namespace

ForwardResult forward_cuda(const at::Tensor& h, const at::Tensor& stats, const OptionalTensor& prior_mu,
                           const OptionalTensor& prior_logvar, const FusedCall& call) {
  at::Tensor z_hat = at::empty_like(h);
  at::Tensor kl = at::empty({call.n_tokens}, h.options().dtype(at::kFloat));
  const c10::cuda::CUDAGuard guard(h.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "vittle_fast_fwd_cuda", [&] {
    using T = CudaType<scalar_t>;
    const cuda::ForwardPointers<T> p{data_as<T>(h), data_as<T>(stats), optional_data(prior_mu),
                                     optional_data(prior_logvar), mutable_data_as<T>(z_hat),
                                     kl.mutable_data_ptr<float>()};
    cuda::launch_forward<T>(p, kernel_args(call), at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {z_hat, kl};
}

BackwardResult backward_cuda(const at::Tensor& grad_z_hat, const at::Tensor& grad_kl, const at::Tensor& stats,
                             const OptionalTensor& prior_mu, const OptionalTensor& prior_logvar,
                             const FusedCall& call) {
  at::Tensor grad_h = at::empty_like(grad_z_hat);
  at::Tensor grad_stats = at::empty_like(stats);
  const auto fp32 = stats.options().dtype(at::kFloat);
  const int64_t prior_size = call.learnable_prior ? call.dim : 0;
  at::Tensor grad_prior_mu = at::empty({prior_size}, fp32);
  at::Tensor grad_prior_logvar = at::empty({prior_size}, fp32);
  const int64_t n_partials = call.learnable_prior ? cuda::backward_chunks(call.n_tokens) : 0;
  at::Tensor partials = at::empty({n_partials, 2, call.dim}, fp32);
  const c10::cuda::CUDAGuard guard(stats.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, stats.scalar_type(), "vittle_fast_bwd_cuda", [&] {
    using T = CudaType<scalar_t>;
    const cuda::BackwardPointers<T> p{data_as<T>(grad_z_hat), grad_kl.const_data_ptr<float>(), data_as<T>(stats),
                                      optional_data(prior_mu), optional_data(prior_logvar),
                                      mutable_data_as<T>(grad_h), mutable_data_as<T>(grad_stats),
                                      partials.mutable_data_ptr<float>(), grad_prior_mu.mutable_data_ptr<float>(),
                                      grad_prior_logvar.mutable_data_ptr<float>()};
    cuda::launch_backward<T>(p, kernel_args(call), at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_h, grad_stats, grad_prior_mu, grad_prior_logvar};
}

}  // namespace vittle_fast
