// The steps of one thread of the MoRA GEMM (gemm.cu), as host and device functions: the kernel runs them between
// barriers, and tests/cuda_maps_host.cu runs the same functions for every thread of every block on the CPU (a
// faithful emulation, since threads only share the tiles, and only across the barriers), so the tiling, masking
// and split-K index arithmetic are tested without a GPU.
//
// The product sum over k of a(i, k) b(k, j), float32 accumulation, b float32 read through strides, and two choices:
// - the left operand: float32 through strides (StridedOperand: c, h or h^T), or, in the forward of types 6/7,
//   C(x) gathered (and rotated, type 6) from x by block_element as the tile loads (CompressedOperand), so that
//   neither the padded nor the rotated input exists in memory;
// - the epilogue: float32 split-K partial results (SplitStore), or, in the forward, base + scaling * D(.) stored
//   straight to every output position that copies each result (DecompressStore), so that y = c M^T never exists
//   in memory and out is written exactly once.
// A plain shared-memory tiled GEMM (64 x 64 tile, depth 16, 256 threads each owning 4 x 4 results), chosen for
// being easy to check without a GPU, not for speed; it has not been timed on a GPU yet.
#pragma once

#include "maps.cuh"

namespace mora {

constexpr int kGemmThreads = 256;  // 16 x 16 threads, each 4 x 4 results: thread (tx, ty) owns rows ty + 16 u and
                                   // columns tx + 16 v of the tile
constexpr int kBM = kGemmTileRows;
constexpr int kBN = kGemmTileCols;
constexpr int kBK = kGemmTileDepth;
constexpr int kLoadsPerThread = kBM * kBK / kGemmThreads;
static_assert(kBM == 64 && kBN == 64 && kBK * kBM == 4 * kGemmThreads, "the thread layout below assumes these sizes");

// A left operand gives, once per thread block, a handle on each row the thread loads (row(i): the divisions stay
// out of the depth loop) and then the element at depth k of that row (at(row, k)).
struct StridedOperand {
  Strided s;
  struct Row {
    const float* data;
  };
  __host__ __device__ bool depth_contiguous() const { return s.stride_col == 1; }
  __host__ __device__ Row row(int64_t i) const { return {s.data + i * s.stride_row}; }
  __host__ __device__ float at(const Row& row, int64_t k) const { return row.data[k * s.stride_col]; }
};

// c = C(x) of types 6/7 from x: mapped row i = (input row, used block b), depth k = position j in the block.
template <typename T>
struct CompressedOperand {
  const T* x;
  const float* cos;  // type 6 only
  const float* sin;
  Geometry geo;
  struct Row {
    const T* xr;
    int64_t b;
  };
  __host__ __device__ bool depth_contiguous() const { return true; }
  __host__ __device__ Row row(int64_t i) const {
    const MappedRow mapped = split_mapped_row(i, geo);
    return {x + mapped.row * geo.n, mapped.b};
  }
  __host__ __device__ float at(const Row& row, int64_t k) const {
    return block_element(row.xr, cos, sin, row.b, k, geo);
  }
};

// (splits, rows, cols) float32: split s writes slice s (no atomics: deterministic).
struct SplitStore {
  float* parts;
  int64_t rows, cols;
  __host__ __device__ void store(int64_t i, int64_t j, int64_t split, float value) const {
    parts[(split * rows + i) * cols + j] = value;
  }
};

// out (rows, m) of type T = base + scaling * D(y), y[i, j] the GEMM's result; base may be null.
template <typename T>
struct DecompressStore {
  const T* base;
  T* out;
  float scaling;
  Geometry geo;
  __host__ __device__ void store(int64_t i, int64_t j, int64_t, float value) const {
    const float update = scaling * value;
    for_each_copy(i, j, geo, [&](int64_t o) {
      out[o] = from_float<T>(base != nullptr ? update + to_float(base[o]) : update);
    });
  }
};

template <typename A, typename Out>
struct GemmProblem {
  A a;        // (rows, depth)
  Strided b;  // (depth, cols)
  Out out;
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

// The tile positions of thread `thread`'s r-th load of A (ii, kk) and of B (kk, jj). Consecutive threads read along
// the operand's contiguous dimension (coalesced); a thread's A row ii is the same at every depth.
__host__ __device__ inline int a_tile_row(bool depth_contiguous, int index) {
  return depth_contiguous ? index / kBK : index % kBM;
}
__host__ __device__ inline int a_tile_depth(bool depth_contiguous, int index) {
  return depth_contiguous ? index % kBK : index / kBM;
}

// The A rows that thread `thread` loads in a block whose first row is row0 (row handles, and whether in range).
template <typename A>
struct GemmARows {
  typename A::Row row[kLoadsPerThread];
  bool valid[kLoadsPerThread];
  __host__ __device__ GemmARows(const A& a, int64_t rows, int64_t row0, int thread) {
#pragma unroll
    for (int r = 0; r < kLoadsPerThread; ++r) {
      const int64_t gi = row0 + a_tile_row(a.depth_contiguous(), thread + r * kGemmThreads);
      valid[r] = gi < rows;
      row[r] = a.row(valid[r] ? gi : 0);
    }
  }
};

// Thread `thread` loads its share of the (kBM x kBK) and (kBK x kBN) tiles at depth k0; zeros outside the operand
// or past this split's end.
template <typename A, typename Out>
__host__ __device__ inline void gemm_load_tiles(const GemmProblem<A, Out>& p, const GemmARows<A>& a_rows,
                                                GemmTiles& tiles, int64_t row0, int64_t col0, int64_t k0,
                                                int64_t k_end, int thread) {
  const bool a_depth_contiguous = p.a.depth_contiguous();
  const bool b_cols_contiguous = p.b.stride_col == 1;
#pragma unroll
  for (int r = 0; r < kLoadsPerThread; ++r) {
    const int index = thread + r * kGemmThreads;
    const int ii = a_tile_row(a_depth_contiguous, index);
    int kk = a_tile_depth(a_depth_contiguous, index);
    int64_t gk = k0 + kk;
    tiles.a[kk][ii] = (a_rows.valid[r] && gk < k_end) ? p.a.at(a_rows.row[r], gk) : 0.f;
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

template <typename A, typename Out>
__host__ __device__ inline void gemm_store(const GemmProblem<A, Out>& p, int64_t row0, int64_t col0, int64_t split,
                                           int thread, const float (&acc)[4][4]) {
  const int tx = thread % 16;
  const int ty = thread / 16;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t i = row0 + ty + 16 * u;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t j = col0 + tx + 16 * v;
      if (i < p.rows && j < p.cols) p.out.store(i, j, split, acc[u][v]);
    }
  }
}

// Thread block (row tile, column tile, split) of the grid: its first row and column and its depth range.
struct GemmBlock {
  int64_t row0, col0, k_begin, k_end;
  template <typename A, typename Out>
  __host__ __device__ GemmBlock(const GemmProblem<A, Out>& p, int64_t row_tile, int64_t col_tile, int64_t split)
      : row0(row_tile * kBM),
        col0(col_tile * kBN),
        k_begin(split * p.depth_per_split),
        k_end(p.depth < k_begin + p.depth_per_split ? p.depth : k_begin + p.depth_per_split) {}
};

}  // namespace mora
