// AVX-512 building blocks of the CPU kernel (x86-64 with AVX-512 F/BW/DQ/VL, picked at run time by
// vib_sample_kl_cpu.cpp, whose avx512 row loops use them).
//
// The portable row loops leave g++ to vectorize the shared header's scalar code; it does, but
// spends ~3 ns per element (register spills, widened 64-bit Philox multiplies, masked
// if-conversion). These restate the same computation with intrinsics, 16 lanes at a time,
// operation for operation in the same order and without FMA, so the two paths return bitwise the
// same results (tests/test_cpp_build.py checks it) and the uint32 Philox stream stays Triton's.
// Every primitive works on K independent groups of 16 lanes in lockstep (F<K>, I<K>, M<K>): it
// issues each instruction for all K groups before the next, so the core overlaps K dependency
// chains (one Box-Muller chain is ~200 cycles of latency; the loop body is too long for the
// out-of-order window to overlap consecutive iterations by itself).
//  * Philox4x32-10 on 16 counters per group, 32x32->64 multiplies on even and odd lanes;
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

constexpr int64_t kLanes = 16;

template <int K>
struct F {  // K x 16 fp32 lanes
  __m512 v[K];
};
template <int K>
struct I {  // K x 16 int32 lanes
  __m512i v[K];
};
template <int K>
struct M {  // K x 16 lane masks
  __mmask16 v[K];
};

#define VITTLE_EACH _Pragma("GCC unroll 8") for (int u = 0; u < K; ++u)

template <int K>
VITTLE_AVX512_INLINE F<K> splat(float x) {
  F<K> r;
  VITTLE_EACH r.v[u] = _mm512_set1_ps(x);
  return r;
}
template <int K>
VITTLE_AVX512_INLINE I<K> splat_i(int32_t x) {
  I<K> r;
  VITTLE_EACH r.v[u] = _mm512_set1_epi32(x);
  return r;
}

// Lane-wise binary operations, each also with a broadcast scalar on either side.
#define VITTLE_BINARY(T, S, SPLAT, name, intrinsic)                                                         \
  template <int K>                                                                                         \
  VITTLE_AVX512_INLINE T<K> name(T<K> a, T<K> b) {                                                         \
    T<K> r;                                                                                                \
    VITTLE_EACH r.v[u] = intrinsic(a.v[u], b.v[u]);                                                        \
    return r;                                                                                              \
  }                                                                                                        \
  template <int K>                                                                                         \
  VITTLE_AVX512_INLINE T<K> name(T<K> a, S b) { return name(a, SPLAT<K>(b)); }                             \
  template <int K>                                                                                         \
  VITTLE_AVX512_INLINE T<K> name(S a, T<K> b) { return name(SPLAT<K>(a), b); }

VITTLE_BINARY(F, float, splat, add, _mm512_add_ps)
VITTLE_BINARY(F, float, splat, sub, _mm512_sub_ps)
VITTLE_BINARY(F, float, splat, mul, _mm512_mul_ps)
VITTLE_BINARY(F, float, splat, max, _mm512_max_ps)  // a > b ? a : b
VITTLE_BINARY(I, int32_t, splat_i, add_i, _mm512_add_epi32)
VITTLE_BINARY(I, int32_t, splat_i, sub_i, _mm512_sub_epi32)
VITTLE_BINARY(I, int32_t, splat_i, and_i, _mm512_and_si512)
VITTLE_BINARY(I, int32_t, splat_i, or_i, _mm512_or_si512)
VITTLE_BINARY(I, int32_t, splat_i, xor_i, _mm512_xor_si512)
#undef VITTLE_BINARY

#define VITTLE_COMPARE(name, predicate)                                                                    \
  template <int K>                                                                                         \
  VITTLE_AVX512_INLINE M<K> name(F<K> a, F<K> b) {                                                         \
    M<K> r;                                                                                                \
    VITTLE_EACH r.v[u] = _mm512_cmp_ps_mask(a.v[u], b.v[u], predicate);                                    \
    return r;                                                                                              \
  }                                                                                                        \
  template <int K>                                                                                         \
  VITTLE_AVX512_INLINE M<K> name(F<K> a, float b) { return name(a, splat<K>(b)); }

VITTLE_COMPARE(lt, _CMP_LT_OQ)
VITTLE_COMPARE(gt, _CMP_GT_OQ)
#undef VITTLE_COMPARE

