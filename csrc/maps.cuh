// One element of each MoRA index map (MORA_SPEC.md): compress C, decompress D and their adjoints, computed in
// float32 from float32/float16/bfloat16 inputs. Host and device functions, so that tests/test_cuda_maps.py can run
// these exact functions on the CPU (through tests/cuda_maps_host.cu) against the float64 reference; the kernels in
// maps.cu only loop over elements and store.
//
// Layouts (row-major, int64 offsets): x (rows, n), out/grad (rows, m); c, y, h, w (mapped rows, R) where a mapped
// row is an input row (types 1-4) or an (input row, used block) pair (types 6/7); cos/sin (>= used, R) float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mora.h"

namespace mora {

__host__ __device__ inline float to_float(float v) { return v; }
__host__ __device__ inline float to_float(__half v) { return __half2float(v); }
__host__ __device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Split of `length` positions into `groups` contiguous groups: the first s = length mod groups hold q + 1
// positions, the rest q (spec: group split; groups are empty when length < groups).
struct GroupSplit {
  int64_t q, s;
  __host__ __device__ GroupSplit(int64_t length, int64_t groups) : q(length / groups), s(length % groups) {}
  __host__ __device__ int64_t start(int64_t group) const {
    return group < s ? group * (q + 1) : s * (q + 1) + (group - s) * q;
  }
  __host__ __device__ int64_t size(int64_t group) const { return q + (group < s ? 1 : 0); }
  __host__ __device__ int64_t group_of(int64_t position) const {
    if (q == 0) return position;
    const int64_t head = s * (q + 1);
    return position < head ? position / (q + 1) : s + (position - head) / q;
  }
};

// c[e] (e = i R + j): types 1/4 sum x over the B blocks of the cyclically padded input (xp[p] = x[p mod n]);
// types 2/3 sum x over group j of n; types 6/7 take element j of block b of xp, type 6 rotated:
// z[j] = v[j] cos[b, j] + rotate_half(v)[j] sin[b, j], rotate_half(v) = concat(-v[R/2:], v[:R/2]).
template <typename T>
__host__ __device__ inline float compress_at(const T* x, const float* cos, const float* sin, int64_t e,
                                             const Geometry& geo) {
  const int64_t i = e / geo.R;
  const int64_t j = e - i * geo.R;
  float value = 0.f;
  if (geo.type == 6 || geo.type == 7) {
    const int64_t row = i / geo.used;
    const int64_t b = i - row * geo.used;
    const T* xr = x + row * geo.n;
    const int64_t p = b * geo.R + j;  // also the offset of (b, j) in the cos/sin tables
    value = to_float(xr[p % geo.n]);
    if (geo.type == 6) {
      const int64_t half = geo.R / 2;
      const int64_t partner = j < half ? p + half : p - half;
      const float other = to_float(xr[partner % geo.n]);
      value = value * cos[p] + (j < half ? -other : other) * sin[p];
    }
  } else if (geo.type == 2 || geo.type == 3) {
    const GroupSplit split(geo.n, geo.R);
    const T* xr = x + i * geo.n + split.start(j);
    for (int64_t t = 0, size = split.size(j); t < size; ++t) value += to_float(xr[t]);
  } else {
    const T* xr = x + i * geo.n;
    for (int64_t b = 0; b < geo.blocks; ++b) value += to_float(xr[(b * geo.R + j) % geo.n]);
  }
  return value;
}

// Offset in y of the value that out[e] (e = row m + k) copies: row's k mod R (types 1/3), the group of k in the
// split of m (types 2/4), or k mod (B R) in the row's flattened blocks (types 6/7; below used R by construction).
__host__ __device__ inline int64_t decompress_source(int64_t e, const Geometry& geo) {
  const int64_t row = e / geo.m;
  const int64_t k = e - row * geo.m;
  if (geo.type == 6 || geo.type == 7) return row * geo.used * geo.R + k % (geo.blocks * geo.R);
  if (geo.type == 2 || geo.type == 4) return row * geo.R + GroupSplit(geo.m, geo.R).group_of(k);
  return row * geo.R + k % geo.R;
}

// h[e] (e = i R + j), unscaled: the sum of g over the outputs that decompress copies from position e of y.
template <typename T>
__host__ __device__ inline float decompress_adjoint_at(const T* g, int64_t e, const Geometry& geo) {
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
    const GroupSplit split(geo.m, geo.R);
    const T* gr = g + i * geo.m + split.start(j);
    for (int64_t t = 0, size = split.size(j); t < size; ++t) sum += to_float(gr[t]);
  } else {
    const T* gr = g + i * geo.m;
    for (int64_t k = j; k < geo.m; k += geo.R) sum += to_float(gr[k]);
  }
  return sum;
}

// dx[e] (e = row n + col) = C^T(w): types 2/3 copy w at col's group; types 1/4 and 6/7 sum over the padded
// positions p = col, col + n, ... that hold x[col]. Type 6 applies the transposed rotation:
// w'[j] = w[j] cos[b, j] + rotate_half^T(w sin)[j], rotate_half^T(v) = concat(v[R/2:], -v[:R/2]).
__host__ __device__ inline float compress_adjoint_at(const float* w, const float* cos, const float* sin, int64_t e,
                                                     const Geometry& geo) {
  const int64_t row = e / geo.n;
  const int64_t col = e - row * geo.n;
  if (geo.type == 2 || geo.type == 3) return w[row * geo.R + GroupSplit(geo.n, geo.R).group_of(col)];
  float sum = 0.f;
  if (geo.type == 6 || geo.type == 7) {
    const float* wr = w + row * geo.used * geo.R;  // p = b R + j indexes both wr and the cos/sin tables
    const int64_t half = geo.R / 2;
    for (int64_t p = col; p < geo.used * geo.R; p += geo.n) {
      if (geo.type == 7) {
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
