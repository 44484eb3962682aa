// One element of each MoRA index map (docs/design.md): compress C, decompress D and their adjoints, computed in
// float32 from float32/float16/bfloat16 inputs. Host and device functions, so that tests/test_cuda_maps.py can run
// these exact functions on the CPU (through tests/cuda_maps_host.cu) against the float64 reference; the kernels in
// maps.cu only loop over elements and store, and the GEMM (gemm.cuh) calls block_element's two steps
// (load_block_element, block_value) in its operand load (types 6/7) and for_each_copy in its decompressing epilogue.
//
// Layouts (row-major, int64 offsets): x (rows, n), out/grad (rows, m); c, y, h, w (mapped rows, R) where a mapped
// row is an input row (types 1-4) or an (input row, used block) pair (types 6/7); cos/sin (>= used, R) float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "mora.h"

namespace mora {

__host__ __device__ inline float to_float(float v) { return v; }
__host__ __device__ inline float to_float(__half v) { return __half2float(v); }
__host__ __device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// float32 -> T, rounding to nearest even.
template <typename T>
__host__ __device__ inline T from_float(float v);
template <>
__host__ __device__ inline float from_float<float>(float v) { return v; }
template <>
__host__ __device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls f(T{}) with the element type of `dtype` (host side of the launchers; the binding accepts only these three).
template <typename F>
inline void dispatch(Dtype dtype, F&& f) {
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

// Split of `length` positions into `groups` contiguous groups: the first s = length mod groups hold q + 1
// positions, the rest q (docs/design.md#group-split; empty when length < groups). Lengths are n or m, below 2^31
// (the binding checks): 32-bit divisions, inline on the GPU where a 64-bit one is a subroutine call whose saved
// registers spill in the GEMM's epilogue.
struct GroupSplit {
  int64_t q, s;
  __host__ __device__ GroupSplit(int64_t length, int64_t groups)
      : q(static_cast<int32_t>(length) / static_cast<int32_t>(groups)),
        s(static_cast<int32_t>(length) % static_cast<int32_t>(groups)) {}
  __host__ __device__ int64_t start(int64_t group) const {
    return group < s ? group * (q + 1) : s * (q + 1) + (group - s) * q;
  }
  __host__ __device__ int64_t size(int64_t group) const { return q + (group < s ? 1 : 0); }
  __host__ __device__ int64_t group_of(int64_t position) const {
    if (q == 0) return position;
    const int64_t head = s * (q + 1);
    const int32_t p = static_cast<int32_t>(position), h = static_cast<int32_t>(head);
    return p < h ? p / static_cast<int32_t>(q + 1) : s + (p - h) / static_cast<int32_t>(q);
  }
};

// Mapped row i of types 6/7 as (input row, used block b), i = row used + b, without a 64-bit division (a subroutine
// call on the GPU, whose saved registers spill in the GEMM): the float64 product with 1 / used is within 1 of
// i / used for i < 2^52 (two roundings of relative size 2^-53), and one correction step makes it exact.
struct MappedRow {
  int64_t row, b;
};
__host__ __device__ inline MappedRow split_mapped_row(int64_t i, const Geometry& geo) {
  int64_t row = static_cast<int64_t>(static_cast<double>(i) * geo.inv_used);
  int64_t b = i - row * geo.used;
  if (b < 0) {
    --row;
    b += geo.used;
  } else if (b >= geo.used) {
    ++row;
    b -= geo.used;
  }
  return {row, b};
}

// p mod n for the padded positions p < B R < n + R, in 32 bits (the binding keeps n + R < 2^31): a
// 64-bit division is a subroutine call, whose saved registers spill in the GEMM that gathers its operand with it.
__host__ __device__ inline int64_t wrap(int64_t p, int64_t n) {
  return static_cast<int32_t>(p) % static_cast<int32_t>(n);
}

// Element j of block b of the cyclically padded input row xr (xp[p] = xr[p mod n]), rotated for type 6:
// z[j] = v[j] cos[b, j] + rotate_half(v)[j] sin[b, j], rotate_half(v) = concat(-v[R/2:], v[:R/2]).
// In two steps, its loads (load_block_element) and its arithmetic (block_value), so that the GEMM can issue the
// loads of its next tile before its products and do the arithmetic after them; block_element chains the two.
template <typename T>
struct BlockLoads {
  T value, partner;  // xp[b R + j] and, type 6, its rotation partner xp[b R + (j +- R/2)]
  float cos, sin;    // type 6: the tables at (b, j)
};
// BlockLoads<T>{} is all zeros (its members' default constructors are trivial), and block_value of it is 0.
static_assert(std::is_trivially_default_constructible_v<__half> &&
              std::is_trivially_default_constructible_v<__nv_bfloat16>, "BlockLoads<T>{} must be zeros");

template <typename T>
__host__ __device__ inline BlockLoads<T> load_block_element(const T* xr, const float* cos, const float* sin,
                                                            int64_t b, int64_t j, const Geometry& geo) {
  const int64_t p = b * geo.R + j;  // also the offset of (b, j) in the cos/sin tables
  BlockLoads<T> loads{xr[wrap(p, geo.n)], T{}, 0.f, 0.f};
  if (geo.type == kRope) {
    const int64_t half = geo.R / 2;
    loads.partner = xr[wrap(j < half ? p + half : p - half, geo.n)];
    loads.cos = cos[p];
    loads.sin = sin[p];
  }
  return loads;
}

template <typename T>
__host__ __device__ inline float block_value(const BlockLoads<T>& loads, int64_t j, const Geometry& geo) {
  float value = to_float(loads.value);
  if (geo.type == kRope) {
    const float other = to_float(loads.partner);
    value = value * loads.cos + (j < geo.R / 2 ? -other : other) * loads.sin;
  }
  return value;
}

template <typename T>
__host__ __device__ inline float block_element(const T* xr, const float* cos, const float* sin, int64_t b, int64_t j,
                                               const Geometry& geo) {
  return block_value(load_block_element(xr, cos, sin, b, j, geo), j, geo);
}

// c[i, j] (mapped row i): types 1/4 sum x over the B blocks of the cyclically padded input; types 2/3 sum x over
// group j of n; types 6/7 (i = row used + b) take block_element j of block b of the row.
template <typename T>
__host__ __device__ inline float compress_at(const T* x, const float* cos, const float* sin, int64_t i, int64_t j,
                                             const Geometry& geo) {
  if (blockwise(geo)) {
    const MappedRow mapped = split_mapped_row(i, geo);
    return block_element(x + mapped.row * geo.n, cos, sin, mapped.b, j, geo);
  }
  float value = 0.f;
  if (compress_groups(geo)) {
    const GroupSplit split(geo.n, geo.R);
    const T* xr = x + i * geo.n + split.start(j);
    for (int64_t t = 0, size = split.size(j); t < size; ++t) value += to_float(xr[t]);
  } else {
    const T* xr = x + i * geo.n;
    for (int64_t b = 0; b < geo.blocks; ++b) value += to_float(xr[wrap(b * geo.R + j, geo.n)]);
  }
  return value;
}

// Calls f(o) for the offset o in out (rows, m) of every output that decompress copies from y[i, j] (mapped row
// i): row i's k = j, j + R, ... < m (types 1/3); the group j of the split of m (types 2/4); for types 6/7 (i the
// pair (row, block b)) k = b R + j + e B R < m. Every output is one copy of exactly one y[i, j], so the forward's
// epilogue writes each output once, and the adjoint (decompress_adjoint_at) sums g over the same offsets.
template <typename F>
__host__ __device__ inline void for_each_copy(int64_t i, int64_t j, const Geometry& geo, F&& f) {
  int64_t row = i, k = j, end = geo.m, step = geo.R;  // types 1/3
  if (blockwise(geo)) {
    const MappedRow mapped = split_mapped_row(i, geo);
    row = mapped.row;
    k = mapped.b * geo.R + j;
    step = geo.blocks * geo.R;
  } else if (decompress_groups(geo)) {
    const GroupSplit split(geo.m, geo.R);
    k = split.start(j);
    end = k + split.size(j);
    step = 1;
  }
  // One call site, so that f inlines.
  for (const int64_t offset = row * geo.m; k < end; k += step) f(offset + k);
}

// h[i, j], unscaled: the sum of g over the outputs that decompress copies from y[i, j].
template <typename T>
__host__ __device__ inline float decompress_adjoint_at(const T* g, int64_t i, int64_t j, const Geometry& geo) {
  float sum = 0.f;
  for_each_copy(i, j, geo, [&](int64_t o) { sum += to_float(g[o]); });
  return sum;
}

// dx[e] (e = row n + col) = C^T(w): types 2/3 copy w at col's group; types 1/4 and 6/7 sum over the padded
// positions p = col, col + n, ... that hold x[col]. Type 6 applies the transposed rotation:
// w'[j] = w[j] cos[b, j] + rotate_half^T(w sin)[j], rotate_half^T(v) = concat(v[R/2:], -v[:R/2]).
__host__ __device__ inline float compress_adjoint_at(const float* w, const float* cos, const float* sin, int64_t e,
                                                     const Geometry& geo) {
  const int64_t row = e / geo.n;
  const int64_t col = e - row * geo.n;
  if (compress_groups(geo)) return w[row * geo.R + GroupSplit(geo.n, geo.R).group_of(col)];
  float sum = 0.f;
  if (blockwise(geo)) {
    const float* wr = w + row * geo.used * geo.R;  // p = b R + j indexes both wr and the cos/sin tables
    const int64_t half = geo.R / 2;
    for (int64_t p = col; p < geo.used * geo.R; p += geo.n) {
      if (geo.type == kDecoupled) {
        sum += wr[p];
      } else {
        const bool first_half = p % geo.R < half;
        const int64_t q = first_half ? p + half : p - half;  // partner of p in the same block
        const float rotated = wr[q] * sin[q];
        sum += wr[p] * cos[p] + (first_half ? rotated : -rotated);
      }
    }
  } else {
    const float* wr = w + row * geo.R;
    for (int64_t p = col; p < geo.blocks * geo.R; p += geo.n) sum += wr[p % geo.R];
  }
  return sum;
}

}  // namespace mora
