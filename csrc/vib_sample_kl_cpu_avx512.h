// AVX-512 building blocks of the CPU kernel (x86-64 with AVX-512 F/BW/DQ/VL, picked at run time by
// vib_sample_kl_cpu.cpp, whose avx512 row loops use them).
//
// The portable row loops leave g++ to vectorize the shared header's scalar code; it does, but
// spends ~3 ns per element (register spills, widened 64-bit Philox multiplies, masked
// if-conversion). These restate the same computation with intrinsics, 16 lanes at a time,
// operation for operation in the same order and without FMA, so the two paths return bitwise the
// same results (tests/test_cpp_build.py checks it) and the uint32 Philox stream stays Triton's:
//  * Philox4x32-10 on 16 counters per step, 32x32->64 multiplies on even and odd lanes;
//  * host_math's exp / log / sincos polynomials (vib_sample_kl_math.h), lane-wise;
//  * Box-Muller on 16 pairs, the four normals of each counter interleaved in registers;
//  * bf16 / fp16 loads and stores with c10's rounding (round-to-nearest-even, c10's NaN).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "vib_sample_kl.h"

#define VITTLE_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define VITTLE_AVX512_INLINE VITTLE_AVX512 __attribute__((always_inline)) inline

// GCC 12 warns that its own _mm512_undefined_* placeholders "may be used uninitialized".
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace vittle_fast {
namespace avx512 {

using V = __m512;   // 16 fp32 lanes
using I = __m512i;  // 16 int32 lanes
using Mask = __mmask16;

constexpr int64_t kLanes = 16;

VITTLE_AVX512_INLINE V bc(float x) { return _mm512_set1_ps(x); }
VITTLE_AVX512_INLINE I bci(int32_t x) { return _mm512_set1_epi32(x); }
VITTLE_AVX512_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
VITTLE_AVX512_INLINE V sub(V a, V b) { return _mm512_sub_ps(a, b); }
VITTLE_AVX512_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
// k ? b : a, lane-wise
VITTLE_AVX512_INLINE V select(Mask k, V b, V a) { return _mm512_mask_blend_ps(k, a, b); }
VITTLE_AVX512_INLINE Mask lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
VITTLE_AVX512_INLINE Mask gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
VITTLE_AVX512_INLINE Mask is_nan(V a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
VITTLE_AVX512_INLINE V negate_where(Mask k, V a) {
  return _mm512_mask_xor_ps(a, k, a, _mm512_castsi512_ps(bci(INT32_MIN)));
}

// clamp_f32: x < lo ? lo : (x > hi ? hi : x), NaN passes through.
VITTLE_AVX512_INLINE V clamp(V x, V lo, V hi) { return select(lt(x, lo), lo, select(gt(x, hi), hi, x)); }

// host_math::exp
VITTLE_AVX512_INLINE V exp(V x) {
  constexpr float kMaxArg = 88.72283905206835f;
  constexpr float kMinArg = -103.972077083991796f;
  const Mask over = gt(x, bc(kMaxArg));
  const Mask under = lt(x, bc(kMinArg));
  const V clipped = select(over, bc(kMaxArg), select(under, bc(kMinArg), x));
  constexpr float kRoundMagic = 12582912.0f;
  const V n = sub(add(mul(clipped, bc(1.44269504088896341f)), bc(kRoundMagic)), bc(kRoundMagic));
  const V r = sub(sub(clipped, mul(n, bc(0.693359375f))), mul(n, bc(-2.12194440e-4f)));
  V p = bc(1.9875691500e-4f);
  p = add(mul(p, r), bc(1.3981999507e-3f));
  p = add(mul(p, r), bc(8.3334519073e-3f));
  p = add(mul(p, r), bc(4.1665795894e-2f));
  p = add(mul(p, r), bc(1.6666665459e-1f));
  p = add(mul(p, r), bc(5.0000001201e-1f));
  const I n_int = _mm512_cvttps_epi32(n);
  const I half = _mm512_srai_epi32(_mm512_add_epi32(n_int, _mm512_srli_epi32(n_int, 31)), 1);  // C++ n / 2
  const V scale_a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(half, bci(127)), 23));
  const V scale_b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(n_int, half), bci(127)), 23));
  const V y = mul(mul(add(add(mul(mul(p, r), r), r), bc(1.0f)), scale_a), scale_b);
  return select(is_nan(x), x, select(over, bc(__builtin_inff()), select(under, bc(0.0f), y)));
}

