// The steps of one thread of the MoRA GEMM (gemm.cu), as host and device functions: the kernel runs them between
// barriers, and tests/cuda_maps_host.cu runs the same functions for every thread of every block on the CPU (a
// faithful emulation, since threads only share the tiles, and only across the barriers), so the tiling, masking,
// split-K, the tensor-core fragments and the epilogue's index arithmetic are tested without a GPU.
//
// The product sum over k of a(i, k) b(k, j), float32 accumulation, b float32 read through strides, and two choices:
// - the left operand: float32 through strides (StridedOperand: c, h or h^T), or, in the forward of types 6/7,
//   C(x) gathered (and rotated, type 6) from x by block_element as the tile loads (CompressedOperand), so that
//   neither the padded nor the rotated input exists in memory;
// - the epilogue: float32 split-K partial results (SplitStore), or, in the forward, base + scaling * D(.) stored
//   straight to every output position that copies each result (DecompressStore), so that y = c M^T never exists
//   in memory and out is written exactly once.
// A 64 x 64 tile, depth 16, 256 threads (8 warps). The left operand goes global -> registers (gathered, rotated,
// converted to float32) -> shared memory, the right one (float32) by cp.async straight to shared memory; two tile
// buffers, the next tiles' loads issued before the current tiles' products. The product runs on tensor cores as
// 3xTF32 mma.sync (CuTe's SM80 m16n8k8 TF32 atom; docs/design.md#precision): float32 accuracy, whatever the input
// dtype, as the float32 FMA loop it replaces. Not timed on a GPU yet.
#pragma once

#include <cstdint>
#include <cstring>

#include <cute/arch/copy_sm80.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>

#include "maps.cuh"

