// ATen-level entry points of the fused bottleneck op (Linear -> GELU -> Linear -> sampling/KL tail),
// shared by its operator registration (vib_bottleneck_ops.cpp) and its implementation
// (vib_bottleneck_blocks.cpp: CPU and CUDA tensors).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "vib_sample_kl.h"

namespace vittle_fast {

// One group of rows: its MLP, its prior (none: fixed N(0, I)) and its Philox counter base.
struct BottleneckGroup {
  int64_t size;      // rows of the group (consecutive entries of `order`)
  int64_t first;     // index of the group's first entry in `order`
  at::Tensor w1, b1, w2, b2;
  OptionalTensor prior_mu, prior_logvar;
  uint64_t offset;
  const int64_t* device_offset = nullptr;  // CUDA: the offset read by the kernel (offsets_t[g]) instead
};

// Scalars shared by the groups of one call.
struct BottleneckCall {
  int64_t n_rows;    // N, rows of h
  int64_t n_order;   // M, rows transformed
  int64_t dim;       // D
  OpScalars scalars;
  int64_t seed;
  bool recompute;    // save only the pre-activation; backward recomputes stats
  ScalarPointers device_scalars;  // CUDA: alpha / seed given as device tensors (CPU ones are read on the host)
};

using BottleneckForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BottleneckBackwardResult =
    std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
               std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// (out [N, D], kl [M] fp32, preact [M, D], stats [M or 0, 2D]); `order` None: every row, one group.
BottleneckForwardResult bottleneck_forward(const at::Tensor& h, const OptionalTensor& order,
                                           const std::vector<BottleneckGroup>& groups, const BottleneckCall& call);
// (grad_h, per group: grad_w1, grad_b1, grad_w2, grad_b2, grad_prior_mu, grad_prior_logvar ([0] if fixed)).
BottleneckBackwardResult bottleneck_backward(const at::Tensor& grad_out, const at::Tensor& grad_kl,
                                             const at::Tensor& h, const OptionalTensor& order,
                                             const std::vector<BottleneckGroup>& groups, const BottleneckCall& call,
                                             const at::Tensor& preact, const at::Tensor& stats);

// Exact GELU, and grad *= GELU'(x) in place (vib_bottleneck_gelu_cpu.cpp: AVX-512 on CPU, else ATen).
at::Tensor gelu_rows(const at::Tensor& x);
void gelu_rows_backward_(at::Tensor& grad, const at::Tensor& x);

}  // namespace vittle_fast
