// The fused bottleneck on CPU and CUDA tensors: the GEMMs through ATen (BLAS / cuBLAS), GELU and the
// sampling/KL tail of the tensor's device (the vib_sample_kl CPU or CUDA kernel), rows in blocks.
//
// For each block of a group's rows: gather h's rows, GEMM1 with the bias (addmm), GELU, GEMM2 with
// the bias into the block's stats, then the sampling/KL tail while the block is still in cache, which
// writes z_hat to the block's rows of the output (CPU: in place through `order`; CUDA: a scatter).
// `stats` never exists for all rows at once unless it is saved for backward (recompute = false).
//
// Backward, block by block in the same order: stats (saved or recomputed), the tail's backward
// (dstats; on CPU it reads grad_out's rows through `order`, no gather), then the weight gradients
// summed over blocks in a fixed order (fp32 from the second block on), GELU's backward and the dgrad
// GEMMs, dh = (1 - alpha) dz + dA w1 scattered to the block's rows. Blocks hold a multiple of 4 rows,
// so every block starts on a Philox counter boundary: its noise is the tail's noise with
// offset + first_row * D / 4 (the contract's stream, docs/DESIGN.md §2).
//
// CPU: 4096-row blocks (below). CUDA: one block per group -- a GPU's GEMMs want every row at once,
// and a group's noise offset may be a device tensor (CUDA-graph safe), to which no block shift can be
// added on the host. Nothing here synchronises with the device.
#include "vib_bottleneck.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

namespace vittle_fast {
namespace {

// Rows per block. The elementwise tail would like a cache-sized block, but on CPUs the GEMMs need
// tall blocks: measured here (2 cores, N = 4096, D = 1024, fwd+bwd vs the unfused module path,
// interleaved medians), 512-row blocks took 1.6x (fp32) / 3.0x (bf16) the module's time, 2048 rows
// 1.3x, one 4096-row block 1.04x / 1.2x. So: 4096 rows, a multiple of 4 (see above); stats then
// exists for at most 4096 rows at a time in a recompute forward.
constexpr int64_t kBlockRows = 4096;

int64_t block_rows(const at::Tensor& h) { return h.is_cuda() ? std::numeric_limits<int64_t>::max() : kBlockRows; }

// One block: rows [first, first + size) of `order` (or of h when `order` is None), all in one group.
struct Block {
  const BottleneckGroup& group;
  int64_t first;   // index into order / preact / stats / kl
  int64_t size;
  int64_t start;   // row of the block within its group

