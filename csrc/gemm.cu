// The MoRA GEMM kernel (steps in gemm.cuh) in its two uses, and the deterministic sum of its split-K partial results:
// - launch_gemm: float32 split-K partials, each split its own (rows x cols) slice, that sum_splits_kernel adds in a
//   fixed order (no atomics); the backward's products w = h M and dM = h^T c;
// - launch_forward_gemm: out = base + scaling * D(a M^T) in one pass, a = c (types 1-4) or C(x) gathered from x in
//   the tile loads (types 6/7).
#include "gemm.cuh"

namespace mora {
namespace {

template <typename A, typename Out>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(GemmProblem<A, Out> p) {
  __shared__ GemmTiles tiles[2];
  const GemmBlock block(p, blockIdx.x, blockIdx.y, blockIdx.z);
  const GemmARows<A> a_rows(p.a, p.rows, block.row0, threadIdx.x);
  GemmAccumulators acc;
  cute::clear(acc);
  GemmStaged<A> staged;
  if (block.k_begin < block.k_end)
    gemm_fetch_tiles(p, a_rows, staged, tiles[0], block.col0, block.k_begin, block.k_end, threadIdx.x);
  int buffer = 0;
  for (int64_t k0 = block.k_begin; k0 < block.k_end; k0 += kBK, buffer ^= 1) {
    gemm_stage_tiles(p, staged, tiles[buffer], k0, threadIdx.x);
    wait_shared_copies();
    __syncthreads();
    // The next tiles' global loads go out before this tile's products, so that their latency overlaps the MMAs.
    // They land in the other buffer (B now, A at the next step's gemm_stage_tiles): every thread read it last in the
    // previous step, before this step's barrier, so one barrier per step suffices.
    if (k0 + kBK < block.k_end)
      gemm_fetch_tiles(p, a_rows, staged, tiles[buffer ^ 1], block.col0, k0 + kBK, block.k_end, threadIdx.x);
    gemm_multiply_tiles(tiles[buffer], threadIdx.x, acc);
  }
  gemm_store(p, block.row0, block.col0, blockIdx.z, threadIdx.x, acc);
}

template <typename A, typename Out>
void launch(const GemmProblem<A, Out>& p, int64_t splits, cudaStream_t stream) {
  // Row tiles on grid.x (up to 2^31 - 1), column tiles and splits on y and z (up to 65535; checked by the binding).
  const dim3 grid(static_cast<unsigned>((p.rows + kBM - 1) / kBM), static_cast<unsigned>((p.cols + kBN - 1) / kBN),
                  static_cast<unsigned>(splits));
  gemm_kernel<<<grid, kGemmThreads, 0, stream>>>(p);
}

template <typename T>
__global__ void sum_splits_kernel(const float* __restrict__ parts, int64_t splits, int64_t count,
                                  T* __restrict__ out) {
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < count; e += int64_t{gridDim.x} * blockDim.x) {
    float sum = 0.f;
    for (int64_t s = 0; s < splits; ++s) sum += parts[s * count + e];
    out[e] = from_float<T>(sum);
  }
}

}  // namespace

void launch_gemm(Strided a, Strided b, float* out, int64_t rows, int64_t cols, int64_t depth, int64_t splits,
                 cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  launch(GemmProblem<StridedOperand, SplitStore>{{a}, b, {out, rows, cols}, rows, cols, depth,
                                                 gemm_depth_per_split(depth, splits)},
         splits, stream);
}

void launch_forward_gemm(const float* c, const void* x, Dtype x_dtype, const float* cos, const float* sin,
                         const float* M, const void* base, void* out, Dtype out_dtype, float scaling, int64_t rows,
                         const Geometry& geo, cudaStream_t stream) {
  const int64_t mapped = mapped_rows(geo, rows);
  if (mapped == 0) return;
  const Strided m_transposed{M, 1, geo.R};  // element (k, j) of the right operand is M[j, k]
  dispatch(out_dtype, [&](auto out_tag) {
    using TOut = decltype(out_tag);
    const DecompressStore<TOut> store{static_cast<const TOut*>(base), static_cast<TOut*>(out), scaling, geo};
    if (blockwise(geo)) {
      dispatch(x_dtype, [&](auto x_tag) {
        using TX = decltype(x_tag);
        const CompressedOperand<TX> a{static_cast<const TX*>(x), cos, sin, geo};
        launch(GemmProblem<CompressedOperand<TX>, DecompressStore<TOut>>{a, m_transposed, store, mapped, geo.R,
                                                                         geo.R, gemm_depth_per_split(geo.R, 1)},
               1, stream);
      });
    } else {
      launch(GemmProblem<StridedOperand, DecompressStore<TOut>>{{{c, geo.R, 1}}, m_transposed, store, mapped, geo.R,
                                                                 geo.R, gemm_depth_per_split(geo.R, 1)},
             1, stream);
    }
  });
}

void launch_sum_splits(const float* parts, int64_t splits, int64_t count, void* out, Dtype out_dtype,
                       cudaStream_t stream) {
  if (count == 0) return;
  constexpr int kThreads = 256;
  const int64_t wanted = (count + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(wanted < (int64_t{1} << 20) ? wanted : (int64_t{1} << 20));
  dispatch(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    sum_splits_kernel<<<grid, kThreads, 0, stream>>>(parts, splits, count, static_cast<T*>(out));
  });
}

}  // namespace mora
