// Launchers of the MoRA CUDA kernels (docs/design.md#cuda-data-flow), callable from the torch binding (mora_ops.cpp).
//
// This header and the .cu files include no torch header: nvcc compiles each kernel file in ~2 s instead of ~120 s
// (docs/design.md#cuda-build). The binding validates every argument, allocates, sets device and stream, and checks each
// launch with C10_CUDA_KERNEL_LAUNCH_CHECK(); every launcher here launches at most one kernel.
//
// The passes (float32 arithmetic; docs/design.md's C and D, mirroring the Triton backend's structure):
//   forward:  types 1-4: c = C(x) (compress kernel, R floats per row, kept by autograd for dM), then one GEMM
//             whose epilogue stores each result of c M^T, times scaling plus base, cast to out's dtype, straight to
//             every output that copies it: y = c M^T never exists and out is written once.
//             types 6/7: that GEMM alone, loading its left operand C(x) straight from x (gather at (b R + j) mod n,
//             type 6 rotated with the float32 cos/sin tables): neither the padded nor the rotated input exists.
//   backward: h = scaling D^T(g), computed once for both gradients;
//             dx = C^T(w), w = h M;  dM = sum over rows of h^T c (deterministic split-K, fixed-order sum), with the
//             saved c (types 1-4) or c = C(x) recomputed by the compress kernel (types 6/7).
// For types 1-4 c, y, h, w have one row of R values per input row; for types 6/7 one row per (input row, used
// block), so that the same GEMM applies M to every block.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace mora {

#ifdef __CUDACC__
#define MORA_HOST_DEVICE __host__ __device__
#else
#define MORA_HOST_DEVICE
#endif

// The MoRA types, numbered as mora_kernels.core.MoRAType, the one source of the encoding (Python passes
// int(MoRAType) to the ops; tests/test_cuda_build.py checks that these values and names agree with it).
enum Type : int {
  kSharing = 1,         // SHARING: compress strided block sum, decompress tile
  kGrouped = 2,         // GROUPED: contiguous groups, repeat-interleave
  kGroupedTile = 3,     // GROUPED_TILE: contiguous groups, tile
  kSharingGrouped = 4,  // SHARING_GROUPED: strided block sum, repeat-interleave
  kRope = 6,            // ROPE: rotated decoupled blocks
  kDecoupled = 7,       // DECOUPLED: decoupled blocks without the rotation
};

// Element type of x, base, out, grad, dx or dM. M enters the GEMM converted to float32 by the binding.
enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Sizes of one MoRA application; the same meaning as mora_kernels.core.Geometry.
struct Geometry {
  int64_t n;       // in_features
  int64_t m;       // out_features
  int64_t R;       // square size
  int64_t blocks;  // B = ceil(n / R)
  int64_t used;    // blocks that can reach the output (types 6/7 skip the rest); B for types 1-4
  int type;        // a Type: 1, 2, 3, 4, 6 or 7
  double inv_used;  // 1 / used, for split_mapped_row (maps.cuh)
};

// Types 6/7 apply M to each block of the padded input (mora_kernels.core.MoRAType.blockwise and the two below).
MORA_HOST_DEVICE inline bool blockwise(const Geometry& geo) { return geo.type == kRope || geo.type == kDecoupled; }
MORA_HOST_DEVICE inline bool compress_groups(const Geometry& geo) {
  return geo.type == kGrouped || geo.type == kGroupedTile;
}
MORA_HOST_DEVICE inline bool decompress_groups(const Geometry& geo) {
  return geo.type == kGrouped || geo.type == kSharingGrouped;
}

// The geometry of n inputs, m outputs, square size R and type 1-4, 6 or 7 (sizes already validated).
inline Geometry make_geometry(int64_t n, int64_t m, int64_t R, int type) {
  Geometry geo{n, m, R, (n + R - 1) / R, 0, type, 0.0};
  const int64_t reaching = (m + R - 1) / R;  // blocks of R outputs
  geo.used = blockwise(geo) && reaching < geo.blocks ? reaching : geo.blocks;
  geo.inv_used = 1.0 / static_cast<double>(geo.used);
  return geo;
}

// Rows of c, y, h and w for `rows` input rows.
inline int64_t mapped_rows(const Geometry& geo, int64_t rows) { return blockwise(geo) ? rows * geo.used : rows; }

// c (mapped_rows x R, float32) = C(x), x: (rows x n). cos/sin: float32 (>= used, R) rows, type 6 only.
void launch_compress(const void* x, Dtype x_dtype, const float* cos, const float* sin, float* c, int64_t rows,
                     const Geometry& geo, cudaStream_t stream);

// h (mapped_rows x R, float32) = scaling * D^T(g), g: (rows x m).
void launch_decompress_adjoint(const void* g, Dtype g_dtype, float scaling, float* h, int64_t rows,
                               const Geometry& geo, cudaStream_t stream);

// dx (rows x n) = C^T(w), w: (mapped_rows x R, float32).
void launch_compress_adjoint(const float* w, const float* cos, const float* sin, void* dx, Dtype dx_dtype,
                             int64_t rows, const Geometry& geo, cudaStream_t stream);

// A float32 operand read through strides: element (i, k) at data[i * stride_row + k * stride_col].
struct Strided {
  const float* data;
  int64_t stride_row;
  int64_t stride_col;
};

// Tile sizes of the GEMM (gemm.cuh); the binding needs them for its grid-size checks and its split-K choice.
constexpr int kGemmTileRows = 64;
constexpr int kGemmTileCols = 64;
constexpr int kGemmTileDepth = 16;

// out (rows x m, out_dtype) = base + scaling * D(a M^T) by one GEMM (decompress in its epilogue); M: float32 (R, R);
// base may be null and has out_dtype. a = c (float32, mapped_rows x R) for types 1-4, where x is unused; a = C(x)
// gathered from x (rows x n, x_dtype; cos/sin as for launch_compress) for types 6/7, where c is unused.
void launch_forward_gemm(const float* c, const void* x, Dtype x_dtype, const float* cos, const float* sin,
                         const float* M, const void* base, void* out, Dtype out_dtype, float scaling, int64_t rows,
                         const Geometry& geo, cudaStream_t stream);

// Depth splits of the dM product (a sum over all mapped rows): enough thread blocks to fill a GPU when R is small,
// each split at least 512 rows deep. A function of the shape only, so dM is bitwise reproducible from run to run.
inline int64_t dM_splits(int64_t R, int64_t depth) {
  const int64_t tiles_per_side = (R + kGemmTileCols - 1) / kGemmTileCols;
  int64_t splits = 512 / (tiles_per_side * tiles_per_side);
  if (depth / 512 < splits) splits = depth / 512;
  if (splits > 64) splits = 64;
  return splits < 1 ? 1 : splits;
}

// out[s][i][j] = sum over k in split s of a(i, k) b(k, j), for i < rows, j < cols, k < depth; `splits` slices of
// the depth write `splits` float32 (rows x cols) partial results one after the other (no atomics: deterministic).
void launch_gemm(Strided a, Strided b, float* out, int64_t rows, int64_t cols, int64_t depth, int64_t splits,
                 cudaStream_t stream);

// out (count, out_dtype) = sum over s < splits of parts[s * count + i], in the order s = 0, 1, ... (deterministic).
void launch_sum_splits(const float* parts, int64_t splits, int64_t count, void* out, Dtype out_dtype,
                       cudaStream_t stream);

}  // namespace mora
