// Operator registration: vittle_fast::fused_sample_kl_fwd / fused_sample_kl_bwd for the CPU, CUDA
// (when built with CUDA) and Meta dispatch keys. The fixed prior is an empty [0] prior_mu /
// prior_logvar (the "no prior" convention below the Python API, docs/ops.md).
//
// The Python layer registers vittle_fast::vib_sample_kl{,_backward} with torch.library.custom_op in
// the same namespace, so this file only ever adds a FRAGMENT to it.
#include "vib_sample_kl.h"
#include "vib_sample_kl_grid.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace vittle_fast {
namespace {

void check_prior(const OptionalTensor& prior, const char* name, const at::Tensor& stats, int64_t dim) {
  if (!prior.has_value()) return;
  TORCH_CHECK(prior->scalar_type() == at::kFloat, name, " must be float32, got ", prior->scalar_type());
  TORCH_CHECK(prior->dim() == 1 && prior->size(0) == dim, name, " must have shape [D] = [", dim, "], got ",
              prior->sizes());
  TORCH_CHECK(prior->is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(prior->device() == stats.device(), name, " must be on ", stats.device(), ", got ", prior->device());
}

// A scalar given as a tensor (ops/scalars.py): 0-dim, `dtype`, on stats' device. Returns its device
// pointer for CUDA tensors (read by the kernels) or null after reading a CPU tensor into `value`.
template <typename T>
const T* tensor_scalar(const OptionalTensor& tensor, const char* name, at::ScalarType dtype, const at::Tensor& stats,
                       T& value) {
  if (!tensor.has_value()) return nullptr;
  TORCH_CHECK(tensor->scalar_type() == dtype && tensor->dim() == 0, name, " must be a 0-dim ", dtype,
              " tensor, got ", tensor->scalar_type(), " ", tensor->sizes());
  TORCH_CHECK(tensor->device() == stats.device(), name, " must be on ", stats.device(), ", got ", tensor->device());
  if (tensor->is_cuda()) return tensor->const_data_ptr<T>();
  value = *tensor->const_data_ptr<T>();
  return nullptr;
}

// Checks what the kernels rely on (the Python layer has already validated user-facing arguments)
// and packs the scalars. `dim_source` is h (forward) or grad_z_hat (backward): [N, D], stats' dtype.
// alpha / seed / offset are each a value or, when the *_t tensor is given, that tensor.
FusedCall make_call(const at::Tensor& dim_source, const at::Tensor& stats, double alpha, int64_t seed, int64_t offset,
                    const OptionalTensor& alpha_t, const OptionalTensor& seed_t, const OptionalTensor& offset_t,
                    const OptionalTensor& prior_mu, const OptionalTensor& prior_logvar, double clamp_lo,
                    double clamp_hi, double kl_logvar_coef, bool sample) {
  TORCH_CHECK(dim_source.dim() == 2 && dim_source.size(1) >= 1, "expected a [N, D] tensor with D >= 1, got ",
              dim_source.sizes());
  const int64_t n = dim_source.size(0);
  const int64_t d = dim_source.size(1);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == n && stats.size(1) == 2 * d, "stats must have shape [N, 2D] = [",
              n, ", ", 2 * d, "], got ", stats.sizes());
  const auto dtype = stats.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "stats must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(dim_source.scalar_type() == dtype, "h / grad_z_hat must have stats' dtype ", dtype, ", got ",
              dim_source.scalar_type());
  TORCH_CHECK(dim_source.device() == stats.device(), "h / grad_z_hat must be on stats' device");
  TORCH_CHECK(dim_source.is_contiguous() && stats.is_contiguous(), "h / grad_z_hat and stats must be contiguous");
  TORCH_CHECK(prior_mu.has_value() == prior_logvar.has_value(),
              "prior_mu and prior_logvar must both be given or both be None");
  check_prior(prior_mu, "prior_mu", stats, d);
  check_prior(prior_logvar, "prior_logvar", stats, d);
  // Python values are range-checked here; tensor values are not (ops/scalars.py: no host sync).
  TORCH_CHECK(alpha_t.has_value() || (alpha >= 0.0 && alpha <= 1.0), "alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK(offset_t.has_value() || offset >= 0, "offset must be >= 0, got ", offset);
  TORCH_CHECK(!std::isnan(clamp_lo) && !std::isnan(clamp_hi) && clamp_lo <= clamp_hi,
              "clamp_lo must be <= clamp_hi, got ", clamp_lo, ", ", clamp_hi);
  OpScalars scalars{static_cast<float>(alpha), static_cast<float>(clamp_lo), static_cast<float>(clamp_hi),
                    static_cast<float>(kl_logvar_coef), sample};
  ScalarPointers pointers;
  pointers.alpha = tensor_scalar(alpha_t, "alpha_t", at::kFloat, stats, scalars.alpha);
  pointers.seed = tensor_scalar(seed_t, "seed_t", at::kLong, stats, seed);
  pointers.offset = tensor_scalar(offset_t, "offset_t", at::kLong, stats, offset);
  return {n, d, scalars, seed, static_cast<uint64_t>(offset), prior_mu.has_value(), pointers};
}

ForwardResult fused_sample_kl_fwd(const at::Tensor& h, const at::Tensor& stats, double alpha, int64_t seed,
                                  int64_t offset, const OptionalTensor& alpha_t, const OptionalTensor& seed_t,
                                  const OptionalTensor& offset_t, const at::Tensor& prior_mu_arg,
                                  const at::Tensor& prior_logvar_arg, double clamp_lo, double clamp_hi,
                                  double kl_logvar_coef, bool sample) {
  const OptionalTensor prior_mu = prior_or_none(prior_mu_arg);
  const OptionalTensor prior_logvar = prior_or_none(prior_logvar_arg);
  const FusedCall call = make_call(h, stats, alpha, seed, offset, alpha_t, seed_t, offset_t, prior_mu, prior_logvar,
                                   clamp_lo, clamp_hi, kl_logvar_coef, sample);
#ifdef VITTLE_FAST_WITH_CUDA
  if (h.is_cuda()) return forward_cuda(h, stats, prior_mu, prior_logvar, call);
#endif
  return forward_cpu(h, stats, prior_mu, prior_logvar, call);
}

BackwardResult fused_sample_kl_bwd(const at::Tensor& grad_z_hat, const at::Tensor& grad_kl, const at::Tensor& stats,
                                   double alpha, int64_t seed, int64_t offset, const OptionalTensor& alpha_t,
                                   const OptionalTensor& seed_t, const OptionalTensor& offset_t,
                                   const at::Tensor& prior_mu_arg, const at::Tensor& prior_logvar_arg,
                                   double clamp_lo, double clamp_hi, double kl_logvar_coef, bool sample) {
  const OptionalTensor prior_mu = prior_or_none(prior_mu_arg);
  const OptionalTensor prior_logvar = prior_or_none(prior_logvar_arg);
  const FusedCall call = make_call(grad_z_hat, stats, alpha, seed, offset, alpha_t, seed_t, offset_t, prior_mu,
                                   prior_logvar, clamp_lo, clamp_hi, kl_logvar_coef, sample);
  TORCH_CHECK(grad_kl.scalar_type() == at::kFloat && grad_kl.dim() == 1 && grad_kl.size(0) == call.n_tokens &&
                  grad_kl.is_contiguous() && grad_kl.device() == stats.device(),
              "grad_kl must be a contiguous float32 [N] tensor on stats' device, got ", grad_kl.scalar_type(), " ",
              grad_kl.sizes());
#ifdef VITTLE_FAST_WITH_CUDA
  if (stats.is_cuda()) return backward_cuda(grad_z_hat, grad_kl, stats, prior_mu, prior_logvar, call);
#endif
  return backward_cpu(grad_z_hat, grad_kl, stats, prior_mu, prior_logvar, call);
}

// The raw Philox4x32-10 words for int64 counters ([n] -> int64 [n, 4], values in [0, 2**32)), so
// tests can compare this header's generator bit for bit with Triton's tl.randint4x.
at::Tensor philox_uint32(int64_t seed, const at::Tensor& counters) {
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.dim() == 1 && counters.device().is_cpu(),
              "counters must be a 1-D int64 CPU tensor, got ", counters.scalar_type(), " ", counters.sizes());
  const at::Tensor c = counters.contiguous();
  at::Tensor out = at::empty({c.size(0), 4}, c.options());
  const int64_t* in = c.const_data_ptr<int64_t>();
  int64_t* words = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < c.size(0); ++i) {
    const Uint4x32 bits = philox4x32_10(seed, static_cast<uint64_t>(in[i]));
    const uint32_t lanes[4] = {bits.x0, bits.x1, bits.x2, bits.x3};
    for (int l = 0; l < 4; ++l) words[4 * i + l] = lanes[l];
  }
  return out;
}

