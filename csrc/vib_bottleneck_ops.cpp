// Operator registration: vittle_fast::vib_bottleneck_fwd / vib_bottleneck_bwd (CPU, and CUDA when built
// with it; one implementation: vib_bottleneck_blocks.cpp). Arguments in the
// order of the Python API (vittle_fast/ops/vib_bottleneck.py), per-group lists unpacked; a group
// without a learnable prior has empty [0] tensors in prior_mus / prior_logvars (and gets them back as
// its prior gradients).
#include "vib_bottleneck.h"

#include <torch/library.h>

#include <cmath>
#include <vector>

namespace vittle_fast {
namespace {


void check_param(const at::Tensor& t, const char* name, int64_t g, at::IntArrayRef shape, const at::Tensor& h) {
  TORCH_CHECK(t.sizes() == shape, name, "[", g, "] must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == h.scalar_type(), name, "[", g, "] must have h's dtype ", h.scalar_type());
  TORCH_CHECK(t.device() == h.device() && t.is_contiguous(), name, "[", g, "] must be contiguous on h's device");
}

// Every entry of `order` (CPU, contiguous) a distinct row of [0, n): one pass with a bitmap, cheaper
// than the device-side checks the Python layer makes for CUDA tensors (6 tensor ops per call).
void check_distinct_rows(const at::Tensor& order, int64_t n) {
  const at::Tensor rows = order.contiguous();
  const int64_t* data = rows.const_data_ptr<int64_t>();
  std::vector<bool> seen(static_cast<size_t>(n), false);
  for (int64_t i = 0; i < rows.numel(); ++i) {
    const int64_t row = data[i];
    TORCH_CHECK(row >= 0 && row < n, "order[", i, "] = ", row, " is outside the rows [0, ", n, ") of h");
    TORCH_CHECK(!seen[static_cast<size_t>(row)], "order lists row ", row, " twice (at ", i, ")");
    seen[static_cast<size_t>(row)] = true;
  }
}

// Checks what the kernels rely on (the Python layer has validated the user-facing arguments) and
// packs the groups. `h` is [N, D], `order` None or int64 [M].
std::pair<std::vector<BottleneckGroup>, BottleneckCall> make_groups(
    const at::Tensor& h, const OptionalTensor& order, at::IntArrayRef group_sizes, at::TensorList w1s,
    at::TensorList b1s, at::TensorList w2s, at::TensorList b2s, double alpha, int64_t seed, at::IntArrayRef offsets,
    const OptionalTensor& alpha_t, const OptionalTensor& seed_t, const OptionalTensor& offsets_t,
    at::TensorList prior_mus, at::TensorList prior_logvars, double clamp_lo, double clamp_hi,
    double kl_logvar_coef, bool sample, bool recompute) {
  TORCH_CHECK(h.dim() == 2 && h.size(1) >= 1 && h.is_contiguous(), "h must be a contiguous [N, D] tensor, got ",
              h.sizes());
  const auto dtype = h.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "h must be float32, bfloat16 or float16, got ", dtype);
  const int64_t n = h.size(0);
  const int64_t d = h.size(1);
  const size_t n_groups = group_sizes.size();
  TORCH_CHECK(w1s.size() == n_groups && b1s.size() == n_groups && w2s.size() == n_groups &&
                  b2s.size() == n_groups && offsets.size() == n_groups && prior_mus.size() == n_groups &&
                  prior_logvars.size() == n_groups,
              "one weight set, offset and prior entry per group expected (", n_groups, " groups)");
  // Tensor scalars (ops/scalars.py), on h's device: a CPU call reads them here; a CUDA call passes
  // their device pointers to the kernels (no host sync: CUDA-graph safe). offsets_t: one per group.
  for (const auto& [tensor, dtype, shape] : {std::tuple{alpha_t, at::kFloat, std::vector<int64_t>{}},
                                             std::tuple{seed_t, at::kLong, std::vector<int64_t>{}},
                                             std::tuple{offsets_t, at::kLong, std::vector<int64_t>{int64_t(n_groups)}}}) {
    TORCH_CHECK(!tensor.has_value() || (tensor->scalar_type() == dtype && tensor->sizes() == at::IntArrayRef(shape) &&
                                        tensor->is_contiguous() && tensor->device() == h.device()),
                "alpha_t / seed_t / offsets_t must be tensors on h's device: 0-dim float32, 0-dim int64, "
                "int64 [groups]");
  }
  ScalarPointers device_scalars;
  if (h.is_cuda()) {
    if (alpha_t.has_value()) device_scalars.alpha = alpha_t->const_data_ptr<float>();
    if (seed_t.has_value()) device_scalars.seed = seed_t->const_data_ptr<int64_t>();
  } else {
    if (alpha_t.has_value()) alpha = alpha_t->item<float>();
    if (seed_t.has_value()) seed = seed_t->item<int64_t>();
  }
  std::vector<BottleneckGroup> groups;
  int64_t first = 0;
  for (size_t g = 0; g < n_groups; ++g) {
    const auto gi = static_cast<int64_t>(g);
    check_param(w1s[g], "w1s", gi, {d, d}, h);
    check_param(b1s[g], "b1s", gi, {d}, h);
    check_param(w2s[g], "w2s", gi, {2 * d, d}, h);
    check_param(b2s[g], "b2s", gi, {2 * d}, h);
    const OptionalTensor prior_mu = prior_or_none(prior_mus[g]);
    const OptionalTensor prior_logvar = prior_or_none(prior_logvars[g]);
    TORCH_CHECK(prior_mu.has_value() == prior_logvar.has_value(),
                "prior_mus[", g, "] and prior_logvars[", g, "] must both be [D] or both be empty");
    for (const OptionalTensor& prior : {prior_mu, prior_logvar}) {
      TORCH_CHECK(!prior.has_value() || (prior->scalar_type() == at::kFloat && prior->sizes() == at::IntArrayRef{d} &&
                                         prior->is_contiguous() && prior->device() == h.device()),
                  "priors of group ", g, " must be contiguous float32 [D] tensors on h's device");
    }
    const bool offset_on_device = offsets_t.has_value() && h.is_cuda();
    const int64_t offset = !offsets_t.has_value() ? offsets[g] : offset_on_device ? 0 : (*offsets_t)[gi].item<int64_t>();
    TORCH_CHECK(group_sizes[g] >= 0 && (offsets_t.has_value() || offset >= 0), "group_sizes and offsets must be >= 0");
    groups.push_back({group_sizes[g], first, w1s[g], b1s[g], w2s[g], b2s[g], prior_mu, prior_logvar,
                      static_cast<uint64_t>(offset),
                      offset_on_device ? offsets_t->const_data_ptr<int64_t>() + g : nullptr});
    first += group_sizes[g];
  }
  if (order.has_value()) {
    TORCH_CHECK(order->scalar_type() == at::kLong && order->dim() == 1 && order->size(0) == first &&
                    order->size(0) <= n && order->device() == h.device(),
                "order must be an int64 [M] tensor on h's device with M = sum(group_sizes) <= N");
    if (!order->is_cuda()) check_distinct_rows(*order, n);  // CUDA: the Python layer's device asserts
  } else {
    TORCH_CHECK(first == n, "without order, the groups must cover the N = ", n, " rows of h");
  }
  TORCH_CHECK(alpha_t.has_value() || (alpha >= 0.0 && alpha <= 1.0), "alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK(!std::isnan(clamp_lo) && !std::isnan(clamp_hi) && clamp_lo <= clamp_hi,
              "clamp_lo must be <= clamp_hi, got ", clamp_lo, ", ", clamp_hi);
  const OpScalars scalars{static_cast<float>(alpha), static_cast<float>(clamp_lo), static_cast<float>(clamp_hi),
                          static_cast<float>(kl_logvar_coef), sample};
  return {groups, BottleneckCall{n, first, d, scalars, seed, recompute, device_scalars}};
}

BottleneckForwardResult vib_bottleneck_fwd(const at::Tensor& h, const OptionalTensor& order,
                                           at::IntArrayRef group_sizes, at::TensorList w1s, at::TensorList b1s,
                                           at::TensorList w2s, at::TensorList b2s, double alpha, int64_t seed,
                                           at::IntArrayRef offsets, const OptionalTensor& alpha_t,
                                           const OptionalTensor& seed_t, const OptionalTensor& offsets_t,
                                           at::TensorList prior_mus,
                                           at::TensorList prior_logvars, double clamp_lo, double clamp_hi,
                                           double kl_logvar_coef, bool sample, bool recompute) {
  const auto [groups, call] = make_groups(h, order, group_sizes, w1s, b1s, w2s, b2s, alpha, seed, offsets, alpha_t, seed_t, offsets_t, prior_mus,
                                          prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef, sample, recompute);
  return bottleneck_forward(h, order, groups, call);
}

BottleneckBackwardResult vib_bottleneck_bwd(const at::Tensor& grad_out, const at::Tensor& grad_kl, const at::Tensor& h,
                                            const OptionalTensor& order, at::IntArrayRef group_sizes,
                                            at::TensorList w1s, at::TensorList b1s, at::TensorList w2s,
                                            at::TensorList b2s, double alpha, int64_t seed, at::IntArrayRef offsets,
                                            const OptionalTensor& alpha_t, const OptionalTensor& seed_t,
                                            const OptionalTensor& offsets_t, at::TensorList prior_mus,
                                            at::TensorList prior_logvars, double clamp_lo,
                                            double clamp_hi, double kl_logvar_coef, bool sample, bool recompute,
                                            const at::Tensor& preact, const at::Tensor& stats) {
  const auto [groups, call] = make_groups(h, order, group_sizes, w1s, b1s, w2s, b2s, alpha, seed, offsets, alpha_t, seed_t, offsets_t, prior_mus,
                                          prior_logvars, clamp_lo, clamp_hi, kl_logvar_coef, sample, recompute);
  TORCH_CHECK(grad_out.sizes() == h.sizes() && grad_out.scalar_type() == h.scalar_type() && grad_out.is_contiguous() &&
                  grad_out.device() == h.device(),
              "grad_out must be a contiguous tensor like h");
  for (const at::Tensor* saved : {&grad_kl, &preact, &stats}) {
    TORCH_CHECK(saved->device() == h.device(), "grad_kl, preact and stats must be on h's device ", h.device());
  }
  TORCH_CHECK(grad_kl.scalar_type() == at::kFloat && grad_kl.dim() == 1 && grad_kl.size(0) == call.n_order &&
                  grad_kl.is_contiguous(),
              "grad_kl must be a contiguous float32 [M] tensor");
  TORCH_CHECK(preact.sizes() == at::IntArrayRef({call.n_order, call.dim}) && preact.is_contiguous(),
              "preact must be the forward's contiguous [M, D] pre-activation");
  TORCH_CHECK(recompute || (stats.sizes() == at::IntArrayRef({call.n_order, 2 * call.dim}) && stats.is_contiguous()),
              "stats must be the forward's contiguous [M, 2D] stats when recompute is false");
  return bottleneck_backward(grad_out, grad_kl, h, order, groups, call, preact, stats);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vittle_fast, m) {
  m.def(
      "vib_bottleneck_fwd(Tensor h, Tensor? order, int[] group_sizes, Tensor[] w1s, Tensor[] b1s, Tensor[] w2s, "
      "Tensor[] b2s, float alpha, int seed, int[] offsets, Tensor? alpha_t, Tensor? seed_t, Tensor? offsets_t, "
      "Tensor[] prior_mus, Tensor[] prior_logvars, "
      "float clamp_lo, float clamp_hi, float kl_logvar_coef, bool sample, bool recompute) "
      "-> (Tensor out, Tensor kl, Tensor preact, Tensor stats)");
  m.def(
      "vib_bottleneck_bwd(Tensor grad_out, Tensor grad_kl, Tensor h, Tensor? order, int[] group_sizes, "
      "Tensor[] w1s, Tensor[] b1s, Tensor[] w2s, Tensor[] b2s, float alpha, int seed, int[] offsets, "
      "Tensor? alpha_t, Tensor? seed_t, Tensor? offsets_t, Tensor[] prior_mus, Tensor[] prior_logvars, float clamp_lo, float clamp_hi, float kl_logvar_coef, "
      "bool sample, bool recompute, Tensor preact, Tensor stats) "
      "-> (Tensor grad_h, Tensor[] grad_w1s, Tensor[] grad_b1s, Tensor[] grad_w2s, Tensor[] grad_b2s, "
      "Tensor[] grad_prior_mus, Tensor[] grad_prior_logvars)");
}

TORCH_LIBRARY_IMPL(vittle_fast, CPU, m) {
  m.impl("vib_bottleneck_fwd", &vib_bottleneck_fwd);
  m.impl("vib_bottleneck_bwd", &vib_bottleneck_bwd);
}

#ifdef VITTLE_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(vittle_fast, CUDA, m) {
  m.impl("vib_bottleneck_fwd", &vib_bottleneck_fwd);
  m.impl("vib_bottleneck_bwd", &vib_bottleneck_bwd);
}
#endif

}  // namespace vittle_fast
