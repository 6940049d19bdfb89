// Exact (erf) GELU and its backward for the fused bottleneck's CPU blocks, on AVX-512 rows.
//
// ATen's GELU on CPU goes through oneDNN for fp32 (a primitive set up per call: ~7 us before any
// element) and its backward takes ~1.5 ns per element; at the demo's shape the bottleneck calls them
// 6 times per step. Here: one pass each, the normal CDF and density from one exp (FMA; nothing here
// needs to match another path bit for bit). The erf is
// Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), the approximation ATen's own vectorized erf uses;
// it is evaluated as erfc(|x| / sqrt 2) so GELU keeps its relative accuracy for negative x. Other
// CPUs, and VITTLE_FAST_CPU_AVX512=0, take ATen's GELU.
#include "vib_bottleneck.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(VITTLE_CPU_AVX512)
#include "vib_sample_kl_cpu_avx512.h"
#endif

namespace vittle_fast {
namespace {

#if defined(VITTLE_CPU_AVX512)
using namespace ::vittle_fast::avx512;

constexpr int64_t kElementsPerTask = 1 << 15;

// exp(w) for -81 <= w <= 0: w = n ln2 + r, |r| <= ln2 / 2, a degree-5 polynomial for e^r, scaled
// by 2^n (scalef: no exponent arithmetic).
VITTLE_AVX512_INLINE __m512 exp_nonpositive(__m512 w) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(w, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), w);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.3981999507e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Phi(x) and phi(x) (standard normal CDF and density) for 16 lanes. Past |x| / sqrt 2 = 9 both tails
// are 0 in fp32 (erfc(9) = 4e-37): there the density is set to 0, which also makes x = +-inf give
// float64's GELU (inf, NaN) and NaN gradients; a NaN x propagates through the final products.
VITTLE_AVX512_INLINE void normal_cdf_pdf(__m512 x, __m512& cdf, __m512& pdf) {
  constexpr float kTail = 9.0f;
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));  // |x| / sqrt 2
  const __m512 zc = _mm512_min_ps(z, _mm512_set1_ps(kTail));
  const __m512 denominator = _mm512_fmadd_ps(zc, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f));
  __m512 t = _mm512_rcp14_ps(denominator);  // 14 bits, then one Newton step: ~full fp32
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(denominator, t, _mm512_set1_ps(2.0f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  const __mmask16 inside = _mm512_cmp_ps_mask(z, _mm512_set1_ps(kTail), _CMP_NGT_UQ);  // z <= 9 or NaN
  const __m512 gauss = _mm512_maskz_mov_ps(inside, exp_nonpositive(_mm512_mul_ps(zc, _mm512_sub_ps(
                                                       _mm512_setzero_ps(), zc))));  // exp(-x^2 / 2)
  const __m512 half_erfc = _mm512_mul_ps(_mm512_mul_ps(poly, t), _mm512_mul_ps(gauss, _mm512_set1_ps(0.5f)));
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  cdf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(1.0f), half_erfc), half_erfc);
  pdf = _mm512_mul_ps(gauss, _mm512_set1_ps(0.3989422804014327f));  // 1 / sqrt(2 pi)
}

template <typename scalar_t, bool kBackward>
VITTLE_AVX512 void gelu_elements(int64_t begin, int64_t end, const scalar_t* x, scalar_t* out) {
  for (int64_t i = begin; i < end; i += kLanes) {
    const M<1> k = tail_masks<1>(end - i);
    const F<1> xs = load(x + i, k);
    __m512 cdf, pdf;
    normal_cdf_pdf(xs.v[0], cdf, pdf);
    F<1> y;
    if constexpr (kBackward) {  // out holds dL/dGELU: times GELU'(x) = Phi(x) + x phi(x)
      y.v[0] = _mm512_mul_ps(load(out + i, k).v[0], _mm512_fmadd_ps(xs.v[0], pdf, cdf));
    } else {
      y.v[0] = _mm512_mul_ps(xs.v[0], cdf);
    }
    store(out + i, k, y);
  }
}

template <bool kBackward>
void gelu_avx512(const at::Tensor& x, at::Tensor& out) {
  AT_DISPATCH_V2(x.scalar_type(), "vittle_fast_gelu_cpu", AT_WRAP([&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kElementsPerTask, [&](int64_t begin, int64_t end) {
      gelu_elements<scalar_t, kBackward>(begin, end, x_data, out_data);
    });
  }), at::kFloat, at::kBFloat16, at::kHalf);
}
#endif

bool use_gelu_avx512(const at::Tensor& x) {
#if defined(VITTLE_CPU_AVX512)
  return !x.is_cuda() && x.scalar_type() != at::kDouble && cpu_avx512_enabled();
#else
  (void)x;
  return false;
#endif
}

}  // namespace

at::Tensor gelu_rows(const at::Tensor& x) {
#if defined(VITTLE_CPU_AVX512)
  if (use_gelu_avx512(x)) {
    at::Tensor out = at::empty_like(x);
    gelu_avx512<false>(x.contiguous(), out);
    return out;
  }
#endif
  return at::gelu(x);
}

void gelu_rows_backward_(at::Tensor& grad, const at::Tensor& x) {
#if defined(VITTLE_CPU_AVX512)
  if (use_gelu_avx512(x) && grad.is_contiguous()) {
    gelu_avx512<true>(x.contiguous(), grad);
    return;
  }
#endif
  at::gelu_backward_out(grad, grad, x);
}

// For tests: the two functions above as ops (the out-of-place backward returns grad * GELU'(x)).
TORCH_LIBRARY_FRAGMENT(vittle_fast, m) {
  m.def("gelu_rows(Tensor x) -> Tensor", &gelu_rows);
  m.def("gelu_rows_backward(Tensor grad, Tensor x) -> Tensor", [](const at::Tensor& grad, const at::Tensor& x) {
    at::Tensor out = grad.contiguous().clone();
    gelu_rows_backward_(out, x);
    return out;
  });
}

}  // namespace vittle_fast