namespace mora {

constexpr int kGemmThreads = 256;
constexpr int kBM = kGemmTileRows;
constexpr int kBN = kGemmTileCols;
constexpr int kBK = kGemmTileDepth;
constexpr int kLoadsPerThread = kBM * kBK / kGemmThreads;
static_assert(kBM == kBN && kBK * kBM == 4 * kGemmThreads, "the load pattern below assumes these sizes");

// The warp-level product: CuTe's SM80 m16n8k8 TF32 mma.sync atom (float32 accumulators), 4 x 2 warps over the
// 64 x 64 tile, each warp 16 rows x 32 columns (4 atoms along the columns), 2 atoms deep per tile depth of 16. Which
// lane holds which element of A, B and the accumulators is the atom's (MMA_Traits' ALayout, BLayout, CLayout, the
// PTX fragment layouts): this file never computes a lane's coordinates itself, it asks the TiledMMA's partitions.
// mma.sync runs on sm_80 and sm_90 alike.
using GemmMma = decltype(cute::make_tiled_mma(cute::SM80_16x8x8_F32TF32TF32F32_TN{},
                                              cute::Layout<cute::Shape<cute::_4, cute::_2, cute::_1>>{},
                                              cute::Tile<cute::Int<kBM>, cute::Int<kBN>, cute::_8>{}));
static_assert(cute::size(GemmMma{}) == kGemmThreads, "one thread of the block per thread of the tiled MMA");
using GemmTileShape = cute::Shape<cute::Int<kBM>, cute::Int<kBN>>;
// One thread's accumulators: (atom values, atoms along rows, atoms along columns) = ((2, 2), 1, 4) floats.
using GemmAccumulators = decltype(cute::partition_fragment_C(GemmMma{}, GemmTileShape{}));

// A left operand gives, once per thread block, a handle on each row the thread loads (row(i): the divisions stay
// out of the depth loop), then what the element at depth k of that row needs from memory (load(row, k), a Loaded
// whose value-initialized Loaded{} stands for a zero outside the operand) and, later, the element from it
// (value(loaded, k)): the kernel issues the loads of its next tile before its products and does the arithmetic after.
struct StridedOperand {
  Strided s;
  struct Row {
    const float* data;
  };
  using Loaded = float;
  __host__ __device__ bool depth_contiguous() const { return s.stride_col == 1; }
  __host__ __device__ Row row(int64_t i) const { return {s.data + i * s.stride_row}; }
  __host__ __device__ Loaded load(const Row& row, int64_t k) const { return row.data[k * s.stride_col]; }
  __host__ __device__ float value(Loaded loaded, int64_t) const { return loaded; }
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
  using Loaded = BlockLoads<T>;
  __host__ __device__ Loaded load(const Row& row, int64_t k) const {
    return load_block_element(row.xr, cos, sin, row.b, k, geo);
  }
  __host__ __device__ float value(const Loaded& loaded, int64_t k) const { return block_value(loaded, k, geo); }
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

// The operand tiles, depth-major: a[k][i] holds a(row0 + i, k0 + k), b[k][j] holds b(k0 + k, col0 + j). The row
// length 72 (64 + 8) puts the 32 elements an atom's fragment load reads (lane = 4 g + t reads (g + const, t + const),
// g < 8, t < 4; the PTX m16n8k8 TF32 layout) at word offsets 72 t + g, in 32 different banks.
constexpr int kTilePitch = kBM + 8;
struct GemmTiles {
  float a[kBK][kTilePitch];
  float b[kBK][kTilePitch];
};

// The tiles as CuTe tensors in the TiledMMA's convention: A as (rows, depth), B as (columns, depth).
__host__ __device__ inline auto tile_a(const GemmTiles& tiles) {
  return cute::make_tensor(&tiles.a[0][0], cute::make_layout(cute::Shape<cute::Int<kBM>, cute::Int<kBK>>{},
                                                             cute::Stride<cute::_1, cute::Int<kTilePitch>>{}));
}
__host__ __device__ inline auto tile_b(const GemmTiles& tiles) {
  return cute::make_tensor(&tiles.b[0][0], cute::make_layout(cute::Shape<cute::Int<kBN>, cute::Int<kBK>>{},
                                                             cute::Stride<cute::_1, cute::Int<kTilePitch>>{}));
}

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

// dst = *src if pred, else 0, into shared memory: on the GPU an asynchronous 4-byte copy that bypasses the registers
// (cp.async with zero fill, CuTe's SM80 copy op; complete after wait_shared_copies), on the host a plain store.
// src must be a valid address even when pred is false (nothing is read then).
__host__ __device__ inline void copy_to_shared(const float* src, float& dst, bool pred) {
#ifdef __CUDA_ARCH__
  cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<float>::copy(*src, dst, pred);
#else
  dst = pred ? *src : 0.f;
#endif
}

// Waits until this thread's copy_to_shared copies have landed (a barrier then makes every thread's visible).
__host__ __device__ inline void wait_shared_copies() {
#ifdef __CUDA_ARCH__
  cute::cp_async_wait<0>();
#endif
}

// Thread `thread`'s share of the left operand's next tile, held in registers between its global loads
// (gemm_fetch_tiles) and its shared-memory stores (gemm_stage_tiles): the kernel fetches the next tiles before
// multiplying the current ones, so the loads are in flight while the tensor cores run, and the left operand's
// arithmetic (conversion, rotation) waits for them only after the products. The right operand (float32, copied as
// is) goes straight to shared memory by copy_to_shared.
template <typename A>
struct GemmStaged {
  typename A::Loaded a[kLoadsPerThread];
};

// The tile positions of the r-th B element of a thread (kk, jj), read along b's contiguous dimension as for A.
__host__ __device__ inline int b_tile_col(bool cols_contiguous, int index) {
  return cols_contiguous ? index % kBN : index / kBK;
}
__host__ __device__ inline int b_tile_depth(bool cols_contiguous, int index) {
  return cols_contiguous ? index / kBN : index % kBK;
}

// Thread `thread` starts its share of the loads of the (kBM x kBK) and (kBK x kBN) tiles at depth k0: A's into
// `staged`, B's as copies into `tiles` (the buffer no thread reads until the next barrier); zeros outside the
// operand or past this split's end.
template <typename A, typename Out>
__host__ __device__ inline void gemm_fetch_tiles(const GemmProblem<A, Out>& p, const GemmARows<A>& a_rows,
                                                 GemmStaged<A>& staged, GemmTiles& tiles, int64_t col0, int64_t k0,
                                                 int64_t k_end, int thread) {
  const bool a_depth_contiguous = p.a.depth_contiguous();
  const bool b_cols_contiguous = p.b.stride_col == 1;
#pragma unroll
  for (int r = 0; r < kLoadsPerThread; ++r) {
    const int index = thread + r * kGemmThreads;
    int64_t gk = k0 + a_tile_depth(a_depth_contiguous, index);
    staged.a[r] = (a_rows.valid[r] && gk < k_end) ? p.a.load(a_rows.row[r], gk) : typename A::Loaded{};
    const int jj = b_tile_col(b_cols_contiguous, index);
    const int kk = b_tile_depth(b_cols_contiguous, index);
    const int64_t gj = col0 + jj;
    gk = k0 + kk;
    const bool b_valid = gk < k_end && gj < p.cols;
    copy_to_shared(b_valid ? p.b.data + gk * p.b.stride_row + gj * p.b.stride_col : p.b.data, tiles.b[kk][jj],
                   b_valid);
  }
}

// Thread `thread` turns what it fetched of A for depth k0 into the tile's elements and stores them at the positions
// gemm_fetch_tiles read them for.
template <typename A, typename Out>
__host__ __device__ inline void gemm_stage_tiles(const GemmProblem<A, Out>& p, const GemmStaged<A>& staged,
                                                 GemmTiles& tiles, int64_t k0, int thread) {
  const bool a_depth_contiguous = p.a.depth_contiguous();
#pragma unroll
  for (int r = 0; r < kLoadsPerThread; ++r) {
    const int index = thread + r * kGemmThreads;
    const int kk = a_tile_depth(a_depth_contiguous, index);
    tiles.a[kk][a_tile_row(a_depth_contiguous, index)] = p.a.value(staged.a[r], k0 + kk);
  }
}

// v rounded to TF32 (10 explicit mantissa bits), to nearest with ties away from zero, as a float32 whose low 13 bits
// are zero. Integer arithmetic on the bits, so the host build computes exactly what the GPU does.
__host__ __device__ inline float tf32_round(float v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;  // inf / NaN kept
  float rounded;
  memcpy(&rounded, &bits, sizeof rounded);
  return rounded;
}

// One thread's operand registers for a tile of depth kBK, split for 3xTF32: v = big + small with big = tf32(v) and
// small = tf32(v - big) (v - big is exact in float32). The product a b is big big' + big small' + small big' up to
// small small' (2^-22 of |a b|) and the TF32 rounding of the small parts (another 2^-22 each; tests/helpers.py
// float32_error). The registers are those the TiledMMA's partitions assign to the thread, loaded from shared memory.
struct GemmFragments {
  using A = decltype(GemmMma{}.get_slice(0).partition_fragment_A(tile_a(GemmTiles{})));
  using B = decltype(GemmMma{}.get_slice(0).partition_fragment_B(tile_b(GemmTiles{})));
  A a_big, a_small;
  B b_big, b_small;