  FusedCall tail_call(const BottleneckCall& call) const {
    const uint64_t counter_shift = static_cast<uint64_t>(start) * static_cast<uint64_t>(call.dim) / 4;
    ScalarPointers pointers = call.device_scalars;
    pointers.offset = group.device_offset;  // set only on CUDA, where a group is one block (start = 0)
    return {size, call.dim, call.scalars, call.seed, group.offset + counter_shift, group.prior_mu.has_value(),
            pointers};
  }
};

template <typename Fn>
void for_each_block(const std::vector<BottleneckGroup>& groups, const at::Tensor& h, Fn&& fn) {
  const int64_t rows = block_rows(h);
  for (const BottleneckGroup& group : groups) {
    for (int64_t start = 0; start < group.size; start += rows) {
      fn(Block{group, group.first + start, std::min(rows, group.size - start), start});
    }
  }
}

// The block's rows of `x` ([N, D]) as a contiguous [size, D] tensor.
at::Tensor gather(const at::Tensor& x, const OptionalTensor& order, const Block& block) {
  if (!order.has_value()) return x.narrow(0, block.first, block.size);
  return x.index_select(0, order->narrow(0, block.first, block.size));
}

void scatter(at::Tensor& out, const OptionalTensor& order, const Block& block, const at::Tensor& rows) {
  if (order.has_value()) {
    out.index_copy_(0, order->narrow(0, block.first, block.size), rows);
  } else {
    out.narrow(0, block.first, block.size).copy_(rows);
  }
}

// Output rows not listed in `order` keep the input's value; when every row is listed, nothing to copy.
at::Tensor output_like(const at::Tensor& source, const OptionalTensor& order, const BottleneckCall& call) {
  return order.has_value() && call.n_order < call.n_rows ? source.clone() : at::empty_like(source);
}

// Per-group sum over blocks, in block order: the first block's term is kept as it is (a one-block
// group: no zero fill, no dtype round trip); from the second block on, the sum is fp32.
void accumulate(at::Tensor& sum, at::Tensor term) {
  if (!sum.defined()) {
    sum = std::move(term);
    return;
  }
  if (sum.scalar_type() != at::kFloat) sum = sum.to(at::kFloat);
  sum.add_(term);
}

// The gradient in the parameters' dtype; zeros for a group without rows.
at::Tensor finish(const at::Tensor& sum, at::IntArrayRef shape, const at::Tensor& like) {
  return sum.defined() ? sum.to(like.scalar_type()) : at::zeros(shape, like.options());
}

// stats of the block into `stats_rows` ([size, 2D]): GEMM2 with the bias, from the GELU activations.
void second_linear(const at::Tensor& gelu, const BottleneckGroup& group, at::Tensor& stats_rows) {
  at::addmm_out(stats_rows, group.b2, gelu, group.w2.t());
}

// The block's rows of `order` as a CPU row map (order None: the block's rows are h's rows
// [first, first + size), which the caller passes as a narrowed tensor).
RowMap block_rows_map(const OptionalTensor& order, const Block& block) {
  return {order.has_value() ? order->const_data_ptr<int64_t>() + block.first : nullptr};
}

// The sampling/KL tail of the block: z_hat into its rows of `out`, its KL into `kl`'s block slice.
// CPU: written in place through the row map; CUDA: the kernel's outputs, then copied / scattered.
void tail_forward(const at::Tensor& h_rows, const at::Tensor& stats_rows, const Block& block,
                  const BottleneckCall& call, const OptionalTensor& order, at::Tensor& out, at::Tensor& kl) {
  const FusedCall tail = block.tail_call(call);
  at::Tensor kl_rows = kl.narrow(0, block.first, block.size);
#ifdef VITTLE_FAST_WITH_CUDA
  if (h_rows.is_cuda()) {
    auto [z_hat, kl_block] =
        forward_cuda(h_rows, stats_rows, block.group.prior_mu, block.group.prior_logvar, tail);
    kl_rows.copy_(kl_block);
    scatter(out, order, block, z_hat);
    return;
  }
#endif
  const at::Tensor z_out = order.has_value() ? out : out.narrow(0, block.first, block.size);
  forward_cpu(h_rows, stats_rows, block.group.prior_mu, block.group.prior_logvar, tail,
              CpuForwardInto{z_out, block_rows_map(order, block), kl_rows});
}

// The tail's backward for the block, reading its rows of grad_out (CPU: in place through the row map).
BackwardResult tail_backward(const at::Tensor& grad_out, const OptionalTensor& order, const at::Tensor& grad_kl_rows,
                             const at::Tensor& stats_rows, const Block& block, const BottleneckCall& call) {
  const FusedCall tail = block.tail_call(call);
#ifdef VITTLE_FAST_WITH_CUDA
  if (stats_rows.is_cuda()) {
    return backward_cuda(gather(grad_out, order, block), grad_kl_rows, stats_rows, block.group.prior_mu,
                         block.group.prior_logvar, tail);
  }
#endif
  const at::Tensor grad_rows = order.has_value() ? grad_out : grad_out.narrow(0, block.first, block.size);
  return backward_cpu(grad_rows, grad_kl_rows, stats_rows, block.group.prior_mu, block.group.prior_logvar, tail,
                      block_rows_map(order, block));
}

// `order` as the row maps read it (contiguous).
OptionalTensor contiguous_order(const OptionalTensor& order) {
  return order.has_value() ? OptionalTensor(order->contiguous()) : std::nullopt;
}

}  // namespace

BottleneckForwardResult bottleneck_forward(const at::Tensor& h, const OptionalTensor& order_arg,
                                           const std::vector<BottleneckGroup>& groups, const BottleneckCall& call) {
  const OptionalTensor order = contiguous_order(order_arg);
  const int64_t m = call.n_order;
  const int64_t d = call.dim;
  at::Tensor out = output_like(h, order, call);
  at::Tensor kl = at::empty({m}, h.options().dtype(at::kFloat));
  at::Tensor preact = at::empty({m, d}, h.options());
  at::Tensor stats = at::empty({call.recompute ? 0 : m, 2 * d}, h.options());
  at::Tensor scratch = call.recompute ? at::empty({std::min(m, block_rows(h)), 2 * d}, h.options()) : at::Tensor();
  for_each_block(groups, h, [&](const Block& block) {
    const at::Tensor h_rows = gather(h, order, block);
    at::Tensor preact_rows = preact.narrow(0, block.first, block.size);
    at::addmm_out(preact_rows, block.group.b1, h_rows, block.group.w1.t());
    at::Tensor stats_rows = call.recompute ? scratch.narrow(0, 0, block.size) : stats.narrow(0, block.first, block.size);
    second_linear(gelu_rows(preact_rows), block.group, stats_rows);
    tail_forward(h_rows, stats_rows, block, call, order, out, kl);
  });
  return {out, kl, preact, stats};
}

BottleneckBackwardResult bottleneck_backward(const at::Tensor& grad_out, const at::Tensor& grad_kl,
                                             const at::Tensor& h, const OptionalTensor& order_arg,
                                             const std::vector<BottleneckGroup>& groups, const BottleneckCall& call,
                                             const at::Tensor& preact, const at::Tensor& stats) {
  const OptionalTensor order = contiguous_order(order_arg);
  const int64_t d = call.dim;
  const auto fp32 = h.options().dtype(at::kFloat);
  at::Tensor grad_h = output_like(grad_out, order, call);
  // Per-group sums over blocks (accumulate), prior gradients in fp32.
  const size_t n_groups = groups.size();
  std::vector<at::Tensor> gw1(n_groups), gb1(n_groups), gw2(n_groups), gb2(n_groups), gmu, glv;
  for (const BottleneckGroup& group : groups) {
    const int64_t prior_size = group.prior_mu.has_value() ? d : 0;
    gmu.push_back(at::zeros({prior_size}, fp32));
    glv.push_back(at::zeros({prior_size}, fp32));
  }
  at::Tensor scratch =
      call.recompute ? at::empty({std::min(call.n_order, block_rows(h)), 2 * d}, h.options()) : at::Tensor();
  for_each_block(groups, h, [&](const Block& block) {
    const size_t g = static_cast<size_t>(&block.group - groups.data());
    const at::Tensor preact_rows = preact.narrow(0, block.first, block.size);
    const at::Tensor gelu = gelu_rows(preact_rows);
    at::Tensor stats_rows;
    if (call.recompute) {
      stats_rows = scratch.narrow(0, 0, block.size);
      second_linear(gelu, block.group, stats_rows);
    } else {
      stats_rows = stats.narrow(0, block.first, block.size);
    }
    auto [grad_h_rows, grad_stats, grad_mu_p, grad_lv_p] =
        tail_backward(grad_out, order, grad_kl.narrow(0, block.first, block.size), stats_rows, block, call);
    if (block.group.prior_mu.has_value()) {
      gmu[g].add_(grad_mu_p);
      glv[g].add_(grad_lv_p);
    }
    accumulate(gw2[g], at::mm(grad_stats.t(), gelu));
    accumulate(gb2[g], at::sum(grad_stats, {0}, false, at::kFloat));
    at::Tensor grad_preact = at::mm(grad_stats, block.group.w2);        // dG, then in place dA = GELU'(A) dG
    gelu_rows_backward_(grad_preact, preact_rows);
    accumulate(gw1[g], at::mm(grad_preact.t(), gather(h, order, block)));
    accumulate(gb1[g], at::sum(grad_preact, {0}, false, at::kFloat));
    at::addmm_out(grad_h_rows, grad_h_rows, grad_preact, block.group.w1);  // (1 - alpha) dz + dA w1, one pass
    scatter(grad_h, order, block, grad_h_rows);
  });
  for (size_t g = 0; g < n_groups; ++g) {
    gw1[g] = finish(gw1[g], {d, d}, h);
    gb1[g] = finish(gb1[g], {d}, h);
    gw2[g] = finish(gw2[g], {2 * d, d}, h);
    gb2[g] = finish(gb2[g], {2 * d}, h);
  }
  return {grad_h, gw1, gb1, gw2, gb2, gmu, glv};
}

}  // namespace vittle_fast