template <int K>
VITTLE_AVX512_INLINE M<K> is_nan(F<K> a) {
  M<K> r;
  VITTLE_EACH r.v[u] = _mm512_cmp_ps_mask(a.v[u], a.v[u], _CMP_UNORD_Q);
  return r;
}

template <int K>
VITTLE_AVX512_INLINE M<K> mask_xor(M<K> a, M<K> b) {
  M<K> r;
  VITTLE_EACH r.v[u] = a.v[u] ^ b.v[u];
  return r;
}

// k ? b : a, lane-wise
template <int K>
VITTLE_AVX512_INLINE F<K> select(M<K> k, F<K> b, F<K> a) {
  F<K> r;
  VITTLE_EACH r.v[u] = _mm512_mask_blend_ps(k.v[u], a.v[u], b.v[u]);
  return r;
}
template <int K>
VITTLE_AVX512_INLINE F<K> select(M<K> k, float b, F<K> a) { return select(k, splat<K>(b), a); }

template <int K>
VITTLE_AVX512_INLINE F<K> negate_where(M<K> k, F<K> a) {
  F<K> r;
  VITTLE_EACH r.v[u] = _mm512_mask_xor_ps(a.v[u], k.v[u], a.v[u], _mm512_castsi512_ps(_mm512_set1_epi32(INT32_MIN)));
  return r;
}

// Lane-wise unary operations.
#define VITTLE_UNARY(Out, In, name, intrinsic)                                                             \
  template <int K>                                                                                         \
  VITTLE_AVX512_INLINE Out<K> name(In<K> a) {                                                              \
    Out<K> r;                                                                                              \
    VITTLE_EACH r.v[u] = intrinsic(a.v[u]);                                                                \
    return r;                                                                                              \
  }

VITTLE_UNARY(F, F, sqrt, _mm512_sqrt_ps)
VITTLE_UNARY(F, I, to_float, _mm512_cvtepi32_ps)    // int32 -> fp32, round to nearest
VITTLE_UNARY(I, F, truncate, _mm512_cvttps_epi32)   // fp32 -> int32 toward zero, like static_cast
VITTLE_UNARY(I, F, bits, _mm512_castps_si512)
VITTLE_UNARY(F, I, from_bits, _mm512_castsi512_ps)
#undef VITTLE_UNARY

#define VITTLE_SHIFT(name, intrinsic)                                                                      \
  template <int kShift, int K>                                                                             \
  VITTLE_AVX512_INLINE I<K> name(I<K> a) {                                                                 \
    I<K> r;                                                                                                \
    VITTLE_EACH r.v[u] = intrinsic(a.v[u], kShift);                                                        \
    return r;                                                                                              \
  }

VITTLE_SHIFT(shift_right, _mm512_srli_epi32)  // logical
VITTLE_SHIFT(shift_right_arithmetic, _mm512_srai_epi32)
VITTLE_SHIFT(shift_left, _mm512_slli_epi32)
#undef VITTLE_SHIFT

template <int K>
VITTLE_AVX512_INLINE M<K> test_bits(I<K> a, int32_t bits_to_test) {  // (a & bits) != 0
  M<K> r;
  VITTLE_EACH r.v[u] = _mm512_test_epi32_mask(a.v[u], _mm512_set1_epi32(bits_to_test));
  return r;
}

// clamp_f32: x < lo ? lo : (x > hi ? hi : x), NaN passes through.
template <int K>
VITTLE_AVX512_INLINE F<K> clamp(F<K> x, float lo, float hi) {
  return select(lt(x, lo), lo, select(gt(x, hi), hi, x));
}

