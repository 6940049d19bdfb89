// Per-element math of the fused Vittle op, shared by the CPU and the CUDA kernels.
//
// Everything here is `__host__ __device__` so the CPU kernel (compiled by g++) runs the arithmetic
// the CUDA kernel runs; the CPU tests therefore exercise the CUDA kernel's math. The one difference
// is exp / log / sin / cos: CUDA's own functions on the device, branch-free polynomials on the host
// (host_math below, <= 1 ulp) so that g++ can vectorize the CPU loops.
// Contract: docs/DESIGN.md §2 and docs/interfaces.md §A.
//
//  * Noise is Triton's `tl.randn4x(seed, c)`: Philox4x32-10 on the counter
//    (c & 0xffffffff, c >> 32, 0, 0) with key (seed & 0xffffffff, seed >> 32), where
//    c = offset + k / 4 for the element k = i * D + j of the flattened [N, D] call, which takes
//    lane k % 4. uint32 -> uniform and Box-Muller follow Triton's `uint_to_uniform_float` and
//    `pair_uniform_to_normal` operation by operation, so the uint32 stream is bit-identical and
//    the normals differ from Triton's only by the last ulps of log/sqrt/sin/cos.
//  * All arithmetic is fp32 whatever the storage dtype.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VITTLE_HD __host__ __device__ __forceinline__
#else
#define VITTLE_HD inline
#endif

namespace vittle_fast {

// ------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11), constants as in Triton's random.py
// ------------------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
// Triton's uint_to_uniform_float scale for 32-bit inputs: the largest value with INT32_MAX * s < 1.
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;
// One Philox counter yields four normals: elements k = 4c .. 4c+3 share counter c.
constexpr int kNormalsPerCounter = 4;

struct Uint4x32 {
  uint32_t x0, x1, x2, x3;
};

struct Normal4 {
  float n0, n1, n2, n3;