// host_math::log (finite x > 0)
VITTLE_AVX512_INLINE V log(V x) {
  const I bits = _mm512_castps_si512(x);
  V e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bits, 23), bci(126)));
  V m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, bci(0x007FFFFF)), bci(0x3F000000)));
  const Mask small = lt(m, bc(0.707106781186547524f));
  e = select(small, sub(e, bc(1.0f)), e);
  m = select(small, sub(add(m, m), bc(1.0f)), sub(m, bc(1.0f)));
  const V z = mul(m, m);
  V p = bc(7.0376836292e-2f);
  p = sub(mul(p, m), bc(1.1514610310e-1f));
  p = add(mul(p, m), bc(1.1676998740e-1f));
  p = sub(mul(p, m), bc(1.2420140846e-1f));
  p = add(mul(p, m), bc(1.4249322787e-1f));
  p = sub(mul(p, m), bc(1.6668057665e-1f));
  p = add(mul(p, m), bc(2.0000714765e-1f));
  p = sub(mul(p, m), bc(2.4999993993e-1f));
  p = add(mul(p, m), bc(3.3333331174e-1f));
  const V y = sub(add(mul(mul(p, m), z), mul(e, bc(-2.12194440e-4f))), mul(bc(0.5f), z));
  return add(add(m, y), mul(e, bc(0.693359375f)));
}

// host_math::sincos
VITTLE_AVX512_INLINE void sincos(V x, V& out_sin, V& out_cos) {
  const Mask negative = lt(x, bc(0.0f));
  const V ax = negate_where(negative, x);
  const I octant = _mm512_and_si512(
      _mm512_add_epi32(_mm512_cvttps_epi32(mul(ax, bc(1.27323954473516f))), bci(1)), bci(~1));
  const V k = _mm512_cvtepi32_ps(octant);
  const V r = sub(sub(sub(ax, mul(k, bc(0.78515625f))), mul(k, bc(2.4187564849853515625e-4f))),
                  mul(k, bc(3.77489497744594108e-8f)));
  const V z = mul(r, r);
  const V cos_poly = add(
      sub(mul(mul(add(mul(sub(mul(bc(2.443315711809948e-5f), z), bc(1.388731625493765e-3f)), z),
                      bc(4.166664568298827e-2f)),
                  z),
              z),
          mul(bc(0.5f), z)),
      bc(1.0f));
  const V sin_poly = add(
      mul(mul(sub(mul(add(mul(bc(-1.9515295891e-4f), z), bc(8.3321608736e-3f)), z), bc(1.6666654611e-1f)), z), r),
      r);
  const Mask swap = _mm512_test_epi32_mask(octant, bci(2));
  const V s = select(swap, cos_poly, sin_poly);
  const V c = select(swap, sin_poly, cos_poly);
  const Mask flip_sin = _mm512_test_epi32_mask(octant, bci(4)) ^ negative;
  const Mask flip_cos = _mm512_test_epi32_mask(_mm512_add_epi32(octant, bci(2)), bci(4));
  out_sin = negate_where(flip_sin, s);
  out_cos = negate_where(flip_cos, c);
}

