// CPU kernel of the fused Vittle op: at::parallel_for over tokens, fp32 math from the shared header.
//
// Noise is generated one row at a time: each of the row's Philox counters is evaluated once (four
// normals per counter; a counter straddling two rows, once per row) into a scratch buffer, then one
// fused, vectorized loop does the element math. Two implementations of the row loops return bitwise
// the same results: AVX-512 intrinsics (vib_sample_kl_cpu_avx512.h; used when the CPU has AVX-512
// and rows have at least kMinAvx512Dim elements) and portable loops that g++ auto-vectorizes. The prior gradient is reduced deterministically:
// rows are cut into chunks of a fixed size (independent of the thread count), each chunk writes its
// own partial sums, and the partials are added in chunk order.
#include "vib_sample_kl.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(VITTLE_CPU_AVX512)
#include "vib_sample_kl_cpu_avx512.h"
#endif

// The row loops are compiled for AVX-512, AVX2 and baseline x86-64 and the best is picked when the
// library loads (GCC function multiversioning). With -ffp-contract=off every version rounds alike,
// so results do not depend on the CPU either.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VITTLE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VITTLE_CPU_CLONES
#endif

namespace vittle_fast {
namespace {

// Rows per prior-gradient partial: fixed, so the reduction order never depends on the threads.
constexpr int64_t kPriorChunkRows = 64;
// Elements per parallel_for task, enough to amortise the scheduling cost.
constexpr int64_t kElementsPerTask = 1 << 15;
// Shorter rows take the portable loops: the AVX-512 noise loop computes 16 counters (64 normals)
// per step, mostly wasted on a short row.
constexpr int64_t kMinAvx512Dim = 64;

// Floats of the per-row noise buffer: four per counter, the counter count (at most D/4 + 2)
// rounded up to the AVX-512 noise step (avx512::kCountersPerStep = 32 counters).
int64_t noise_buffer_size(int64_t dim) {
  constexpr int64_t kStep = 32;
  const int64_t max_counters = dim / kNormalsPerCounter + 2;
  return kNormalsPerCounter * ((max_counters + kStep - 1) / kStep) * kStep;
}

// Storage dtypes the AVX-512 row loops handle (float64 always takes the portable loops).
template <typename scalar_t>
constexpr bool kHasAvx512Rows = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16> ||
                                std::is_same_v<scalar_t, c10::Half>;

// True when this call runs the AVX-512 row loops: cpu_avx512_enabled() and rows long enough.
template <typename scalar_t>
bool use_avx512(int64_t dim) {
  return kHasAvx512Rows<scalar_t> && dim >= kMinAvx512Dim && cpu_avx512_enabled();
}

// Per-column prior (fixed N(0, 1) or the clamped learnable one), computed once per call and kept
// as separate arrays so the element loops read them with unit stride.
struct PriorColumns {
  PriorColumns(const OptionalTensor& prior_mu, const OptionalTensor& prior_logvar, const FusedCall& call)
      : mu(call.dim, 0.0f), logvar(call.dim, 0.0f), inv_var(call.dim, 1.0f) {
    if (!call.learnable_prior) return;
    const float* mu_in = prior_mu->const_data_ptr<float>();
    const float* logvar_in = prior_logvar->const_data_ptr<float>();
    for (int64_t j = 0; j < call.dim; ++j) {
      const PriorColumn column = learnable_prior(mu_in[j], logvar_in[j], call.scalars);
      mu[j] = column.mu;
      logvar[j] = column.logvar;
      inv_var[j] = column.inv_var;
    }
  }

  // Raw pointers for the hot loops: the compiler cannot prove that stores to the outputs leave a
  // std::vector's internal pointer alone, and would reload it every element (no vectorization).
  struct View {
    const float* mu;
    const float* logvar;
    const float* inv_var;

    PriorColumn operator[](int64_t j) const { return {mu[j], logvar[j], inv_var[j]}; }
  };

  View view() const { return {mu.data(), logvar.data(), inv_var.data()}; }