  VITTLE_HD float lane(int l) const { return l == 0 ? n0 : l == 1 ? n1 : l == 2 ? n2 : n3; }
};

VITTLE_HD uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The 64-bit key is the int64 `seed` seen as two's complement, split into (low, high) words.
VITTLE_HD Uint4x32 philox4x32_10(int64_t seed, uint64_t counter) {
  uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  uint32_t k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u;
  uint32_t c3 = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t prev_c0 = c0;
    const uint32_t prev_c2 = c2;
    c0 = mul_hi_u32(kPhiloxRoundB, prev_c2) ^ c1 ^ k0;
    c2 = mul_hi_u32(kPhiloxRoundA, prev_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * prev_c2;
    c3 = kPhiloxRoundA * prev_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

// Triton's uint_to_uniform_float: bitcast to int32, fold negatives with ~x, scale in fp32.
VITTLE_HD float uint32_to_uniform(uint32_t x) {
  const int32_t signed_x = static_cast<int32_t>(x);
  return static_cast<float>(signed_x < 0 ? ~signed_x : signed_x) * kUniformScale;
}

#if !defined(__CUDA_ARCH__)
// Host versions of exp / log / sincos: branch-free Cephes-style polynomials (the classic
// sse_mathfun constants), ~1 ulp, written so that g++ vectorizes the CPU kernel's loops (calls into
// libm would keep them scalar). The device code uses CUDA's own functions instead.
namespace host_math {

inline float bits_to_float(uint32_t bits) { return __builtin_bit_cast(float, bits); }

inline uint32_t float_to_bits(float x) { return __builtin_bit_cast(uint32_t, x); }

inline float exp(float x) {
  constexpr float kMaxArg = 88.72283905206835f;  // log(FLT_MAX): above, +inf
  constexpr float kMinArg = -103.972077083991796f;  // log of the smallest denormal: below, 0
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // ln 2 = hi + lo (Cody-Waite)
  constexpr float kLn2Lo = -2.12194440e-4f;
  const float clipped = x > kMaxArg ? kMaxArg : (x < kMinArg ? kMinArg : x);
  // n = round(x log2 e) by the 1.5 * 2^23 trick: branch-free, so the loops stay vectorizable.
  constexpr float kRoundMagic = 12582912.0f;
  const float n = (clipped * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = clipped - n * kLn2Hi - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  // 2^n as two normal powers of two, so n in [-150, 128] neither overflows nor flushes early.
  const int32_t n_int = static_cast<int32_t>(n);
  const int32_t half = n_int / 2;
  const float scale_a = bits_to_float(static_cast<uint32_t>(half + 127) << 23);
  const float scale_b = bits_to_float(static_cast<uint32_t>(n_int - half + 127) << 23);
  const float y = (p * r * r + r + 1.0f) * scale_a * scale_b;
  return x != x ? x : (x > kMaxArg ? __builtin_inff() : (x < kMinArg ? 0.0f : y));
}

// Natural log for finite x > 0 (Box-Muller only feeds u in [1e-7, 1)).
inline float log(float x) {
  constexpr float kSqrtHalf = 0.707106781186547524f;
  const uint32_t bits = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  float m = bits_to_float((bits & 0x007FFFFFu) | 0x3F000000u);  // mantissa in [0.5, 1)
  const bool small = m < kSqrtHalf;  // move m into [sqrt(1/2), sqrt(2)) - 1
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float y = p * m * z + e * -2.12194440e-4f - 0.5f * z;
  return m + y + e * 0.693359375f;
}

// sin and cos of x for |x| up to ~8192 (Box-Muller's theta is in [0, 2 pi)).
inline void sincos(float x, float& out_sin, float& out_cos) {
  constexpr float kFourOverPi = 1.27323954473516f;
  constexpr float kPiOver4A = 0.78515625f;  // pi/4 = A + B + C (Cody-Waite)
  constexpr float kPiOver4B = 2.4187564849853515625e-4f;
  constexpr float kPiOver4C = 3.77489497744594108e-8f;
  const bool negative = x < 0.0f;
  const float ax = negative ? -x : x;
  const int32_t octant = (static_cast<int32_t>(ax * kFourOverPi) + 1) & ~1;  // even octant
  const float k = static_cast<float>(octant);
  const float r = ((ax - k * kPiOver4A) - k * kPiOver4B) - k * kPiOver4C;
  const float z = r * r;
  const float cos_poly =
      ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  const float sin_poly = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const bool swap = (octant & 2) != 0;
  const float s = swap ? cos_poly : sin_poly;
  const float c = swap ? sin_poly : cos_poly;
  const bool flip_sin = ((octant & 4) != 0) != negative;
  const bool flip_cos = ((octant + 2) & 4) != 0;
  out_sin = flip_sin ? -s : s;
  out_cos = flip_cos ? -c : c;
}

}  // namespace host_math
#endif

VITTLE_HD float log_f32(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return host_math::log(x);
#endif
}

VITTLE_HD float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return host_math::exp(x);
#endif
}

// Triton's pair_uniform_to_normal (Box-Muller); writes (r cos 2*pi*u2, r sin 2*pi*u2).
VITTLE_HD void uniform_pair_to_normal(float u1, float u2, float& out_cos, float& out_sin) {
  u1 = u1 > kMinUniform ? u1 : kMinUniform;
  const float theta = kTwoPi * u2;
  const float radius = sqrtf(-2.0f * log_f32(u1));  // IEEE-exact on host and device
  float sin_theta, cos_theta;
#if defined(__CUDA_ARCH__)
  sincosf(theta, &sin_theta, &cos_theta);
#else
  host_math::sincos(theta, sin_theta, cos_theta);
#endif
  out_cos = radius * cos_theta;
  out_sin = radius * sin_theta;
}

// Triton's randn4x(seed, counter).
VITTLE_HD Normal4 normal4(int64_t seed, uint64_t counter) {
  const Uint4x32 bits = philox4x32_10(seed, counter);
  Normal4 out;
  uniform_pair_to_normal(uint32_to_uniform(bits.x0), uint32_to_uniform(bits.x1), out.n0, out.n1);
  uniform_pair_to_normal(uint32_to_uniform(bits.x2), uint32_to_uniform(bits.x3), out.n2, out.n3);
  return out;
}

// Noise of flattened element k (one Philox evaluation per element: for unaligned tails only).
VITTLE_HD float normal_at(int64_t seed, uint64_t offset, uint64_t k) {
  return normal4(seed, offset + k / kNormalsPerCounter).lane(static_cast<int>(k % kNormalsPerCounter));
}

// ------------------------------------------------------------------------------------------------
// Per-element forward / backward formulas (docs/interfaces.md §A)
// ------------------------------------------------------------------------------------------------

// Scalars that are the same for every element of a call.
struct OpScalars {
  float alpha;           // interpolation weight a
  float clamp_lo;        // log-variance clamp (-inf / +inf when disabled)
  float clamp_hi;
  float kl_logvar_coef;  // c: 1 for Eq. 8, 0.5 for the released code's KL (c * (lv_p - lv))
  bool sample;           // false: posterior mean, no noise
};

// Device pointers of the scalars given as 0-dim CUDA tensors (null: the call's value is used). The
// CUDA kernels read them from memory, so a captured CUDA graph takes new values on replay; tensors
// on the CPU are read on the host instead.
struct ScalarPointers {
  const float* alpha = nullptr;
  const int64_t* seed = nullptr;     // the 64-bit key as int64
  const int64_t* offset = nullptr;
};

// The prior of one column j: fixed N(0, 1) or learnable N(mu_p, exp(clamp(lv_p))).
struct PriorColumn {
  float mu;
  float logvar;          // already clamped
  float inv_var;         // exp(-logvar)
};

// Clamp that propagates NaN like torch.clamp (fminf/fmaxf would swallow it).
VITTLE_HD float clamp_f32(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

VITTLE_HD PriorColumn fixed_prior() { return {0.0f, 0.0f, 1.0f}; }

VITTLE_HD PriorColumn learnable_prior(float mu, float logvar, const OpScalars& s) {
  const float logvar_c = clamp_f32(logvar, s.clamp_lo, s.clamp_hi);
  return {mu, logvar_c, exp_f32(-logvar_c)};
}

struct ForwardElement {
  float z_hat;
  float kl;  // kl_ij, before the mean over j
};

VITTLE_HD ForwardElement forward_element(float h, float mu, float logvar, float eps,
                                         const PriorColumn& prior, const OpScalars& s) {
  const float logvar_c = clamp_f32(logvar, s.clamp_lo, s.clamp_hi);
  const float std_dev = exp_f32(0.5f * logvar_c);
  const float var = std_dev * std_dev;
  const float z_tilde = s.sample ? mu + std_dev * eps : mu;
  const float diff = mu - prior.mu;
  ForwardElement out;
  out.z_hat = (1.0f - s.alpha) * h + s.alpha * z_tilde;
  out.kl = 0.5f * (s.kl_logvar_coef * (prior.logvar - logvar_c) + (var + diff * diff) * prior.inv_var - 1.0f);
  return out;
}

struct BackwardElement {
  float grad_h;
  float grad_mu;
  float grad_logvar;
  float grad_prior_mu;      // this element's term of sum_i
  float grad_prior_logvar;  // this element's term of sum_i
};

// g = grad_z_hat[i, j]; w = grad_kl[i] / D. The clamp is straight-through (d/dlv := d/dlv~).
VITTLE_HD BackwardElement backward_element(float g, float w, float mu, float logvar, float eps,
                                           const PriorColumn& prior, const OpScalars& s) {
  const float logvar_c = clamp_f32(logvar, s.clamp_lo, s.clamp_hi);
  const float std_dev = exp_f32(0.5f * logvar_c);
  const float var = std_dev * std_dev;
  const float diff_scaled = (mu - prior.mu) * prior.inv_var;
  const float ag = s.alpha * g;
  BackwardElement out;
  out.grad_h = (1.0f - s.alpha) * g;
  out.grad_mu = ag + w * diff_scaled;
  const float sample_term = s.sample ? ag * eps * std_dev * 0.5f : 0.0f;
  out.grad_logvar = sample_term + w * 0.5f * (var * prior.inv_var - s.kl_logvar_coef);
  out.grad_prior_mu = -w * diff_scaled;
  out.grad_prior_logvar = w * 0.5f * (s.kl_logvar_coef - (var + (mu - prior.mu) * (mu - prior.mu)) * prior.inv_var);
  return out;
}

}  // namespace vittle_fast
