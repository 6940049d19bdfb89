// CUDA kernels of the fused Vittle op and their raw-pointer launchers. No ATen here: this file
// compiles on its own (vib_sample_kl_kernels_only.cu) so ptxas reports come fast and torch-free.
//
// Layout: a block of kThreads threads covers `rows_per_block` rows with `threads_per_row` threads
// each (rows_per_block > 1 only for small D). A thread handles groups of kVec<T> consecutive
// elements (one 128-bit load/store per tensor) whose noise comes from kVec<T>/4 whole Philox
// counters, kept in registers. Rows whose layout breaks that alignment (D % kVec<T> != 0 or
// unaligned pointers) take the scalar path: one element per step, one Philox call per element.
//
// Forward: per-token KL reduced in the block (warp shuffles, then the row's warps in order).
// Backward: grid (row chunks, column tiles; grid.y capped at 65,535, blocks loop over the tiles:
// vib_sample_kl_grid.h); each thread keeps its columns fixed over the chunk's rows, so the learnable
// prior's gradient accumulates in registers; each chunk writes one partial row and a second kernel
// adds the partials in chunk order (deterministic, no float atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "vib_sample_kl_grid.h"
#include "vib_sample_kl_math.h"

namespace vittle_fast {
namespace cuda {

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 128-bit access

template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

template <typename T, int E>
struct alignas(sizeof(T) * E) Pack {
  T v[E];
};

template <typename T, int E>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[E]) {
  const Pack<T, E> pack = *reinterpret_cast<const Pack<T, E>*>(p);
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = to_f32(pack.v[e]);
}

template <typename T, int E>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[E]) {
  Pack<T, E> pack;
#pragma unroll
  for (int e = 0; e < E; ++e) pack.v[e] = from_f32<T>(in[e]);
  *reinterpret_cast<Pack<T, E>*>(p) = pack;
}

// Noise of the E elements starting at flattened index k. Vector path (E % 4 == 0, k % 4 == 0):
// E/4 whole counters. Scalar path (E == 1): the element's own counter and lane.
template <int E>
__device__ __forceinline__ void noise_f32(int64_t seed, uint64_t offset, uint64_t k, float (&eps)[E]) {
  if constexpr (E % kNormalsPerCounter == 0) {
#pragma unroll
    for (int q = 0; q < E / kNormalsPerCounter; ++q) {
      const Normal4 n = normal4(seed, offset + k / kNormalsPerCounter + q);
      eps[4 * q + 0] = n.n0;
      eps[4 * q + 1] = n.n1;
      eps[4 * q + 2] = n.n2;
      eps[4 * q + 3] = n.n3;
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) eps[e] = normal_at(seed, offset, k + e);
  }
}

struct KernelArgs {
  int64_t n_tokens;
  int64_t dim;
  OpScalars scalars;
  int64_t seed;
  uint64_t offset;
  ScalarPointers scalar_pointers;  // tensor scalars, read by every thread at kernel start
  int threads_per_row;  // power of two in [32, kThreads]
};

// The call's arguments with alpha / seed / offset read from memory where they were given as tensors.
__device__ __forceinline__ KernelArgs with_device_scalars(KernelArgs a) {
  const ScalarPointers& ptr = a.scalar_pointers;
  if (ptr.alpha != nullptr) a.scalars.alpha = *ptr.alpha;
  if (ptr.seed != nullptr) a.seed = *ptr.seed;
  if (ptr.offset != nullptr) a.offset = static_cast<uint64_t>(*ptr.offset);
  return a;
}

template <typename T>
struct ForwardPointers {
  const T* h;
  const T* stats;
  const float* prior_mu;      // null for the fixed prior
  const float* prior_logvar;
  T* z_hat;
  float* kl;
};

template <typename T>
struct BackwardPointers {
  const T* grad_z_hat;
  const float* grad_kl;
  const T* stats;
  const float* prior_mu;      // null for the fixed prior
  const float* prior_logvar;
  T* grad_h;
  T* grad_stats;
  float* partials;            // [n_chunks, 2, D] when the prior is learnable
  float* grad_prior_mu;       // [D]
  float* grad_prior_logvar;   // [D]
};

__device__ __forceinline__ PriorColumn prior_at(const float* mu, const float* logvar, int64_t j, const OpScalars& s) {
  return mu == nullptr ? fixed_prior() : learnable_prior(mu[j], logvar[j], s);
}