// The CUDA kernels' launch geometry for an [n_tokens, dim] call with E elements per thread (1, or
// 16 bytes / element size on the vector path), computed by the same host code the CUDA launchers
// use: [threads_per_row, forward grid.x, backward grid.x, backward grid.y, backward column tiles].
// Lets tests check the grid limits without a GPU.
std::vector<int64_t> cuda_launch_geometry(int64_t n_tokens, int64_t dim, int64_t elems_per_thread) {
  TORCH_CHECK(n_tokens >= 0 && dim >= 1 && (elems_per_thread == 1 || elems_per_thread == 4 ||
                                            elems_per_thread == 8),
              "expected n_tokens >= 0, dim >= 1, elems_per_thread in {1, 4, 8}");
  const int elems = static_cast<int>(elems_per_thread);
  const int tpr = cuda::threads_per_row(dim, elems);
  const cuda::BackwardGrid grid = cuda::backward_grid(n_tokens, dim, tpr, elems);
  return {tpr, cuda::forward_blocks(n_tokens, tpr), grid.x, grid.y, cuda::column_tiles(dim, tpr, elems)};
}

// Shape-only implementations so torch.compile / FakeTensor can trace the ops.
ForwardResult fused_sample_kl_fwd_meta(const at::Tensor& h, const at::Tensor& stats, double, int64_t, int64_t,
                                       const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                                       const at::Tensor&, const at::Tensor&, double, double, double, bool) {
  return {at::empty_like(h), at::empty({h.size(0)}, h.options().dtype(at::kFloat))};
}

