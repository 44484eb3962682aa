// Torch binding of the MoRA CUDA kernels: schemas (TORCH_LIBRARY), argument validation, allocation, device guard,
// current stream, and a launch check after every kernel. The kernels themselves (maps.cu, gemm.cu) see no torch
// header; see mora.h for the passes (forward: compress for types 1-4, then one GEMM that decompresses in its
// epilogue; types 6/7 gather C(x) from x inside that GEMM).
//
// Ops (namespace mora_cuda), the 2-D launchers behind mora_kernels/fused.py's ops (fake tensors and autograd are
// registered there, once for every backend):
//   forward(x, M, base?, cos?, sin?, out_features, mora_type, scaling, out?)
//       -> (base + scaling * D(M C(x)), c): x (rows, n); the sum is written into `out` when given (it may be base
//          itself: the GEMM epilogue reads each base element and writes the same output element in one thread), else
//          into a new tensor. c = C(x), float32 (rows, R), for types 1-4 (autograd keeps it for dM); an empty float32
//          tensor for types 6/7, whose backward recomputes C(x) from x.
//   backward(grad, x?, c?, M, cos?, sin?, in_features, mora_type, scaling, x_dtype, compute_dx, compute_dM)
//       -> (dx (rows, in_features) in x_dtype, dM in M's dtype), h = scaling D^T(grad) computed once for both; a
//          gradient not asked for is an empty tensor. Types 1-4 take forward's c (x is not needed and not kept);
//          types 6/7 take x (C(x) is recomputed from it) and no c.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "mora.h"

namespace {

using mora::Geometry;

// The GEMM puts the row tiles on grid.x (at most 2^31 - 1) and the column tiles (R / 64) on grid.y (at most 65535).
constexpr int64_t kMaxRowTiles = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxSquare = int64_t{65535} * mora::kGemmTileCols;
// Positions within a row (below n + R or m) use 32-bit divisions in the kernels (maps.cuh: wrap, GroupSplit).
constexpr int64_t kMaxFeatures = (int64_t{1} << 31) - 1;

mora::Dtype kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return mora::Dtype::kFloat32;
    case at::kHalf:
      return mora::Dtype::kFloat16;
    case at::kBFloat16:
      return mora::Dtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16 for the CUDA backend, got ",
                       t.scalar_type());
  }
  return mora::Dtype::kFloat32;  // unreachable
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  kernel_dtype(t, name);
}

// Validated sizes of one call; `rows` is the product of x's leading dims.
struct Problem {
  Geometry geo;
  int64_t rows;
  const float* cos;
  const float* sin;
};

// `x` is the tensor the others must sit beside (x in forward, grad in backward), n = in_features, rows = tokens.
Problem validate(const at::Tensor& x, int64_t n, int64_t rows, const at::Tensor& M, const std::optional<at::Tensor>& cos,
                 const std::optional<at::Tensor>& sin, int64_t out_features, int64_t mora_type) {
  TORCH_CHECK_VALUE(n >= 1, "in_features must be >= 1, got ", n);
  check_tensor(M, "M", x);
  TORCH_CHECK_VALUE(M.dim() == 2 && M.size(0) == M.size(1) && M.size(0) >= 1,
                    "M must be a square matrix (R, R) with R >= 1, got shape ", M.sizes());
  TORCH_CHECK_VALUE(mora_type == mora::kSharing || mora_type == mora::kGrouped || mora_type == mora::kGroupedTile ||
                        mora_type == mora::kSharingGrouped || mora_type == mora::kRope || mora_type == mora::kDecoupled,
                    "mora_type must be one of 1, 2, 3, 4, 6, 7, got ", mora_type);
  TORCH_CHECK_VALUE(out_features >= 1 && out_features <= kMaxFeatures,
                    "out_features must be in [1, 2^31 - 1] for the CUDA backend, got ", out_features);
  const Geometry geo = mora::make_geometry(n, out_features, M.size(0), static_cast<int>(mora_type));
  TORCH_CHECK_VALUE(!mora::blockwise(geo) || geo.R % 2 == 0, "M: type ", mora_type,
                    " rotates half blocks and needs an even square size R, got R=", geo.R);
  TORCH_CHECK_VALUE(geo.R <= kMaxSquare, "M: square size R=", geo.R, " exceeds the CUDA backend's limit ", kMaxSquare);
  TORCH_CHECK_VALUE(geo.n + geo.R <= kMaxFeatures, "x: in_features=", geo.n, " plus the square size R=", geo.R,
                    " must not exceed 2^31 - 1 for the CUDA backend (32-bit index arithmetic within a row)");
  TORCH_CHECK_VALUE((mora::mapped_rows(geo, rows) + mora::kGemmTileRows - 1) / mora::kGemmTileRows <= kMaxRowTiles,
                    "x: ", rows, " rows are too many for the CUDA backend's grid");

  Problem problem{geo, rows, nullptr, nullptr};
  if (geo.type == mora::kRope) {
    TORCH_CHECK_VALUE(cos.has_value() && sin.has_value(),
                      "type 6 needs the rope tables cos and sin (mora_kernels.core.rope_tables)");
    for (const auto& [table, name] : {std::pair{&*cos, "rope cos"}, std::pair{&*sin, "rope sin"}}) {
      check_tensor(*table, name, x);
      TORCH_CHECK_TYPE(table->scalar_type() == at::kFloat, name, " must be float32, got ", table->scalar_type());
      TORCH_CHECK_VALUE(table->dim() == 2 && table->size(1) == geo.R && table->size(0) >= geo.used, name,
                        " must have shape (>= ", geo.used, ", ", geo.R, "), got ", table->sizes());
    }
    problem.cos = cos->data_ptr<float>();
    problem.sin = sin->data_ptr<float>();
  } else {
    TORCH_CHECK_VALUE(!cos.has_value() && !sin.has_value(), "rope tables are only used by type 6, got mora_type=",
                      mora_type);
  }
  return problem;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out_features;
  return shape;
}

