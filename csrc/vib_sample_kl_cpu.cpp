// CPU kernel of the fused Vittle op: at::parallel_for over tokens, fp32 math from the shared header.
//
// Noise is generated one row at a time: the row's Philox counters are evaluated once each (four
// normals per counter) into a scratch buffer, so no counter is evaluated twice. The prior gradient
// is reduced deterministically: rows are cut into chunks of a fixed size (independent of the thread
// count), each chunk writes its own partial sums, and the partials are added in chunk order.
#include "vib_sample_kl.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <vector>

namespace vittle_fast {
namespace {

// Rows per prior-gradient partial: fixed, so the reduction order never depends on the threads.
constexpr int64_t kPriorChunkRows = 64;
// Elements per parallel_for task, enough to amortise the scheduling cost.
constexpr int64_t kElementsPerTask = 1 << 15;

// Per-column prior (fixed N(0, 1) or the clamped learnable one), computed once per call.
std::vector<PriorColumn> prior_columns(const OptionalTensor& prior_mu, const OptionalTensor& prior_logvar,
                                       const FusedCall& call) {
  std::vector<PriorColumn> columns(call.dim, fixed_prior());
  if (call.learnable_prior) {
    const float* mu = prior_mu->data_ptr<float>();
    const float* logvar = prior_logvar->data_ptr<float>();
    for (int64_t j = 0; j < call.dim; ++j) columns[j] = learnable_prior(mu[j], logvar[j], call.scalars);
  }
  return columns;
}

// The contract's noise for row `row` (elements k = row*D .. row*D + D - 1) written into `scratch`
// (>= D + 2*kNormalsPerCounter floats); returns the pointer to the row's first element.
const float* row_noise(const FusedCall& call, int64_t row, std::vector<float>& scratch) {
  const uint64_t first_k = static_cast<uint64_t>(row) * static_cast<uint64_t>(call.dim);
  const uint64_t first_counter = first_k / kNormalsPerCounter;
  const int64_t first_lane = static_cast<int64_t>(first_k % kNormalsPerCounter);
  const int64_t n_counters = (first_lane + call.dim + kNormalsPerCounter - 1) / kNormalsPerCounter;
  float* out = scratch.data();
  for (int64_t t = 0; t < n_counters; ++t) {
    const Normal4 n = normal4(call.seed, call.offset + first_counter + static_cast<uint64_t>(t));
    out[4 * t + 0] = n.n0;
    out[4 * t + 1] = n.n1;
    out[4 * t + 2] = n.n2;
    out[4 * t + 3] = n.n3;
  }
  return out + first_lane;
}

int64_t rows_per_task(int64_t dim) { return std::max<int64_t>(1, kElementsPerTask / dim); }

template <typename scalar_t>
void forward_rows(const scalar_t* h, const scalar_t* stats, const PriorColumn* priors, scalar_t* z_hat, float* kl,
                  const FusedCall& call) {
  const int64_t d = call.dim;
  at::parallel_for(0, call.n_tokens, rows_per_task(d), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(d + 2 * kNormalsPerCounter, 0.0f);
    for (int64_t i = begin; i < end; ++i) {
      const float* eps = call.scalars.sample ? row_noise(call, i, scratch) : scratch.data();
      const scalar_t* h_row = h + i * d;
      const scalar_t* mu_row = stats + i * 2 * d;
      const scalar_t* logvar_row = mu_row + d;
      scalar_t* z_row = z_hat + i * d;
      double kl_sum = 0.0;  // fixed j order for every row: bitwise reproducible
      for (int64_t j = 0; j < d; ++j) {
        const ForwardElement e = forward_element(static_cast<float>(h_row[j]), static_cast<float>(mu_row[j]),
                                                 static_cast<float>(logvar_row[j]), eps[j], priors[j],
                                                 call.scalars);
        z_row[j] = static_cast<scalar_t>(e.z_hat);
        kl_sum += e.kl;
      }
      kl[i] = static_cast<float>(kl_sum / static_cast<double>(d));
    }
  });
}

// Backward of rows [begin, end); adds this range's prior-gradient terms into prior_partial
// ([2, D]: d/dmu_p then d/dlv_p) when it is non-null.
template <typename scalar_t>
void backward_rows(int64_t begin, int64_t end, const scalar_t* grad_z_hat, const float* grad_kl,
                   const scalar_t* stats, const PriorColumn* priors, scalar_t* grad_h, scalar_t* grad_stats,
                   float* prior_partial, const FusedCall& call, std::vector<float>& scratch) {
  const int64_t d = call.dim;
  for (int64_t i = begin; i < end; ++i) {
    const float* eps = call.scalars.sample ? row_noise(call, i, scratch) : scratch.data();
    const float w = grad_kl[i] / static_cast<float>(d);
    const scalar_t* g_row = grad_z_hat + i * d;
    const scalar_t* mu_row = stats + i * 2 * d;
    const scalar_t* logvar_row = mu_row + d;
    scalar_t* grad_h_row = grad_h + i * d;
    scalar_t* grad_mu_row = grad_stats + i * 2 * d;
    scalar_t* grad_logvar_row = grad_mu_row + d;
    for (int64_t j = 0; j < d; ++j) {
      const BackwardElement e = backward_element(static_cast<float>(g_row[j]), w, static_cast<float>(mu_row[j]),
                                                 static_cast<float>(logvar_row[j]), eps[j], priors[j],
                                                 call.scalars);
      grad_h_row[j] = static_cast<scalar_t>(e.grad_h);
      grad_mu_row[j] = static_cast<scalar_t>(e.grad_mu);
      grad_logvar_row[j] = static_cast<scalar_t>(e.grad_logvar);
      if (prior_partial != nullptr) {
        prior_partial[j] += e.grad_prior_mu;
        prior_partial[d + j] += e.grad_prior_logvar;
      }
    }
  }
}

}  // namespace