template <typename T, int E>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardPointers<T> p, KernelArgs args) {
  const KernelArgs a = with_device_scalars(args);
  __shared__ float warp_sums[kThreads / kWarp];
  const int tpr = a.threads_per_row;
  const int slot = threadIdx.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / tpr) + slot;
  const int64_t d = a.dim;

  float kl_sum = 0.0f;
  if (row < a.n_tokens) {
    const T* h_row = p.h + row * d;
    const T* mu_row = p.stats + row * 2 * d;
    for (int64_t j = static_cast<int64_t>(lane) * E; j < d; j += static_cast<int64_t>(tpr) * E) {
      float h[E], mu[E], logvar[E], eps[E] = {}, z[E];
      load_f32<T, E>(h_row + j, h);
      load_f32<T, E>(mu_row + j, mu);
      load_f32<T, E>(mu_row + d + j, logvar);
      if (a.scalars.sample) noise_f32<E>(a.seed, a.offset, static_cast<uint64_t>(row * d + j), eps);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const PriorColumn prior = prior_at(p.prior_mu, p.prior_logvar, j + e, a.scalars);
        const ForwardElement out = forward_element(h[e], mu[e], logvar[e], eps[e], prior, a.scalars);
        z[e] = out.z_hat;
        kl_sum += out.kl;
      }
      store_f32<T, E>(p.z_hat + row * d + j, z);
    }
  }
  // Row sum: butterfly within each warp, then the row's warps in a fixed order.
#pragma unroll
  for (int delta = kWarp / 2; delta > 0; delta /= 2) kl_sum += __shfl_xor_sync(0xffffffffu, kl_sum, delta);
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) warp_sums[warp] = kl_sum;
  __syncthreads();
  if (lane == 0 && row < a.n_tokens) {
    float total = 0.0f;
    for (int w = warp; w < warp + tpr / kWarp; ++w) total += warp_sums[w];
    p.kl[row] = total / static_cast<float>(d);
  }
}

// One column tile of the backward kernel (threads_per_row * E columns) over the block's row chunk.
template <typename T, int E>
__device__ __forceinline__ void backward_column_tile(const BackwardPointers<T>& p, const KernelArgs& a, int64_t tile,
                                                     float (&slot_partials)[2][kThreads * E]) {
  const int tpr = a.threads_per_row;
  const int rows_per_block = kThreads / tpr;
  const int slot = threadIdx.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int64_t d = a.dim;
  const int64_t j = (tile * tpr + lane) * E;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * kChunkRows;
  const int64_t row_end = min(a.n_tokens, row_begin + kChunkRows);
  const bool learnable = p.prior_mu != nullptr;

  float acc_mu[E] = {}, acc_logvar[E] = {};
  if (j < d) {
    PriorColumn prior[E];
#pragma unroll
    for (int e = 0; e < E; ++e) prior[e] = prior_at(p.prior_mu, p.prior_logvar, j + e, a.scalars);
    for (int64_t row = row_begin + slot; row < row_end; row += rows_per_block) {
      float g[E], mu[E], logvar[E], eps[E] = {}, gh[E], gmu[E], glv[E];
      load_f32<T, E>(p.grad_z_hat + row * d + j, g);
      load_f32<T, E>(p.stats + row * 2 * d + j, mu);
      load_f32<T, E>(p.stats + row * 2 * d + d + j, logvar);
      const float w = p.grad_kl[row] / static_cast<float>(d);
      if (a.scalars.sample) noise_f32<E>(a.seed, a.offset, static_cast<uint64_t>(row * d + j), eps);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const BackwardElement out = backward_element(g[e], w, mu[e], logvar[e], eps[e], prior[e], a.scalars);
        gh[e] = out.grad_h;
        gmu[e] = out.grad_mu;
        glv[e] = out.grad_logvar;
        acc_mu[e] += out.grad_prior_mu;
        acc_logvar[e] += out.grad_prior_logvar;
      }
      store_f32<T, E>(p.grad_h + row * d + j, gh);
      store_f32<T, E>(p.grad_stats + row * 2 * d + j, gmu);
      store_f32<T, E>(p.grad_stats + row * 2 * d + d + j, glv);
    }
  }
  if (!learnable) return;  // uniform across the block: safe before __syncthreads
#pragma unroll
  for (int e = 0; e < E; ++e) {
    slot_partials[0][threadIdx.x * E + e] = acc_mu[e];
    slot_partials[1][threadIdx.x * E + e] = acc_logvar[e];
  }
  __syncthreads();
  if (slot != 0 || j >= d) return;
  float* out = p.partials + static_cast<int64_t>(blockIdx.x) * 2 * d;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    float sum_mu = 0.0f, sum_logvar = 0.0f;
    for (int s = 0; s < rows_per_block; ++s) {  // slots in a fixed order
      sum_mu += slot_partials[0][(s * tpr + lane) * E + e];
      sum_logvar += slot_partials[1][(s * tpr + lane) * E + e];
    }
    out[j + e] = sum_mu;
    out[d + j + e] = sum_logvar;
  }
}

