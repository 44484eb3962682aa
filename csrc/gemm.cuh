// The steps of one thread of the MoRA GEMM (gemm.cu), as host and device functions: the kernel runs them between
// barriers, and tests/cuda_maps_host.cu runs the same functions for every thread of every block on the CPU (a
// faithful emulation, since threads only share the tiles, and only across the barriers), so the tiling, masking
// and split-K index arithmetic are tested without a GPU.
//
// out[s][i][j] = sum over k in split s of a(i, k) b(k, j): float32 operands read through strides, float32
// accumulation. A plain shared-memory tiled GEMM (64 x 64 tile, depth 16, 256 threads each owning 4 x 4 results),
// chosen for being easy to check without a GPU, not for speed; it has not been timed on a GPU yet.
#pragma once

#include "mora.h"

namespace mora {

constexpr int kGemmThreads = 256;  // 16 x 16 threads, each 4 x 4 results: thread (tx, ty) owns rows ty + 16 u and
                                   // columns tx + 16 v of the tile
constexpr int kBM = kGemmTileRows;
constexpr int kBN = kGemmTileCols;
constexpr int kBK = kGemmTileDepth;
constexpr int kLoadsPerThread = kBM * kBK / kGemmThreads;
static_assert(kBM == 64 && kBN == 64 && kBK * kBM == 4 * kGemmThreads, "the thread layout below assumes these sizes");

struct GemmProblem {
  Strided a;  // (rows, depth)
  Strided b;  // (depth, cols)
  float* out;  // (splits, rows, cols)
  int64_t rows, cols, depth;
  int64_t depth_per_split;  // a multiple of kBK, so that only the last split has a ragged end
};

struct GemmTiles {
  float a[kBK][kBM + 4];  // +4: successive depth rows start in different banks
  float b[kBK][kBN + 4];
};

inline int64_t gemm_depth_per_split(int64_t depth, int64_t splits) {
  const int64_t depth_tiles = (depth + kBK - 1) / kBK;
  return (depth_tiles + splits - 1) / splits * kBK;
}

// Thread `thread` loads its share of the (kBM x kBK) and (kBK x kBN) tiles at depth k0; zeros outside the operand
// or past this split's end. Consecutive threads read along the operand's contiguous dimension (coalesced).
__host__ __device__ inline void gemm_load_tiles(const GemmProblem& p, GemmTiles& tiles, int64_t row0, int64_t col0,
                                                int64_t k0, int64_t k_end, int thread) {
  const bool a_depth_contiguous = p.a.stride_col == 1;
  const bool b_cols_contiguous = p.b.stride_col == 1;
#pragma unroll
  for (int r = 0; r < kLoadsPerThread; ++r) {
    const int index = thread + r * kGemmThreads;
    const int ii = a_depth_contiguous ? index / kBK : index % kBM;
    int kk = a_depth_contiguous ? index % kBK : index / kBM;
    const int64_t gi = row0 + ii;
    int64_t gk = k0 + kk;
    tiles.a[kk][ii] = (gi < p.rows && gk < k_end) ? p.a.data[gi * p.a.stride_row + gk * p.a.stride_col] : 0.f;
    const int jj = b_cols_contiguous ? index % kBN : index / kBK;
    kk = b_cols_contiguous ? index / kBN : index % kBK;
    const int64_t gj = col0 + jj;
    gk = k0 + kk;
    tiles.b[kk][jj] = (gk < k_end && gj < p.cols) ? p.b.data[gk * p.b.stride_row + gj * p.b.stride_col] : 0.f;
  }
}

__host__ __device__ inline void gemm_multiply_tiles(const GemmTiles& tiles, int thread, float (&acc)[4][4]) {
  const int tx = thread % 16;
  const int ty = thread / 16;
#pragma unroll
  for (int kk = 0; kk < kBK; ++kk) {
    float av[4], bv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      av[u] = tiles.a[kk][ty + 16 * u];
      bv[u] = tiles.b[kk][tx + 16 * u];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(av[u], bv[v], acc[u][v]);
  }
}

__host__ __device__ inline void gemm_store(const GemmProblem& p, int64_t row0, int64_t col0, int64_t split,
                                           int thread, const float (&acc)[4][4]) {
  const int tx = thread % 16;
  const int ty = thread / 16;
  float* part = p.out + split * p.rows * p.cols;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t i = row0 + ty + 16 * u;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t j = col0 + tx + 16 * v;
      if (i < p.rows && j < p.cols) part[i * p.cols + j] = acc[u][v];
    }
  }
}

// Thread block (row tile, column tile, split) of the grid: its first row and column and its depth range.
struct GemmBlock {
  int64_t row0, col0, k_begin, k_end;
  __host__ __device__ GemmBlock(const GemmProblem& p, int64_t row_tile, int64_t col_tile, int64_t split)
      : row0(row_tile * kBM),
        col0(col_tile * kBN),
        k_begin(split * p.depth_per_split),
        k_end(p.depth < k_begin + p.depth_per_split ? p.depth : k_begin + p.depth_per_split) {}
};

}  // namespace mora