// host_math::exp
template <int K>
VITTLE_AVX512_INLINE F<K> exp(F<K> x) {
  constexpr float kMaxArg = 88.72283905206835f;
  constexpr float kMinArg = -103.972077083991796f;
  constexpr float kRoundMagic = 12582912.0f;
  const M<K> over = gt(x, kMaxArg);
  const M<K> under = lt(x, kMinArg);
  const F<K> clipped = select(over, kMaxArg, select(under, kMinArg, x));
  const F<K> n = sub(add(mul(clipped, 1.44269504088896341f), kRoundMagic), kRoundMagic);
  const F<K> r = sub(sub(clipped, mul(n, 0.693359375f)), mul(n, -2.12194440e-4f));
  F<K> p = splat<K>(1.9875691500e-4f);
  p = add(mul(p, r), 1.3981999507e-3f);
  p = add(mul(p, r), 8.3334519073e-3f);
  p = add(mul(p, r), 4.1665795894e-2f);
  p = add(mul(p, r), 1.6666665459e-1f);
  p = add(mul(p, r), 5.0000001201e-1f);
  const I<K> n_int = truncate(n);
  const I<K> half = shift_right_arithmetic<1>(add_i(n_int, shift_right<31>(n_int)));  // C++ n / 2
  const F<K> scale_a = from_bits(shift_left<23>(add_i(half, 127)));
  const F<K> scale_b = from_bits(shift_left<23>(add_i(sub_i(n_int, half), 127)));
  const F<K> y = mul(mul(add(add(mul(mul(p, r), r), r), 1.0f), scale_a), scale_b);
  return select(is_nan(x), x, select(over, __builtin_inff(), select(under, 0.0f, y)));
}

// host_math::log (finite x > 0)
template <int K>
VITTLE_AVX512_INLINE F<K> log(F<K> x) {
  const I<K> x_bits = bits(x);
  F<K> e = to_float(sub_i(shift_right<23>(x_bits), 126));
  F<K> m = from_bits(or_i(and_i(x_bits, 0x007FFFFF), 0x3F000000));
  const M<K> small = lt(m, 0.707106781186547524f);
  e = select(small, sub(e, 1.0f), e);
  m = select(small, sub(add(m, m), 1.0f), sub(m, 1.0f));
  const F<K> z = mul(m, m);
  F<K> p = splat<K>(7.0376836292e-2f);
  p = sub(mul(p, m), 1.1514610310e-1f);
  p = add(mul(p, m), 1.1676998740e-1f);
  p = sub(mul(p, m), 1.2420140846e-1f);
  p = add(mul(p, m), 1.4249322787e-1f);
  p = sub(mul(p, m), 1.6668057665e-1f);
  p = add(mul(p, m), 2.0000714765e-1f);
  p = sub(mul(p, m), 2.4999993993e-1f);
  p = add(mul(p, m), 3.3333331174e-1f);
  const F<K> y = sub(add(mul(mul(p, m), z), mul(e, -2.12194440e-4f)), mul(0.5f, z));
  return add(add(m, y), mul(e, 0.693359375f));
}

// host_math::sincos
template <int K>
VITTLE_AVX512_INLINE void sincos(F<K> x, F<K>& out_sin, F<K>& out_cos) {
  const M<K> negative = lt(x, 0.0f);
  const F<K> ax = negate_where(negative, x);
  const I<K> octant = and_i(add_i(truncate(mul(ax, 1.27323954473516f)), 1), ~1);
  const F<K> k = to_float(octant);
  const F<K> r = sub(sub(sub(ax, mul(k, 0.78515625f)), mul(k, 2.4187564849853515625e-4f)),
                     mul(k, 3.77489497744594108e-8f));
  const F<K> z = mul(r, r);
  const F<K> cos_poly = add(
      sub(mul(mul(add(mul(sub(mul(2.443315711809948e-5f, z), 1.388731625493765e-3f), z), 4.166664568298827e-2f), z),
              z),
          mul(0.5f, z)),
      1.0f);
  const F<K> sin_poly =
      add(mul(mul(sub(mul(add(mul(-1.9515295891e-4f, z), 8.3321608736e-3f), z), 1.6666654611e-1f), z), r), r);
  const M<K> swap = test_bits(octant, 2);
  const F<K> s = select(swap, cos_poly, sin_poly);
  const F<K> c = select(swap, sin_poly, cos_poly);
  out_sin = negate_where(mask_xor(test_bits(octant, 4), negative), s);
  out_cos = negate_where(test_bits(add_i(octant, 2), 4), c);
}

// hi and lo words of a * multiplier, 16 uint32 lanes per group.
template <int K>
VITTLE_AVX512_INLINE void mul_hilo(I<K> a, uint32_t multiplier, I<K>& hi, I<K>& lo) {
  const __m512i m = _mm512_set1_epi32(static_cast<int32_t>(multiplier));
  VITTLE_EACH {
    const __m512i even = _mm512_mul_epu32(a.v[u], m);                       // lanes 0, 2, ..: 64-bit products
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v[u], 32), m);  // lanes 1, 3, ..
    hi.v[u] = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    lo.v[u] = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  }
}

