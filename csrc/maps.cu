// Kernels of MoRA's index maps: one thread per output element, grid-stride loops over int64 offsets, the element
// functions of maps.cuh. Each output element has exactly one writer: no atomics, and results do not depend on
// the launch configuration. The GEMM is in gemm.cu.
#include "maps.cuh"

namespace mora {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover any element count; this cap only bounds the grid (2^31 - 1 is the hardware limit).
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ int64_t first_element() { return int64_t{blockIdx.x} * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t element_stride() { return int64_t{gridDim.x} * blockDim.x; }

template <typename T>
__global__ void compress_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                                float* __restrict__ c, int64_t total, Geometry geo) {
  for (int64_t e = first_element(); e < total; e += element_stride()) c[e] = compress_at(x, cos, sin, e, geo);
}

// out = base + scaling * D(y); base may be null.
template <typename T>
__global__ void decompress_kernel(const float* __restrict__ y, const T* __restrict__ base, T* __restrict__ out,
                                  float scaling, int64_t total, Geometry geo) {
  for (int64_t e = first_element(); e < total; e += element_stride()) {
    float value = scaling * y[decompress_source(e, geo)];
    if (base != nullptr) value += to_float(base[e]);
    out[e] = from_float<T>(value);
  }
}

template <typename T>
__global__ void decompress_adjoint_kernel(const T* __restrict__ g, float scaling, float* __restrict__ h, int64_t total,
                                          Geometry geo) {
  for (int64_t e = first_element(); e < total; e += element_stride()) h[e] = scaling * decompress_adjoint_at(g, e, geo);
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

// Calls f(T{}) with the element type of `dtype`; the binding accepts only these three dtypes.
template <typename F>
void dispatch(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat32:
      f(float{});
      break;
    case Dtype::kFloat16:
      f(__half{});
      break;
    case Dtype::kBFloat16:
      f(__nv_bfloat16{});
      break;
  }
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

void launch_decompress(const float* y, const void* base, void* out, Dtype out_dtype, float scaling, int64_t rows,
                       const Geometry& geo, cudaStream_t stream) {
  const int64_t total = rows * geo.m;
  if (total == 0) return;
  dispatch(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    decompress_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(y, static_cast<const T*>(base),
                                                                     static_cast<T*>(out), scaling, total, geo);
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
