// The MoRA GEMM kernel (steps in gemm.cuh) and the deterministic sum of its split-K partial results: each split
// writes its own (rows x cols) slice, and sum_splits_kernel adds the slices in a fixed order (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemm.cuh"

namespace mora {
namespace {

__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(GemmProblem p) {
  __shared__ GemmTiles tiles;
  const GemmBlock block(p, blockIdx.x, blockIdx.y, blockIdx.z);
  float acc[4][4] = {};
  for (int64_t k0 = block.k_begin; k0 < block.k_end; k0 += kBK) {
    gemm_load_tiles(p, tiles, block.row0, block.col0, k0, block.k_end, threadIdx.x);
    __syncthreads();
    gemm_multiply_tiles(tiles, threadIdx.x, acc);
    __syncthreads();
  }
  gemm_store(p, block.row0, block.col0, blockIdx.z, threadIdx.x, acc);
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
  const GemmProblem problem{a, b, out, rows, cols, depth, gemm_depth_per_split(depth, splits)};
  // Row tiles on grid.x (up to 2^31 - 1), column tiles and splits on y and z (up to 65535; checked by the binding).
  const dim3 grid(static_cast<unsigned>((rows + kBM - 1) / kBM), static_cast<unsigned>((cols + kBN - 1) / kBN),
                  static_cast<unsigned>(splits));
  gemm_kernel<<<grid, kGemmThreads, 0, stream>>>(problem);
}

void launch_sum_splits(const float* parts, int64_t splits, int64_t count, void* out, Dtype out_dtype,
                       cudaStream_t stream) {
  if (count == 0) return;
  constexpr int kThreads = 256;
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