ForwardResult forward_cpu(const at::Tensor& h, const at::Tensor& stats, const OptionalTensor& prior_mu,
                          const OptionalTensor& prior_logvar, const FusedCall& call) {
  at::Tensor z_hat = at::empty_like(h);
  at::Tensor kl = at::empty({call.n_tokens}, h.options().dtype(at::kFloat));
  if (call.n_tokens == 0) return {z_hat, kl};
  const std::vector<PriorColumn> priors = prior_columns(prior_mu, prior_logvar, call);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "vittle_fast_fwd_cpu", [&] {
    forward_rows<scalar_t>(h.const_data_ptr<scalar_t>(), stats.const_data_ptr<scalar_t>(), priors.data(),
                           z_hat.mutable_data_ptr<scalar_t>(), kl.mutable_data_ptr<float>(), call);
  });
  return {z_hat, kl};
}

BackwardResult backward_cpu(const at::Tensor& grad_z_hat, const at::Tensor& grad_kl, const at::Tensor& stats,
                            const OptionalTensor& prior_mu, const OptionalTensor& prior_logvar,
                            const FusedCall& call) {
  const int64_t d = call.dim;
  at::Tensor grad_h = at::empty_like(grad_z_hat);
  at::Tensor grad_stats = at::empty_like(stats);
  const auto fp32 = stats.options().dtype(at::kFloat);
  const int64_t prior_size = call.learnable_prior ? d : 0;
  const int64_t n_chunks = (call.n_tokens + kPriorChunkRows - 1) / kPriorChunkRows;
  // [n_chunks, 2, D] partial sums, one slice per fixed-size chunk of rows.
  at::Tensor partials = at::zeros({call.learnable_prior ? n_chunks : 0, 2, d}, fp32);
  const std::vector<PriorColumn> priors = prior_columns(prior_mu, prior_logvar, call);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, stats.scalar_type(), "vittle_fast_bwd_cpu", [&] {
    const scalar_t* g = grad_z_hat.const_data_ptr<scalar_t>();
    const float* gkl = grad_kl.const_data_ptr<float>();
    const scalar_t* st = stats.const_data_ptr<scalar_t>();
    scalar_t* gh = grad_h.mutable_data_ptr<scalar_t>();
    scalar_t* gs = grad_stats.mutable_data_ptr<scalar_t>();
    float* part = call.learnable_prior ? partials.mutable_data_ptr<float>() : nullptr;
    const int64_t chunks_per_task = std::max<int64_t>(1, rows_per_task(d) / kPriorChunkRows);
    at::parallel_for(0, n_chunks, chunks_per_task, [&](int64_t chunk_begin, int64_t chunk_end) {
      std::vector<float> scratch(d + 2 * kNormalsPerCounter, 0.0f);
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t row_begin = chunk * kPriorChunkRows;
        const int64_t row_end = std::min(call.n_tokens, row_begin + kPriorChunkRows);
        float* chunk_partial = part == nullptr ? nullptr : part + chunk * 2 * d;
        backward_rows<scalar_t>(row_begin, row_end, g, gkl, st, priors.data(), gh, gs, chunk_partial, call, scratch);
      }
    });
  });

  // Two separate tensors: outputs of an op must not alias each other.
  at::Tensor grad_prior_mu = at::empty({prior_size}, fp32);
  at::Tensor grad_prior_logvar = at::empty({prior_size}, fp32);
  if (call.learnable_prior) {
    // Fixed-order reduction over chunks (column-parallel; each column sums its chunks in order).
    const float* part = partials.const_data_ptr<float>();
    float* outputs[2] = {grad_prior_mu.mutable_data_ptr<float>(), grad_prior_logvar.mutable_data_ptr<float>()};
    at::parallel_for(0, 2 * d, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t col = begin; col < end; ++col) {
        double total = 0.0;
        for (int64_t chunk = 0; chunk < n_chunks; ++chunk) total += part[chunk * 2 * d + col];
        outputs[col / d][col % d] = static_cast<float>(total);
      }
    });
  }
  return {grad_h, grad_stats, grad_prior_mu, grad_prior_logvar};
}

}  // namespace vittle_fast