  __host__ __device__ GemmFragments(const GemmTiles& tiles, int thread) {
    const auto mma = GemmMma{}.get_slice(thread);
    split(mma.partition_A(tile_a(tiles)), a_big, a_small);
    split(mma.partition_B(tile_b(tiles)), b_big, b_small);
  }

  template <typename Source, typename Fragment>
  __host__ __device__ static void split(const Source& source, Fragment& big, Fragment& small) {
    static_assert(cute::size(Source{}) == cute::size(Fragment{}), "a fragment register per element");
#pragma unroll
    for (int e = 0; e < cute::size(big); ++e) {
      const float value = source(e);
      const float high = tf32_round(value);
      big(e) = cutlass::tfloat32_t::bitcast(bits_of(high));
      small(e) = cutlass::tfloat32_t::bitcast(bits_of(tf32_round(value - high)));
    }
  }
  __host__ __device__ static uint32_t bits_of(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return bits;
  }
};

#ifdef __CUDACC__
// acc += the product of the tiles, on tensor cores: the two correction products first, so that the small terms add
// up before the large one joins them.
__device__ inline void gemm_multiply_tiles(const GemmTiles& tiles, int thread, GemmAccumulators& acc) {
  const GemmFragments f(tiles, thread);
  const GemmMma mma;
  cute::gemm(mma, f.a_small, f.b_big, acc);
  cute::gemm(mma, f.a_big, f.b_small, acc);
  cute::gemm(mma, f.a_big, f.b_big, acc);
}
#endif

// The tile coordinates (i, j) of each of thread `thread`'s accumulators, from the TiledMMA's partition of the
// identity tensor: the same layout that places the mma.sync results in the registers.
__host__ __device__ inline auto gemm_accumulator_coordinates(int thread) {
  return GemmMma{}.get_slice(thread).partition_C(cute::make_identity_tensor(GemmTileShape{}));
}

template <typename A, typename Out>
__host__ __device__ inline void gemm_store(const GemmProblem<A, Out>& p, int64_t row0, int64_t col0, int64_t split,
                                           int thread, const GemmAccumulators& acc) {
  const auto coordinates = gemm_accumulator_coordinates(thread);
#pragma unroll
  for (int e = 0; e < cute::size(acc); ++e) {
    const int64_t i = row0 + cute::get<0>(coordinates(e));
    const int64_t j = col0 + cute::get<1>(coordinates(e));
    if (i < p.rows && j < p.cols) p.out.store(i, j, split, acc(e));
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
