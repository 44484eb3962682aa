// Kernels of MoRA's index maps: one thread per output element, grid-stride loops over int64 offsets, the element
// functions of maps.cuh. Each output element has exactly one writer: no atomics, and results do not depend on
// the launch configuration. The GEMM, which also decompresses in its epilogue, is in gemm.cu.
#include "maps.cuh"

namespace mora {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover any element count; this cap only bounds the grid (2^31 - 1 is the hardware limit).
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

__device__ __forceinline__ int64_t first_element() { return int64_t{blockIdx.x} * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t element_stride() { return int64_t{gridDim.x} * blockDim.x; }

template <typename T>
__global__ void compress_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                                float* __restrict__ c, int64_t total, Geometry geo) {
  for (int64_t e = first_element(); e < total; e += element_stride())
    c[e] = compress_at(x, cos, sin, e / geo.R, e % geo.R, geo);
}

template <typename T>
__global__ void decompress_adjoint_kernel(const T* __restrict__ g, float scaling, float* __restrict__ h, int64_t total,
                                          Geometry geo) {
  for (int64_t e = first_element(); e < total; e += element_stride())
    h[e] = scaling * decompress_adjoint_at(g, e / geo.R, e % geo.R, geo);
}

template <typename T>
__global__ void compress_adjoint_kernel(const float* __restrict__ w, const float* __restrict__ cos,
                                        const float* __restrict__ sin, T* __restrict__ dx, int64_t total,
                                        Geometry geo) {
  for (int64_t e = first_element(); e < total; e += element_stride())
    dx[e] = from_float<T>(compress_adjoint_at(w, cos, sin, e, geo));
}

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

}  // namespace

void launch_compress(const void* x, Dtype x_dtype, const float* cos, const float* sin, float* c, int64_t rows,
                     const Geometry& geo, cudaStream_t stream) {
  const int64_t total = mapped_rows(geo, rows) * geo.R;
  if (total == 0) return;
  dispatch(x_dtype, [&](auto tag) {
    using T = decltype(tag);
    compress_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(static_cast<const T*>(x), cos, sin, c, total, geo);
  });
}

void launch_decompress_adjoint(const void* g, Dtype g_dtype, float scaling, float* h, int64_t rows,
                               const Geometry& geo, cudaStream_t stream) {
  const int64_t total = mapped_rows(geo, rows) * geo.R;
  if (total == 0) return;
  dispatch(g_dtype, [&](auto tag) {
    using T = decltype(tag);
    decompress_adjoint_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(static_cast<const T*>(g), scaling, h,
                                                                             total, geo);
  });
}

void launch_compress_adjoint(const float* w, const float* cos, const float* sin, void* dx, Dtype dx_dtype,
                             int64_t rows, const Geometry& geo, cudaStream_t stream) {
  const int64_t total = rows * geo.n;
  if (total == 0) return;
  dispatch(dx_dtype, [&](auto tag) {
    using T = decltype(tag);
    compress_adjoint_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(w, cos, sin, static_cast<T*>(dx), total,
                                                                           geo);
  });
}

}  // namespace mora