// hi and lo words of a * m for 16 uint32 lanes (m a broadcast constant).
VITTLE_AVX512_INLINE void mul_hilo(I a, I m, I& hi, I& lo) {
  const I even = _mm512_mul_epu32(a, m);                       // lanes 0, 2, ..: 64-bit products
  const I odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 1, 3, ..
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// philox4x32_10 on the 16 counters first_counter + 0..15.
VITTLE_AVX512_INLINE void philox(int64_t seed, uint64_t first_counter, I& x0, I& x1, I& x2, I& x3) {
  const I iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const I base_lo = bci(static_cast<int32_t>(static_cast<uint32_t>(first_counter)));
  I c0 = _mm512_add_epi32(base_lo, iota);
  const Mask carry = _mm512_cmplt_epu32_mask(c0, base_lo);
  I c1 = _mm512_mask_add_epi32(bci(static_cast<int32_t>(static_cast<uint32_t>(first_counter >> 32))), carry,
                               bci(static_cast<int32_t>(static_cast<uint32_t>(first_counter >> 32))), bci(1));
  I c2 = _mm512_setzero_si512();
  I c3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  uint32_t k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  const I round_a = bci(static_cast<int32_t>(kPhiloxRoundA));
  const I round_b = bci(static_cast<int32_t>(kPhiloxRoundB));
#pragma GCC unroll 10
  for (int round = 0; round < kPhiloxRounds; ++round) {
    I hi_b, lo_b, hi_a, lo_a;
    mul_hilo(c2, round_b, hi_b, lo_b);
    mul_hilo(c0, round_a, hi_a, lo_a);
    c0 = _mm512_ternarylogic_epi32(hi_b, c1, bci(static_cast<int32_t>(k0)), 0x96);  // three-way xor
    c2 = _mm512_ternarylogic_epi32(hi_a, c3, bci(static_cast<int32_t>(k1)), 0x96);
    c1 = lo_b;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  x0 = c0;
  x1 = c1;
  x2 = c2;
  x3 = c3;
}

// uint32_to_uniform: fold negatives with ~x (x ^ (x >> 31)), convert, scale.
VITTLE_AVX512_INLINE V uniform(I x) {
  return mul(_mm512_cvtepi32_ps(_mm512_xor_si512(x, _mm512_srai_epi32(x, 31))), bc(kUniformScale));
}

// uniform_pair_to_normal
VITTLE_AVX512_INLINE void box_muller(V u1, V u2, V& out_cos, V& out_sin) {
  u1 = _mm512_max_ps(u1, bc(kMinUniform));  // u1 > min ? u1 : min
  const V theta = mul(bc(kTwoPi), u2);
  const V radius = _mm512_sqrt_ps(mul(bc(-2.0f), log(u1)));
  V sin_theta, cos_theta;
  sincos(theta, sin_theta, cos_theta);
  out_cos = mul(radius, cos_theta);
  out_sin = mul(radius, sin_theta);
}

// The noise of the row's elements, in order, into `normals` (which holds four floats per counter,
// the row's counter count rounded up to a multiple of 16); returns the row's first element.
VITTLE_AVX512 inline const float* row_noise(const FusedCall& call, int64_t row, float* normals) {
  const uint64_t first_k = static_cast<uint64_t>(row) * static_cast<uint64_t>(call.dim);
  const uint64_t first_counter = call.offset + first_k / kNormalsPerCounter;
  const int64_t first_lane = static_cast<int64_t>(first_k % kNormalsPerCounter);
  const int64_t n_counters = (first_lane + call.dim + kNormalsPerCounter - 1) / kNormalsPerCounter;
  for (int64_t t = 0; t < n_counters; t += kLanes) {
    I w0, w1, w2, w3;
    philox(call.seed, first_counter + static_cast<uint64_t>(t), w0, w1, w2, w3);
    V n0, n1, n2, n3;
    box_muller(uniform(w0), uniform(w1), n0, n1);
    box_muller(uniform(w2), uniform(w3), n2, n3);
    // Interleave to counter order: (n0, n1, n2, n3) of counter t, then of t + 1, ...
    const __m512d a = _mm512_castps_pd(_mm512_unpacklo_ps(n0, n1));
    const __m512d b = _mm512_castps_pd(_mm512_unpackhi_ps(n0, n1));
    const __m512d c = _mm512_castps_pd(_mm512_unpacklo_ps(n2, n3));
    const __m512d d = _mm512_castps_pd(_mm512_unpackhi_ps(n2, n3));
    // q_m holds counter 4L + m in its 128-bit block L.
    const V q0 = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    const V q1 = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    const V q2 = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    const V q3 = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    const V t0 = _mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(1, 0, 1, 0));
    const V t1 = _mm512_shuffle_f32x4(q2, q3, _MM_SHUFFLE(1, 0, 1, 0));
    const V t2 = _mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(3, 2, 3, 2));
    const V t3 = _mm512_shuffle_f32x4(q2, q3, _MM_SHUFFLE(3, 2, 3, 2));
    float* out = normals + 4 * t;
    _mm512_storeu_ps(out, _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(t2, t3, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(t2, t3, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return normals + first_lane;
}

// Loads and stores of 16 elements in the storage dtype (masked lanes: not touched).
template <typename T>
VITTLE_AVX512_INLINE V load(const T* p, Mask k) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
  }
}

template <typename T>
VITTLE_AVX512_INLINE void store(T* p, Mask k, V v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, k, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // c10's round_to_nearest_even: (u + 0x7FFF + ((u >> 16) & 1)) >> 16, NaN -> 0x7FC0.
    const I u = _mm512_castps_si512(v);
    const I bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), bci(1)), bci(0x7FFF));
    const I rounded = _mm512_mask_blend_epi32(is_nan(v), _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16), bci(0x7FC0));
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(rounded));
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    // IEEE round-to-nearest-even like c10's fp16_ieee_from_fp32_value; NaN -> sign | 0x7E00 as there.
    const I sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), bci(0x8000));
    const I converted = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const I fixed = _mm512_mask_blend_epi32(is_nan(v), converted, _mm512_or_si512(sign, bci(0x7E00)));
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(fixed));
  }
}

VITTLE_AVX512_INLINE Mask tail_mask(int64_t remaining) {
  return remaining >= kLanes ? static_cast<Mask>(0xFFFF) : static_cast<Mask>((1u << remaining) - 1u);
}

}  // namespace avx512
}  // namespace vittle_fast

#pragma GCC diagnostic pop