template <int K>
VITTLE_AVX512_INLINE I<K> xor3(I<K> a, I<K> b, uint32_t c) {
  I<K> r;
  VITTLE_EACH r.v[u] = _mm512_ternarylogic_epi32(a.v[u], b.v[u], _mm512_set1_epi32(static_cast<int32_t>(c)), 0x96);
  return r;
}

// philox4x32_10 on the 16 * K counters first_counter + 0 .. 16 K - 1 (group u: + 16 u).
template <int K>
VITTLE_AVX512_INLINE void philox(int64_t seed, uint64_t first_counter, I<K>& x0, I<K>& x1, I<K>& x2, I<K>& x3) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  I<K> c0, c1, c2, c3;
  VITTLE_EACH {
    const uint64_t base = first_counter + static_cast<uint64_t>(kLanes * u);
    const __m512i base_lo = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(base)));
    const __m512i base_hi = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(base >> 32)));
    c0.v[u] = _mm512_add_epi32(base_lo, iota);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0.v[u], base_lo);
    c1.v[u] = _mm512_mask_add_epi32(base_hi, carry, base_hi, _mm512_set1_epi32(1));
    c2.v[u] = _mm512_setzero_si512();
    c3.v[u] = _mm512_setzero_si512();
  }
  uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  uint32_t k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
#pragma GCC unroll 10
  for (int round = 0; round < kPhiloxRounds; ++round) {
    I<K> hi_b, lo_b, hi_a, lo_a;
    mul_hilo(c2, kPhiloxRoundB, hi_b, lo_b);
    mul_hilo(c0, kPhiloxRoundA, hi_a, lo_a);
    c0 = xor3(hi_b, c1, k0);
    c2 = xor3(hi_a, c3, k1);
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
template <int K>
VITTLE_AVX512_INLINE F<K> uniform(I<K> x) {
  return mul(to_float(xor_i(x, shift_right_arithmetic<31>(x))), kUniformScale);
}

// uniform_pair_to_normal
template <int K>
VITTLE_AVX512_INLINE void box_muller(F<K> u1, F<K> u2, F<K>& out_cos, F<K>& out_sin) {
  u1 = max(u1, kMinUniform);  // u1 > min ? u1 : min
  const F<K> theta = mul(kTwoPi, u2);
  const F<K> radius = sqrt(mul(-2.0f, log(u1)));
  F<K> sin_theta, cos_theta;
  sincos(theta, sin_theta, cos_theta);
  out_cos = mul(radius, cos_theta);
  out_sin = mul(radius, sin_theta);
}

template <int K>
VITTLE_AVX512_INLINE F<2 * K> join(F<K> a, F<K> b) {
  F<2 * K> r;
  VITTLE_EACH {
    r.v[u] = a.v[u];
    r.v[K + u] = b.v[u];
  }
  return r;
}

// Counter groups of 16 per row_noise step (Box-Muller then runs on twice as many groups of pairs).
constexpr int kNoiseGroups = 2;
constexpr int64_t kCountersPerStep = kNoiseGroups * kLanes;

// The noise of the row's elements, in order, into `normals` (which holds four floats per counter,
// the row's counter count rounded up to a multiple of kCountersPerStep); returns the row's first element.
VITTLE_AVX512 inline const float* row_noise(const FusedCall& call, int64_t row, float* normals) {
  const uint64_t first_k = static_cast<uint64_t>(row) * static_cast<uint64_t>(call.dim);
  const uint64_t first_counter = call.offset + first_k / kNormalsPerCounter;
  const int64_t first_lane = static_cast<int64_t>(first_k % kNormalsPerCounter);
  const int64_t n_counters = (first_lane + call.dim + kNormalsPerCounter - 1) / kNormalsPerCounter;
  for (int64_t t = 0; t < n_counters; t += kCountersPerStep) {
    I<kNoiseGroups> w0, w1, w2, w3;
    philox<kNoiseGroups>(call.seed, first_counter + static_cast<uint64_t>(t), w0, w1, w2, w3);
    // Pairs (w0, w1) and (w2, w3) of every counter group as the groups of one Box-Muller.
    const F<2 * kNoiseGroups> u1 = join(uniform(w0), uniform(w2));
    const F<2 * kNoiseGroups> u2 = join(uniform(w1), uniform(w3));
    // group g < kNoiseGroups: normals 0 and 1 of counter group g; g >= kNoiseGroups: normals 2 and 3
    F<2 * kNoiseGroups> cosines, sines;
    box_muller(u1, u2, cosines, sines);
    for (int g = 0; g < kNoiseGroups; ++g) {
      const __m512 n0 = cosines.v[g], n1 = sines.v[g];
      const __m512 n2 = cosines.v[kNoiseGroups + g], n3 = sines.v[kNoiseGroups + g];
      // Interleave to counter order: (n0, n1, n2, n3) of counter t, then of t + 1, ...
      const __m512d a = _mm512_castps_pd(_mm512_unpacklo_ps(n0, n1));
      const __m512d b = _mm512_castps_pd(_mm512_unpackhi_ps(n0, n1));
      const __m512d c = _mm512_castps_pd(_mm512_unpacklo_ps(n2, n3));
      const __m512d d = _mm512_castps_pd(_mm512_unpackhi_ps(n2, n3));
      // q_m holds counter 4L + m in its 128-bit block L.
      const __m512 q0 = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
      const __m512 q1 = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
      const __m512 q2 = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
      const __m512 q3 = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
      const __m512 t0 = _mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(1, 0, 1, 0));
      const __m512 t1 = _mm512_shuffle_f32x4(q2, q3, _MM_SHUFFLE(1, 0, 1, 0));
      const __m512 t2 = _mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(3, 2, 3, 2));
      const __m512 t3 = _mm512_shuffle_f32x4(q2, q3, _MM_SHUFFLE(3, 2, 3, 2));
      float* out = normals + 4 * (t + kLanes * g);
      _mm512_storeu_ps(out, _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0)));
      _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1)));
      _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(t2, t3, _MM_SHUFFLE(2, 0, 2, 0)));
      _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(t2, t3, _MM_SHUFFLE(3, 1, 3, 1)));
    }
  }
  return normals + first_lane;
}

