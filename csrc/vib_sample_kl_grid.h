// Launch geometry of the CUDA kernels (vib_sample_kl_kernels.cuh), in plain C++ so that the CPU build
// compiles it too and tests can check it without a GPU (op vittle_fast::cuda_launch_geometry).
//
// Forward: grid.x = blocks of `kThreads / threads_per_row` rows; each row's threads loop over D.
// Backward: grid.x = chunks of kChunkRows rows, grid.y = column tiles of threads_per_row * E columns,
// capped at kMaxGridY (CUDA's limit for grid.y): a block loops over tiles y, y + grid.y, ... so any D
// the forward accepts runs (D > 65,535 * 256 on the scalar path would otherwise not launch).
#pragma once

#include <cstdint>

#include "vib_sample_kl_math.h"

namespace vittle_fast {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kMinThreadsPerRow = kWarp;
// Rows per backward chunk (one prior-gradient partial each); a constant, so results depend on N only.
constexpr int64_t kChunkRows = 32;
constexpr int kReduceThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// Threads per row: enough for one pass over D in E-element groups, a power of two in [32, kThreads].
inline int threads_per_row(int64_t dim, int elems_per_thread) {
  const int64_t groups = (dim + elems_per_thread - 1) / elems_per_thread;
  int tpr = kMinThreadsPerRow;
  while (tpr < kThreads && tpr < groups) tpr *= 2;
  return tpr;
}

inline int64_t forward_blocks(int64_t n_tokens, int threads_per_row) {
  const int64_t rows_per_block = kThreads / threads_per_row;
  return (n_tokens + rows_per_block - 1) / rows_per_block;
}

inline int64_t backward_chunks(int64_t n_tokens) { return (n_tokens + kChunkRows - 1) / kChunkRows; }

// Column tiles of the backward kernel: threads_per_row * E columns each.
VITTLE_HD int64_t column_tiles(int64_t dim, int threads_per_row, int elems_per_thread) {
  const int64_t tile_cols = static_cast<int64_t>(threads_per_row) * elems_per_thread;
  return (dim + tile_cols - 1) / tile_cols;
}

struct BackwardGrid {
  int64_t x;  // row chunks
  int64_t y;  // column-tile slots: block y runs tiles y, y + grid.y, ...
};

inline BackwardGrid backward_grid(int64_t n_tokens, int64_t dim, int threads_per_row, int elems_per_thread) {
  const int64_t tiles = column_tiles(dim, threads_per_row, elems_per_thread);
  return {backward_chunks(n_tokens), tiles < kMaxGridY ? tiles : kMaxGridY};
}

}  // namespace cuda
}  // namespace vittle_fast