  std::vector<float> mu, logvar, inv_var;
};

// Per-thread scratch for one row. The Philox words are stored lane by lane (structure of arrays)
// so the noise loops vectorize across counters.
struct RowScratch {
  explicit RowScratch(int64_t dim)
      : words(4, std::vector<uint32_t>(dim / kNormalsPerCounter + 2)),
        normals(noise_buffer_size(dim), 0.0f),
        kl_terms(dim) {}

  std::vector<std::vector<uint32_t>> words;  // [lane][counter]
  std::vector<float> normals;                // four per counter; zeros when the call does not sample
  std::vector<float> kl_terms;               // the row's kl_ij before the mean
};

// The contract's noise for row `row` (elements k = row*D .. row*D + D - 1); returns a pointer to
// the row's first element.
VITTLE_CPU_CLONES const float* row_noise(const FusedCall& call, int64_t row, RowScratch& scratch) {
  const uint64_t first_k = static_cast<uint64_t>(row) * static_cast<uint64_t>(call.dim);
  const uint64_t first_counter = call.offset + first_k / kNormalsPerCounter;
  const int64_t first_lane = static_cast<int64_t>(first_k % kNormalsPerCounter);
  const int64_t n_counters = (first_lane + call.dim + kNormalsPerCounter - 1) / kNormalsPerCounter;
  uint32_t* w0 = scratch.words[0].data();
  uint32_t* w1 = scratch.words[1].data();
  uint32_t* w2 = scratch.words[2].data();
  uint32_t* w3 = scratch.words[3].data();
#pragma omp simd
  for (int64_t t = 0; t < n_counters; ++t) {
    const Uint4x32 bits = philox4x32_10(call.seed, first_counter + static_cast<uint64_t>(t));
    w0[t] = bits.x0;
    w1[t] = bits.x1;
    w2[t] = bits.x2;
    w3[t] = bits.x3;
  }
  float* out = scratch.normals.data();
#pragma omp simd
  for (int64_t t = 0; t < n_counters; ++t) {
    uniform_pair_to_normal(uint32_to_uniform(w0[t]), uint32_to_uniform(w1[t]), out[4 * t + 0], out[4 * t + 1]);
    uniform_pair_to_normal(uint32_to_uniform(w2[t]), uint32_to_uniform(w3[t]), out[4 * t + 2], out[4 * t + 3]);
  }
  return out + first_lane;
}

// Calls fn(std::true_type{}) or fn(std::false_type{}): a runtime flag as a template parameter.
template <typename Fn>
void with_bool(bool flag, Fn&& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

int64_t rows_per_task(int64_t dim) { return std::max<int64_t>(1, kElementsPerTask / dim); }

// Sum in a fixed blocked order (kSumLanes interleaved partial sums, then lane by lane): the same
// for every row and every thread count, and vectorizable without -ffast-math.
constexpr int64_t kSumLanes = 8;

float fixed_order_sum(const float* x, int64_t n) {
  float lanes[kSumLanes] = {};
  const int64_t full = n - n % kSumLanes;
  for (int64_t j = 0; j < full; j += kSumLanes) {
    for (int64_t l = 0; l < kSumLanes; ++l) lanes[l] += x[j + l];
  }
  for (int64_t j = full; j < n; ++j) lanes[j - full] += x[j];
  float total = 0.0f;
  for (int64_t l = 0; l < kSumLanes; ++l) total += lanes[l];
  return total;
}

// Row i of the forward's tensors (h, z_hat: [N, D]; stats = [mu | logvar]: [N, 2D]), and of the
// backward's (grad_z_hat, grad_h: [N, D]; stats, grad_stats: [N, 2D]). Both row loops use these.
template <typename scalar_t>
struct ForwardRow {
  const scalar_t* h;
  const scalar_t* mu;
  const scalar_t* logvar;
  scalar_t* z_hat;
};

template <typename scalar_t>
ForwardRow<scalar_t> forward_row(int64_t i, int64_t d, const scalar_t* h, const scalar_t* stats, scalar_t* z_hat,
                                 RowMap z_rows) {
  const scalar_t* mu = stats + i * 2 * d;
  return {h + i * d, mu, mu + d, z_hat + z_rows[i] * d};
}

template <typename scalar_t>
struct BackwardRow {
  const scalar_t* grad_z_hat;
  const scalar_t* mu;
  const scalar_t* logvar;
  scalar_t* grad_h;
  scalar_t* grad_mu;
  scalar_t* grad_logvar;
};

template <typename scalar_t>
BackwardRow<scalar_t> backward_row(int64_t i, int64_t d, const scalar_t* grad_z_hat, RowMap g_rows,
                                   const scalar_t* stats, scalar_t* grad_h, scalar_t* grad_stats) {
  const scalar_t* mu = stats + i * 2 * d;
  scalar_t* grad_mu = grad_stats + i * 2 * d;
  return {grad_z_hat + g_rows[i] * d, mu, mu + d, grad_h + i * d, grad_mu, grad_mu + d};
}

// The element loops are instantiated per value of `sample` so that the per-element select on it
// folds away; `ivdep` because outputs are fresh allocations that never alias the inputs (the
// number of pointers is past g++'s limit for runtime alias checks).
template <typename scalar_t, bool kSample>
VITTLE_CPU_CLONES void forward_rows(int64_t begin, int64_t end, const scalar_t* h, const scalar_t* stats,
                  const PriorColumns::View priors, scalar_t* z_hat, RowMap z_rows, float* kl, const FusedCall& call,
                  RowScratch& scratch) {
  const int64_t d = call.dim;
  OpScalars scalars = call.scalars;  // a local copy: provably not aliased by the output stores
  scalars.sample = kSample;
  float* kl_terms = scratch.kl_terms.data();
  for (int64_t i = begin; i < end; ++i) {
    const float* eps = kSample ? row_noise(call, i, scratch) : scratch.normals.data();
    const auto [h_row, mu_row, logvar_row, z_row] = forward_row(i, d, h, stats, z_hat, z_rows);
#pragma GCC ivdep
    for (int64_t j = 0; j < d; ++j) {
      const ForwardElement e = forward_element(static_cast<float>(h_row[j]), static_cast<float>(mu_row[j]),
                                               static_cast<float>(logvar_row[j]), eps[j], priors[j], scalars);
      z_row[j] = static_cast<scalar_t>(e.z_hat);
      kl_terms[j] = e.kl;
    }
    kl[i] = fixed_order_sum(kl_terms, d) / static_cast<float>(d);
  }
}

// Backward of rows [begin, end); with kLearnablePrior, adds this range's prior-gradient terms into
// prior_partial ([2, D]: d/dmu_p then d/dlv_p).
template <typename scalar_t, bool kSample, bool kLearnablePrior>
VITTLE_CPU_CLONES void backward_rows(int64_t begin, int64_t end, const scalar_t* grad_z_hat, RowMap g_rows,
                   const float* grad_kl, const scalar_t* stats, const PriorColumns::View priors, scalar_t* grad_h, scalar_t* grad_stats,
                   float* prior_partial, const FusedCall& call, RowScratch& scratch) {
  const int64_t d = call.dim;
  OpScalars scalars = call.scalars;  // a local copy: provably not aliased by the output stores
  scalars.sample = kSample;
  for (int64_t i = begin; i < end; ++i) {
    const float* eps = kSample ? row_noise(call, i, scratch) : scratch.normals.data();
    const float w = grad_kl[i] / static_cast<float>(d);
    const auto [g_row, mu_row, logvar_row, grad_h_row, grad_mu_row, grad_logvar_row] =
        backward_row(i, d, grad_z_hat, g_rows, stats, grad_h, grad_stats);
#pragma GCC ivdep
    for (int64_t j = 0; j < d; ++j) {
      const BackwardElement e = backward_element(static_cast<float>(g_row[j]), w, static_cast<float>(mu_row[j]),
                                                 static_cast<float>(logvar_row[j]), eps[j], priors[j], scalars);
      grad_h_row[j] = static_cast<scalar_t>(e.grad_h);
      grad_mu_row[j] = static_cast<scalar_t>(e.grad_mu);
      grad_logvar_row[j] = static_cast<scalar_t>(e.grad_logvar);
      if constexpr (kLearnablePrior) {
        prior_partial[j] += e.grad_prior_mu;
        prior_partial[d + j] += e.grad_prior_logvar;
      }
    }
  }
}

#if defined(VITTLE_CPU_AVX512)
// The row loops above, 16 columns at a time with intrinsics (same operations, same order).
namespace avx512_rows {
using namespace ::vittle_fast::avx512;

static_assert(32 % avx512::kCountersPerStep == 0, "noise_buffer_size rounds the counters to 32");

// Element-loop step: four groups of 16 columns, so four exp chains overlap.
constexpr int kGroups = 4;
using Floats = F<kGroups>;
using Masks = M<kGroups>;

// The prior of a step's columns: the learnable prior's arrays, or the fixed N(0, 1) as constants.
struct Priors {
  Floats mu, logvar, inv_var;
};

template <bool kLearnable>
VITTLE_AVX512_INLINE Priors load_prior(const PriorColumns::View& priors, int64_t j, Masks k) {
  if constexpr (kLearnable) {
    return {load(priors.mu + j, k), load(priors.logvar + j, k), load(priors.inv_var + j, k)};
  } else {
    return {splat<kGroups>(0.0f), splat<kGroups>(0.0f), splat<kGroups>(1.0f)};
  }
}

// forward_element's kl: 0.5 * (c * (lv_p - lv) + (var + diff^2) / var_p - 1)
VITTLE_AVX512_INLINE Floats forward_kl(Floats logvar_c, Floats var, Floats diff, const Priors& prior,
                                       float kl_logvar_coef) {
  return mul(0.5f, sub(add(mul(kl_logvar_coef, sub(prior.logvar, logvar_c)), mul(add(var, mul(diff, diff)), prior.inv_var)),
                       1.0f));
}

// forward_rows of the portable path, 64 columns per step.
template <typename scalar_t, bool kSample, bool kLearnable>
VITTLE_AVX512 void forward_rows(int64_t begin, int64_t end, const scalar_t* h, const scalar_t* stats,
                                const PriorColumns::View priors, scalar_t* z_hat, RowMap z_rows, float* kl,
                                const FusedCall& call, float* normals, float* kl_terms) {
  const int64_t d = call.dim;
  const OpScalars s = call.scalars;
  for (int64_t i = begin; i < end; ++i) {
    const float* eps = kSample ? avx512::row_noise(call, i, normals) : nullptr;
    const auto [h_row, mu_row, logvar_row, z_row] = forward_row(i, d, h, stats, z_hat, z_rows);
    for (int64_t j = 0; j < d; j += kGroups * kLanes) {
      const Masks k = tail_masks<kGroups>(d - j);
      const Floats mu = load(mu_row + j, k);
      const Floats logvar_c = clamp(load(logvar_row + j, k), s.clamp_lo, s.clamp_hi);
      const Floats std_dev = exp(mul(0.5f, logvar_c));
      const Floats var = mul(std_dev, std_dev);
      Floats z_tilde = mu;
      if constexpr (kSample) z_tilde = add(mu, mul(std_dev, load(eps + j, k)));
      const Priors prior = load_prior<kLearnable>(priors, j, k);
      store(z_row + j, k, add(mul(1.0f - s.alpha, load(h_row + j, k)), mul(s.alpha, z_tilde)));
      store(kl_terms + j, k, forward_kl(logvar_c, var, sub(mu, prior.mu), prior, s.kl_logvar_coef));
    }
    kl[i] = fixed_order_sum(kl_terms, d) / static_cast<float>(d);
  }
}

// backward_rows of the portable path, 64 columns per step.
template <typename scalar_t, bool kSample, bool kLearnable>
VITTLE_AVX512 void backward_rows(int64_t begin, int64_t end, const scalar_t* grad_z_hat, RowMap g_rows,
                                 const float* grad_kl, const scalar_t* stats, const PriorColumns::View priors, scalar_t* grad_h,
                                 scalar_t* grad_stats, float* prior_partial, const FusedCall& call, float* normals) {
  const int64_t d = call.dim;
  const OpScalars s = call.scalars;
  for (int64_t i = begin; i < end; ++i) {
    const float* eps = kSample ? avx512::row_noise(call, i, normals) : nullptr;
    const float w = grad_kl[i] / static_cast<float>(d);
    const float half_w = w * 0.5f;
    const auto [g_row, mu_row, logvar_row, grad_h_row, grad_mu_row, grad_logvar_row] =
        backward_row(i, d, grad_z_hat, g_rows, stats, grad_h, grad_stats);
    for (int64_t j = 0; j < d; j += kGroups * kLanes) {
      const Masks k = tail_masks<kGroups>(d - j);
      const Floats g = load(g_row + j, k);
      const Floats mu = load(mu_row + j, k);
      const Floats logvar_c = clamp(load(logvar_row + j, k), s.clamp_lo, s.clamp_hi);
      const Floats std_dev = exp(mul(0.5f, logvar_c));
      const Floats var = mul(std_dev, std_dev);
      const Priors prior = load_prior<kLearnable>(priors, j, k);
      const Floats diff = sub(mu, prior.mu);
      const Floats diff_scaled = mul(diff, prior.inv_var);
      const Floats ag = mul(s.alpha, g);
      store(grad_h_row + j, k, mul(1.0f - s.alpha, g));
      store(grad_mu_row + j, k, add(ag, mul(w, diff_scaled)));
      Floats sample_term = splat<kGroups>(0.0f);
      if constexpr (kSample) sample_term = mul(mul(mul(ag, load(eps + j, k)), std_dev), 0.5f);
      store(grad_logvar_row + j, k, add(sample_term, mul(half_w, sub(mul(var, prior.inv_var), s.kl_logvar_coef))));
      if constexpr (kLearnable) {
        float* pm = prior_partial + j;
        float* plv = prior_partial + d + j;
        store(pm, k, add(load(pm, k), mul(-w, diff_scaled)));
        const Floats grad_plv = mul(half_w, sub(s.kl_logvar_coef, mul(add(var, mul(diff, diff)), prior.inv_var)));
        store(plv, k, add(load(plv, k), grad_plv));
      }
    }
  }
}

}  // namespace avx512_rows
#endif

}  // namespace

bool cpu_avx512_enabled() {
#if defined(VITTLE_CPU_AVX512)
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  const char* env = std::getenv("VITTLE_FAST_CPU_AVX512");
  return supported && !(env != nullptr && std::strcmp(env, "0") == 0);
#else
  return false;
#endif
}

ForwardResult forward_cpu(const at::Tensor& h, const at::Tensor& stats, const OptionalTensor& prior_mu,
                          const OptionalTensor& prior_logvar, const FusedCall& call,
                          const std::optional<CpuForwardInto>& into) {
  at::Tensor z_hat = into ? into->z_hat : at::empty_like(h);
  at::Tensor kl = into ? into->kl : at::empty({call.n_tokens}, h.options().dtype(at::kFloat));
  const RowMap z_rows = into ? into->z_rows : RowMap{};
  if (call.n_tokens == 0) return {z_hat, kl};
  const PriorColumns priors(prior_mu, prior_logvar, call);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "vittle_fast_fwd_cpu", [&] {
    const scalar_t* h_data = h.const_data_ptr<scalar_t>();
    const scalar_t* stats_data = stats.const_data_ptr<scalar_t>();
    scalar_t* z_data = z_hat.mutable_data_ptr<scalar_t>();
    float* kl_data = kl.mutable_data_ptr<float>();
    const bool simd = use_avx512<scalar_t>(call.dim);
    with_bool(call.scalars.sample, [&](auto sample) {
      constexpr bool kSample = decltype(sample)::value;
      at::parallel_for(0, call.n_tokens, rows_per_task(call.dim), [&](int64_t begin, int64_t end) {
        RowScratch scratch(call.dim);
#if defined(VITTLE_CPU_AVX512)
        if constexpr (kHasAvx512Rows<scalar_t>) {
          if (simd) {
            with_bool(call.learnable_prior, [&](auto learnable) {
              avx512_rows::forward_rows<scalar_t, kSample, decltype(learnable)::value>(
                  begin, end, h_data, stats_data, priors.view(), z_data, z_rows, kl_data, call,
                  scratch.normals.data(), scratch.kl_terms.data());
            });
            return;
          }
        }
#endif
        forward_rows<scalar_t, kSample>(begin, end, h_data, stats_data, priors.view(), z_data, z_rows, kl_data,
                                        call, scratch);
      });
    });
  });
  return {z_hat, kl};
}

BackwardResult backward_cpu(const at::Tensor& grad_z_hat, const at::Tensor& grad_kl, const at::Tensor& stats,
                            const OptionalTensor& prior_mu, const OptionalTensor& prior_logvar,
                            const FusedCall& call, RowMap g_rows) {
  const int64_t d = call.dim;
  at::Tensor grad_h = at::empty({call.n_tokens, d}, grad_z_hat.options());
  at::Tensor grad_stats = at::empty_like(stats);
  const auto fp32 = stats.options().dtype(at::kFloat);
  const int64_t prior_size = call.learnable_prior ? d : 0;
  const int64_t n_chunks = (call.n_tokens + kPriorChunkRows - 1) / kPriorChunkRows;
  // [n_chunks, 2, D] partial sums, one slice per fixed-size chunk of rows.
  at::Tensor partials = at::zeros({call.learnable_prior ? n_chunks : 0, 2, d}, fp32);
  const PriorColumns priors(prior_mu, prior_logvar, call);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, stats.scalar_type(), "vittle_fast_bwd_cpu", [&] {
    const scalar_t* g = grad_z_hat.const_data_ptr<scalar_t>();
    const float* gkl = grad_kl.const_data_ptr<float>();
    const scalar_t* st = stats.const_data_ptr<scalar_t>();
    scalar_t* gh = grad_h.mutable_data_ptr<scalar_t>();
    scalar_t* gs = grad_stats.mutable_data_ptr<scalar_t>();
    float* part = call.learnable_prior ? partials.mutable_data_ptr<float>() : nullptr;
    const int64_t chunks_per_task = std::max<int64_t>(1, rows_per_task(d) / kPriorChunkRows);
    const bool simd = use_avx512<scalar_t>(d);
    with_bool(call.scalars.sample, [&](auto sample) {
      with_bool(call.learnable_prior, [&](auto learnable) {
        constexpr bool kSample = decltype(sample)::value;
        constexpr bool kLearnable = decltype(learnable)::value;
        at::parallel_for(0, n_chunks, chunks_per_task, [&](int64_t chunk_begin, int64_t chunk_end) {
          RowScratch scratch(d);
          for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
            const int64_t row_begin = chunk * kPriorChunkRows;
            const int64_t row_end = std::min(call.n_tokens, row_begin + kPriorChunkRows);
            float* chunk_partial = kLearnable ? part + chunk * 2 * d : nullptr;
#if defined(VITTLE_CPU_AVX512)
            if constexpr (kHasAvx512Rows<scalar_t>) {
              if (simd) {
                avx512_rows::backward_rows<scalar_t, kSample, kLearnable>(row_begin, row_end, g, g_rows, gkl, st,
                                                                          priors.view(), gh, gs, chunk_partial,
                                                                          call, scratch.normals.data());
                continue;
              }
            }
#endif
            backward_rows<scalar_t, kSample, kLearnable>(row_begin, row_end, g, g_rows, gkl, st, priors.view(), gh,
                                                         gs, chunk_partial, call, scratch);
          }
        });
      });
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

// Which row loops a CPU call with rows of `dim` elements runs now ("avx512" or "portable"): lets
// the tests check that VITTLE_FAST_CPU_AVX512 switches paths, so comparing the paths means something.
std::string cpu_row_kernel(int64_t dim) { return use_avx512<float>(dim) ? "avx512" : "portable"; }

TORCH_LIBRARY_FRAGMENT(vittle_fast, m) { m.def("cpu_row_kernel(int dim) -> str", &cpu_row_kernel); }

}  // namespace vittle_fast