BackwardResult fused_sample_kl_bwd_meta(const at::Tensor& grad_z_hat, const at::Tensor&, const at::Tensor& stats,
                                        double, int64_t, int64_t, const OptionalTensor&, const OptionalTensor&,
                                        const OptionalTensor&, const at::Tensor& prior_mu,
                                        const at::Tensor&, double, double, double, bool) {
  const int64_t prior_size = prior_mu.numel() ? grad_z_hat.size(1) : 0;
  const auto fp32 = stats.options().dtype(at::kFloat);
  return {at::empty_like(grad_z_hat), at::empty_like(stats), at::empty({prior_size}, fp32),
          at::empty({prior_size}, fp32)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vittle_fast, m) {
  m.def(
      "fused_sample_kl_fwd(Tensor h, Tensor stats, float alpha, int seed, int offset, Tensor? alpha_t, "
      "Tensor? seed_t, Tensor? offset_t, Tensor prior_mu, Tensor prior_logvar, float clamp_lo, float clamp_hi, "
      "float kl_logvar_coef, bool sample) -> (Tensor z_hat, Tensor kl)");
  m.def(
      "fused_sample_kl_bwd(Tensor grad_z_hat, Tensor grad_kl, Tensor stats, float alpha, int seed, int offset, "
      "Tensor? alpha_t, Tensor? seed_t, Tensor? offset_t, Tensor prior_mu, Tensor prior_logvar, float clamp_lo, "
      "float clamp_hi, float kl_logvar_coef, bool sample) "
      "-> (Tensor grad_h, Tensor grad_stats, Tensor grad_prior_mu, Tensor grad_prior_logvar)");
  m.def("philox_uint32(int seed, Tensor counters) -> Tensor");
  m.def("cuda_launch_geometry(int n_tokens, int dim, int elems_per_thread) -> int[]", &cuda_launch_geometry);
}

TORCH_LIBRARY_IMPL(vittle_fast, CPU, m) {
  m.impl("fused_sample_kl_fwd", &fused_sample_kl_fwd);
  m.impl("fused_sample_kl_bwd", &fused_sample_kl_bwd);
  m.impl("philox_uint32", &philox_uint32);
}

#ifdef VITTLE_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(vittle_fast, CUDA, m) {
  m.impl("fused_sample_kl_fwd", &fused_sample_kl_fwd);
  m.impl("fused_sample_kl_bwd", &fused_sample_kl_bwd);
}
#endif

TORCH_LIBRARY_IMPL(vittle_fast, Meta, m) {
  m.impl("fused_sample_kl_fwd", &fused_sample_kl_fwd_meta);
  m.impl("fused_sample_kl_bwd", &fused_sample_kl_bwd_meta);
}

}  // namespace vittle_fast