// Block (x, y) covers row chunk x and column tiles y, y + gridDim.y, ... (vib_sample_kl_grid.h).
template <typename T, int E>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardPointers<T> p, KernelArgs args) {
  const KernelArgs a = with_device_scalars(args);
  __shared__ float slot_partials[2][kThreads * E];  // cross-slot prior sums (several rows per block)
  const int64_t n_tiles = column_tiles(a.dim, a.threads_per_row, E);
  for (int64_t tile = blockIdx.y; tile < n_tiles; tile += gridDim.y) {
    backward_column_tile<T, E>(p, a, tile, slot_partials);
    if (p.prior_mu != nullptr) __syncthreads();  // the next tile rewrites slot_partials
  }
}

// Second pass: out[c] = sum over chunks (in chunk order) of partials[chunk, c], c in [0, 2D).
__global__ void __launch_bounds__(kReduceThreads) reduce_partials_kernel(const float* partials, int64_t n_chunks,
                                                                         int64_t dim, float* grad_prior_mu,
                                                                         float* grad_prior_logvar) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (col >= 2 * dim) return;
  float total = 0.0f;
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) total += partials[chunk * 2 * dim + col];
  if (col < dim) {
    grad_prior_mu[col] = total;
  } else {
    grad_prior_logvar[col - dim] = total;
  }
}

// ------------------------------------------------------------------------------------------------
// Host-side launchers (raw pointers; the caller owns allocation and the stream)
// ------------------------------------------------------------------------------------------------
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
bool use_vector_path(int64_t dim, std::initializer_list<const void*> pointers) {
  if (dim % kVec<T> != 0) return false;
  for (const void* ptr : pointers) {
    if (ptr != nullptr && !aligned16(ptr)) return false;
  }
  return true;
}

template <typename T, int E>
void launch_forward_variant(const ForwardPointers<T>& p, KernelArgs a, cudaStream_t stream) {
  a.threads_per_row = threads_per_row(a.dim, E);
  const dim3 grid(static_cast<unsigned>(forward_blocks(a.n_tokens, a.threads_per_row)));
  forward_kernel<T, E><<<grid, kThreads, 0, stream>>>(p, a);
}

template <typename T>
void launch_forward(const ForwardPointers<T>& p, const KernelArgs& a, cudaStream_t stream) {
  if (a.n_tokens == 0) return;
  if (use_vector_path<T>(a.dim, {p.h, p.stats, p.z_hat})) {
    launch_forward_variant<T, kVec<T>>(p, a, stream);
  } else {
    launch_forward_variant<T, 1>(p, a, stream);
  }
}

template <typename T, int E>
void launch_backward_variant(const BackwardPointers<T>& p, KernelArgs a, cudaStream_t stream) {
  a.threads_per_row = threads_per_row(a.dim, E);
  const BackwardGrid g = backward_grid(a.n_tokens, a.dim, a.threads_per_row, E);
  const dim3 grid(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y));
  backward_kernel<T, E><<<grid, kThreads, 0, stream>>>(p, a);
}

// p.partials must hold backward_chunks(n_tokens) * 2 * dim floats when the prior is learnable.
template <typename T>
void launch_backward(const BackwardPointers<T>& p, const KernelArgs& a, cudaStream_t stream) {
  const bool learnable = p.prior_mu != nullptr;
  if (a.n_tokens > 0) {
    if (use_vector_path<T>(a.dim, {p.grad_z_hat, p.stats, p.grad_h, p.grad_stats})) {
      launch_backward_variant<T, kVec<T>>(p, a, stream);
    } else {
      launch_backward_variant<T, 1>(p, a, stream);
    }
  }
  if (learnable) {  // N == 0 reduces zero chunks: zero gradients
    const dim3 grid(static_cast<unsigned>((2 * a.dim + kReduceThreads - 1) / kReduceThreads));
    reduce_partials_kernel<<<grid, kReduceThreads, 0, stream>>>(p.partials, backward_chunks(a.n_tokens), a.dim,
                                                                p.grad_prior_mu, p.grad_prior_logvar);
  }
}

}  // namespace cuda
}  // namespace vittle_fast
