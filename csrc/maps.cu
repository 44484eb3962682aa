// Index-map kernels of MoRA (MORA_SPEC.md): compress C, decompress D and their adjoints, one thread per output
// element, reading any of float32/float16/bfloat16 and computing in float32. The GEMM is in gemm.cu.
//
// Every map is a gather or a sum over an index map, so each output element has exactly one writer: no atomics,
// and results do not depend on the launch configuration. All offsets are int64 (grid-stride loops over int64).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mora.h"

namespace mora {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover any element count; this cap only bounds the grid (2^31 - 1 is the hardware limit).
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Split of `length` positions into R contiguous groups: the first s = length mod R groups hold q + 1 positions,
// the rest q (spec: group split; groups are empty when length < R).
struct GroupSplit {
  int64_t q, s;
  __host__ __device__ GroupSplit(int64_t length, int64_t groups) : q(length / groups), s(length % groups) {}
  __device__ int64_t start(int64_t group) const { return group < s ? group * (q + 1) : s * (q + 1) + (group - s) * q; }
  __device__ int64_t size(int64_t group) const { return q + (group < s ? 1 : 0); }
  __device__ int64_t group_of(int64_t position) const {
    if (q == 0) return position;
    const int64_t head = s * (q + 1);
    return position < head ? position / (q + 1) : s + (position - head) / q;
  }
};

__device__ __forceinline__ int64_t first_element() { return int64_t{blockIdx.x} * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t element_stride() { return int64_t{gridDim.x} * blockDim.x; }

// c[i, j]: types 1/4 sum x over the B blocks of the cyclically padded input (xp[p] = x[p mod n]); types 2/3 sum
// x over group j of n; types 6/7 take element j of block b of xp, type 6 rotated:
// z[j] = v[j] cos[b, j] + rotate_half(v)[j] sin[b, j], rotate_half(v) = concat(-v[R/2:], v[:R/2]).
template <typename T>
__global__ void compress_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                                float* __restrict__ c, int64_t total, Geometry geo) {
  const GroupSplit split(geo.n, geo.R);
  const int64_t half = geo.R / 2;
  for (int64_t e = first_element(); e < total; e += element_stride()) {
    const int64_t i = e / geo.R;
    const int64_t j = e - i * geo.R;
    float value = 0.f;
    if (geo.type == 6 || geo.type == 7) {
      const int64_t row = i / geo.used;
      const int64_t b = i - row * geo.used;
      const T* xr = x + row * geo.n;
      const int64_t p = b * geo.R + j;  // also the offset of (b, j) in the (>= used, R) cos/sin tables
      value = to_float(xr[p % geo.n]);
      if (geo.type == 6) {
        const int64_t partner = j < half ? j + half : j - half;
        const float other = to_float(xr[(b * geo.R + partner) % geo.n]);
        value = value * cos[p] + (j < half ? -other : other) * sin[p];
      }
    } else if (geo.type == 2 || geo.type == 3) {
      const T* xr = x + i * geo.n + split.start(j);
      for (int64_t t = 0, size = split.size(j); t < size; ++t) value += to_float(xr[t]);
    } else {
      const T* xr = x + i * geo.n;
      for (int64_t b = 0; b < geo.blocks; ++b) value += to_float(xr[(b * geo.R + j) % geo.n]);
    }
    c[e] = value;
  }
}

// out[row, k] = base[row, k] + scaling * y[row, src(k)]: src(k) = k mod R (types 1/3), the group of k in the split
// of m (types 2/4), or k mod (B R) in the flattened blocks of the row (types 6/7; below used * R by construction).
template <typename T>
__global__ void decompress_kernel(const float* __restrict__ y, const T* __restrict__ base, T* __restrict__ out,
                                  float scaling, int64_t total, Geometry geo) {
  const GroupSplit split(geo.m, geo.R);
  const bool blocks = geo.type == 6 || geo.type == 7;
  const int64_t width = blocks ? geo.used * geo.R : geo.R;
  for (int64_t e = first_element(); e < total; e += element_stride()) {
    const int64_t row = e / geo.m;
    const int64_t k = e - row * geo.m;
    int64_t src;
    if (blocks) {
      src = k % (geo.blocks * geo.R);
    } else if (geo.type == 2 || geo.type == 4) {
      src = split.group_of(k);
    } else {
      src = k % geo.R;
    }
    float value = scaling * y[row * width + src];
    if (base != nullptr) value += to_float(base[e]);
    out[e] = from_float<T>(value);
  }
}

// h[i, j] = scaling * sum of g[row, k] over the outputs k that decompress copies from position j (the adjoint of
// decompress_kernel's map).
template <typename T>
__global__ void decompress_adjoint_kernel(const T* __restrict__ g, float scaling, float* __restrict__ h, int64_t total,
                                          Geometry geo) {
  const GroupSplit split(geo.m, geo.R);
  for (int64_t e = first_element(); e < total; e += element_stride()) {
    const int64_t i = e / geo.R;
    const int64_t j = e - i * geo.R;
    float sum = 0.f;
    if (geo.type == 6 || geo.type == 7) {
      const int64_t row = i / geo.used;
      const int64_t b = i - row * geo.used;
      const T* gr = g + row * geo.m;
      const int64_t period = geo.blocks * geo.R;
      for (int64_t k = b * geo.R + j; k < geo.m; k += period) sum += to_float(gr[k]);
    } else if (geo.type == 2 || geo.type == 4) {
      const T* gr = g + i * geo.m + split.start(j);
      for (int64_t t = 0, size = split.size(j); t < size; ++t) sum += to_float(gr[t]);
    } else {
      const T* gr = g + i * geo.m;
      for (int64_t k = j; k < geo.m; k += geo.R) sum += to_float(gr[k]);
    }
    h[e] = scaling * sum;
  }
}

// dx[row, col] = C^T(w): types 2/3 copy w at col's group; types 1/4 and 6/7 sum over the padded positions
// p = col, col + n, ... that hold x[col]. Type 6 applies the transposed rotation first:
// w'[j] = w[j] cos[b, j] + rotate_half^T(w sin)[j], rotate_half^T(v) = concat(v[R/2:], -v[:R/2]).
template <typename T>
__global__ void compress_adjoint_kernel(const float* __restrict__ w, const float* __restrict__ cos,
                                        const float* __restrict__ sin, T* __restrict__ dx, int64_t total,
                                        Geometry geo) {
  const GroupSplit split(geo.n, geo.R);
  const int64_t half = geo.R / 2;
  for (int64_t e = first_element(); e < total; e += element_stride()) {
    const int64_t row = e / geo.n;
    const int64_t col = e - row * geo.n;
    float sum = 0.f;
    if (geo.type == 2 || geo.type == 3) {
      sum = w[row * geo.R + split.group_of(col)];
    } else if (geo.type == 6 || geo.type == 7) {
      const float* wr = w + row * geo.used * geo.R;  // p = b R + j indexes both wr and the cos/sin tables
      for (int64_t p = col; p < geo.used * geo.R; p += geo.n) {
        if (geo.type == 7) {
          sum += wr[p];
        } else {
          const int64_t j = p % geo.R;
          const int64_t q = j < half ? p + half : p - half;  // partner of j in the same block
          const float rotated = wr[q] * sin[q];
          sum += wr[p] * cos[p] + (j < half ? rotated : -rotated);
        }
      }
    } else {
      const float* wr = w + row * geo.R;
      for (int64_t p = col; p < geo.blocks * geo.R; p += geo.n) sum += wr[p % geo.R];
    }
    dx[e] = from_float<T>(sum);
  }
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