// Masks of K groups of 16 elements starting `remaining` elements before the end of a row.
template <int K>
VITTLE_AVX512_INLINE M<K> tail_masks(int64_t remaining) {
  M<K> r;
  VITTLE_EACH {
    const int64_t left = remaining - kLanes * u;
    r.v[u] = left >= kLanes ? static_cast<__mmask16>(0xFFFF)
                            : (left <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << left) - 1u));
  }
  return r;
}

// Loads and stores of K x 16 consecutive elements in the storage dtype (masked lanes: not touched).
template <typename T, int K>
VITTLE_AVX512_INLINE F<K> load(const T* p, M<K> k) {
  F<K> r;
  VITTLE_EACH {
    const T* q = p + kLanes * u;
    if constexpr (std::is_same_v<T, float>) {
      r.v[u] = _mm512_maskz_loadu_ps(k.v[u], q);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      r.v[u] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k.v[u], q)), 16));
    } else {
      static_assert(std::is_same_v<T, c10::Half>);
      r.v[u] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k.v[u], q));
    }
  }
  return r;
}

template <typename T, int K>
VITTLE_AVX512_INLINE void store(T* p, M<K> k, F<K> x) {
  VITTLE_EACH {
    T* q = p + kLanes * u;
    const __m512 v = x.v[u];
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    if constexpr (std::is_same_v<T, float>) {
      _mm512_mask_storeu_ps(q, k.v[u], v);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // c10's round_to_nearest_even: (u + 0x7FFF + ((u >> 16) & 1)) >> 16, NaN -> 0x7FC0.
      const __m512i w = _mm512_castps_si512(v);
      const __m512i bias =
          _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(w, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
      const __m512i rounded =
          _mm512_mask_blend_epi32(nan, _mm512_srli_epi32(_mm512_add_epi32(w, bias), 16), _mm512_set1_epi32(0x7FC0));
      _mm256_mask_storeu_epi16(q, k.v[u], _mm512_cvtepi32_epi16(rounded));
    } else {
      static_assert(std::is_same_v<T, c10::Half>);
      // IEEE round-to-nearest-even like c10's fp16_ieee_from_fp32_value; NaN -> sign | 0x7E00 as there.
      const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x8000));
      const __m512i converted = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m512i fixed = _mm512_mask_blend_epi32(nan, converted, _mm512_or_si512(sign, _mm512_set1_epi32(0x7E00)));
      _mm256_mask_storeu_epi16(q, k.v[u], _mm512_cvtepi32_epi16(fixed));
    }
  }
}

#undef VITTLE_EACH

}  // namespace avx512
}  // namespace vittle_fast

#pragma GCC diagnostic pop