cudaStream_t current_stream(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.get_device()).stream(); }

// c = C(x), float32 (mapped rows, R).
at::Tensor compress(const at::Tensor& x, const Problem& p, cudaStream_t stream) {
  at::Tensor c = at::empty({mora::mapped_rows(p.geo, p.rows), p.geo.R}, x.options().dtype(at::kFloat));
  mora::launch_compress(x.data_ptr(), kernel_dtype(x, "x"), p.cos, p.sin, c.data_ptr<float>(), p.rows, p.geo,
                        stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c;
}

// h = scaling * D^T(grad), float32 (mapped rows, R).
at::Tensor decompress_adjoint(const at::Tensor& grad, const Problem& p, double scaling, cudaStream_t stream) {
  at::Tensor h = at::empty({mora::mapped_rows(p.geo, p.rows), p.geo.R}, grad.options().dtype(at::kFloat));
  mora::launch_decompress_adjoint(grad.data_ptr(), kernel_dtype(grad, "grad"), static_cast<float>(scaling),
                                  h.data_ptr<float>(), p.rows, p.geo, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

// `t` (grad or base) must have x's leading dims and out_features.
void check_out_like(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t out_features) {
  check_tensor(t, name, x);
  const std::vector<int64_t> expected = out_shape(x, out_features);
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), name, " must have shape ", at::IntArrayRef(expected),
                    " (x's leading dims, out_features), got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> mora_forward(const at::Tensor& x, const at::Tensor& M,
                                                const std::optional<at::Tensor>& base,
                                                const std::optional<at::Tensor>& cos,
                                                const std::optional<at::Tensor>& sin, int64_t out_features,
                                                int64_t mora_type, double scaling,
                                                const std::optional<at::Tensor>& out_arg) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) >= 1, "x must have shape (rows, in_features) with in_features >= 1, got ",
                    x.sizes());
  check_tensor(x, "x", x);
  const Problem p = validate(x, x.size(1), x.size(0), M, cos, sin, out_features, mora_type);
  if (base.has_value()) check_out_like(*base, "base", x, out_features);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = current_stream(x);
  const at::Tensor out_like = base.has_value() ? *base : x;
  at::Tensor out;
  if (out_arg.has_value()) {
    check_out_like(*out_arg, "out", x, out_features);
    TORCH_CHECK_TYPE(out_arg->scalar_type() == out_like.scalar_type(), "out must have ",
                     base.has_value() ? "base's" : "x's", " dtype ", out_like.scalar_type(), ", got ",
                     out_arg->scalar_type());
    out = *out_arg;
  } else {
    out = at::empty(out_shape(x, out_features), out_like.options());
  }
  const at::Tensor M32 = M.to(at::kFloat).contiguous();
  // Types 1-4: c = C(x) first (R floats per row); types 6/7: the GEMM gathers C(x) from x as it loads its tiles.
  const bool blockwise = mora::blockwise(p.geo);
  at::Tensor c = blockwise ? at::empty({0, p.geo.R}, x.options().dtype(at::kFloat)) : compress(x, p, stream);
  mora::launch_forward_gemm(blockwise ? nullptr : c.data_ptr<float>(), x.data_ptr(), kernel_dtype(x, "x"), p.cos,
                            p.sin, M32.data_ptr<float>(), base.has_value() ? base->data_ptr() : nullptr,
                            out.data_ptr(), kernel_dtype(out, "out"), static_cast<float>(scaling), p.rows, p.geo,
                            stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, c};
}
std::tuple<at::Tensor, at::Tensor> mora_backward(const at::Tensor& grad, const std::optional<at::Tensor>& x,
                                                 const std::optional<at::Tensor>& c, const at::Tensor& M,
                                                 const std::optional<at::Tensor>& cos,
                                                 const std::optional<at::Tensor>& sin, int64_t in_features,
                                                 int64_t mora_type, double scaling, at::ScalarType x_dtype,
                                                 bool compute_dx, bool compute_dM) {
  TORCH_CHECK_VALUE(grad.dim() == 2, "grad must have shape (rows, out_features), got ", grad.sizes());
  check_tensor(grad, "grad", grad);
  const Problem p = validate(grad, in_features, grad.size(0), M, cos, sin, grad.size(1), mora_type);
  const int64_t R = p.geo.R;
  const int64_t rows = mora::mapped_rows(p.geo, p.rows);
  if (mora::blockwise(p.geo)) {
    TORCH_CHECK_VALUE(x.has_value() && !c.has_value(), "types 6/7 recompute C(x) from x: pass x and c=None, got ",
                      x.has_value() ? "c" : "no x");
    check_tensor(*x, "x", grad);
    TORCH_CHECK_VALUE(x->dim() == 2 && x->size(0) == p.rows && x->size(1) == in_features, "x must have shape (",
                      p.rows, ", ", in_features, "), got ", x->sizes());
  } else {
    TORCH_CHECK_VALUE(c.has_value(), "types 1-4 need forward's c = C(x) (x is not kept), got c=None");
    check_tensor(*c, "c", grad);
    TORCH_CHECK_TYPE(c->scalar_type() == at::kFloat, "c must be float32 (forward's C(x)), got ", c->scalar_type());
    TORCH_CHECK_VALUE(c->dim() == 2 && c->size(0) == rows && c->size(1) == R, "c must have shape (", rows, ", ", R,
                      ") (grad's rows, R), got ", c->sizes());
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = current_stream(grad);
  at::Tensor dx = at::empty({0, in_features}, grad.options().dtype(x_dtype));
  at::Tensor dM = at::empty({0, R}, M.options());
  kernel_dtype(dx, "x_dtype");
  if (!compute_dx && !compute_dM) return {dx, dM};
  const at::Tensor h = decompress_adjoint(grad, p, scaling, stream);
  if (compute_dx) {
    const at::Tensor M32 = M.to(at::kFloat).contiguous();
    at::Tensor w = at::empty_like(h);
    // w = h M (w[j] = sum_k M[k, j] h[k], i.e. M^T applied to each row h).
    mora::launch_gemm({h.data_ptr<float>(), R, 1}, {M32.data_ptr<float>(), R, 1}, w.data_ptr<float>(), rows, R, R,
                      1, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dx = at::empty({p.rows, in_features}, grad.options().dtype(x_dtype));
    mora::launch_compress_adjoint(w.data_ptr<float>(), p.cos, p.sin, dx.data_ptr(), kernel_dtype(dx, "x_dtype"),
                                  p.rows, p.geo, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (compute_dM) {
    const at::Tensor a = c.has_value() ? *c : compress(*x, p, stream);
    const int64_t splits = mora::dM_splits(R, rows);
    at::Tensor parts = at::empty({splits, R, R}, grad.options().dtype(at::kFloat));
    // dM[a, b] = sum over rows i of h[i, a] c[i, b]: the left operand is h transposed.
    mora::launch_gemm({h.data_ptr<float>(), 1, R}, {a.data_ptr<float>(), R, 1}, parts.data_ptr<float>(), R, R, rows,
                      splits, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dM = at::empty({R, R}, M.options());
    mora::launch_sum_splits(parts.data_ptr<float>(), splits, R * R, dM.data_ptr(), kernel_dtype(M, "M"), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dx, dM};
}
}  // namespace

TORCH_LIBRARY(mora_cuda, m) {
  m.def("forward(Tensor x, Tensor M, Tensor? base, Tensor? cos, Tensor? sin, int out_features, int mora_type, "
        "float scaling, Tensor(a!)? out=None) -> (Tensor, Tensor)");
  m.def("backward(Tensor grad, Tensor? x, Tensor? c, Tensor M, Tensor? cos, Tensor? sin, int in_features, "
        "int mora_type, float scaling, ScalarType x_dtype, bool compute_dx, bool compute_dM) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mora_cuda, CUDA, m) {
  m.impl("forward", &mora_forward);
  m.impl("backward", &mora_backward);
}
