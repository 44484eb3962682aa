// The one matrix product of MoRA: float32 operands read through strides, float32 accumulation, optional
// deterministic split-K (each split writes its own partial result; sum_splits_kernel adds them in a fixed order).
//
// A plain shared-memory tiled GEMM (64 x 64 tile, depth 16, 4 x 4 results per thread), chosen for being easy to
// check without a GPU, not for speed; it has not been timed on a GPU yet (cuda_mora.AUTO_ELIGIBLE is False).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mora.h"

namespace mora {
namespace {

constexpr int kBM = kGemmTileRows;
constexpr int kBN = kGemmTileCols;
constexpr int kBK = kGemmTileDepth;
constexpr int kThreads = 256;                 // 16 x 16 threads, each 4 x 4 results
constexpr int kLoadsPerThread = kBM * kBK / kThreads;  // = kBN * kBK / kThreads = 4
static_assert(kBM == kBN && kBM * kBK == 4 * kThreads, "tile loading below assumes these sizes");

__global__ void __launch_bounds__(kThreads)
    gemm_kernel(Strided a, Strided b, float* __restrict__ out, int64_t rows, int64_t cols, int64_t depth,
                int64_t depth_per_split) {
  // +4: rows of the tiles start in different banks.
  __shared__ float a_tile[kBK][kBM + 4];
  __shared__ float b_tile[kBK][kBN + 4];
  const int64_t row0 = int64_t{blockIdx.x} * kBM;
  const int64_t col0 = int64_t{blockIdx.y} * kBN;
  const int64_t k_begin = int64_t{blockIdx.z} * depth_per_split;
  const int64_t k_end = min(depth, k_begin + depth_per_split);
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  // Consecutive threads load along the operand's contiguous dimension (coalesced).
  const bool a_depth_contiguous = a.stride_col == 1;
  const bool b_cols_contiguous = b.stride_col == 1;

  float acc[4][4] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
#pragma unroll
    for (int r = 0; r < kLoadsPerThread; ++r) {
      const int index = threadIdx.x + r * kThreads;
      int ii = a_depth_contiguous ? index / kBK : index % kBM;
      int kk = a_depth_contiguous ? index % kBK : index / kBM;
      int64_t gi = row0 + ii, gk = k0 + kk;
      a_tile[kk][ii] = (gi < rows && gk < k_end) ? a.data[gi * a.stride_row + gk * a.stride_col] : 0.f;
      const int jj = b_cols_contiguous ? index % kBN : index / kBK;
      kk = b_cols_contiguous ? index / kBN : index % kBK;
      const int64_t gj = col0 + jj;
      gk = k0 + kk;
      b_tile[kk][jj] = (gk < k_end && gj < cols) ? b.data[gk * b.stride_row + gj * b.stride_col] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        av[u] = a_tile[kk][ty + 16 * u];
        bv[u] = b_tile[kk][tx + 16 * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(av[u], bv[v], acc[u][v]);
    }
    __syncthreads();
  }
  float* part = out + int64_t{blockIdx.z} * rows * cols;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t i = row0 + ty + 16 * u;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t j = col0 + tx + 16 * v;
      if (i < rows && j < cols) part[i * cols + j] = acc[u][v];
    }
  }
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T>
__global__ void sum_splits_kernel(const float* __restrict__ parts, int64_t splits, int64_t count,
                                  T* __restrict__ out) {
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < count; e += int64_t{gridDim.x} * blockDim.x) {
    float sum = 0.f;
    for (int64_t s = 0; s < splits; ++s) sum += parts[s * count + e];
    store(out + e, sum);
  }
}

}  // namespace

void launch_gemm(Strided a, Strided b, float* out, int64_t rows, int64_t cols, int64_t depth, int64_t splits,
                 cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  // Whole depth tiles per split, so that only the last split has a ragged end.
  const int64_t depth_tiles = (depth + kBK - 1) / kBK;
  const int64_t depth_per_split = (depth_tiles + splits - 1) / splits * kBK;
  const dim3 grid(static_cast<unsigned>((rows + kBM - 1) / kBM), static_cast<unsigned>((cols + kBN - 1) / kBN),
                  static_cast<unsigned>(splits));
  gemm_kernel<<<grid, kThreads, 0, stream>>>(a, b, out, rows, cols, depth, depth_per_split);
}

void launch_sum_splits(const float* parts, int64_t splits, int64_t count, void* out, Dtype out_dtype,
                       cudaStream_t stream) {
  if (count == 0) return;
  const int64_t wanted = (count + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(wanted < (int64_t{1} << 20) ? wanted : (int64_t{1} << 20));
  switch (out_dtype) {
    case Dtype::kFloat32:
      sum_splits_kernel<<<grid, kThreads, 0, stream>>>(parts, splits, count, static_cast<float*>(out));
      break;
    case Dtype::kFloat16:
      sum_splits_kernel<<<grid, kThreads, 0, stream>>>(parts, splits, count, static_cast<__half*>(out));
      break;
    case Dtype::kBFloat16:
      sum_splits_kernel<<<grid, kThreads, 0, stream>>>(parts, splits, count, static_cast<__nv_bfloat16*>(out));
      break;
  }
}

}  // namespace mora
