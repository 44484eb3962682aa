// Host build of the kernels' element and tile functions (csrc/maps.cuh, csrc/gemm.cuh) for tests/test_cuda_maps.py:
// each function below runs, on the CPU, exactly what the matching kernel runs for every element, thread and block,
// so the index maps, tiling, masking, split-K, the GEMM's gathered operand (types 6/7) and its decompressing epilogue
// are checked against the float64 reference on a machine without a GPU. float32 inputs only; the dtype conversions
// of the kernels are CUDA's own intrinsics.
#include <vector>

#include "gemm.cuh"
#include "maps.cuh"

using mora::Geometry;

extern "C" {

void mora_host_compress(const float* x, const float* cos, const float* sin, float* c, int64_t rows, int64_t n,
                        int64_t m, int64_t R, int type) {
  const Geometry geo = mora::make_geometry(n, m, R, type);
  for (int64_t e = 0; e < mora::mapped_rows(geo, rows) * R; ++e)
    c[e] = mora::compress_at(x, cos, sin, e / R, e % R, geo);
}

void mora_host_decompress_adjoint(const float* g, float* h, int64_t rows, int64_t n, int64_t m, int64_t R,
                                  int type) {
  const Geometry geo = mora::make_geometry(n, m, R, type);
  for (int64_t e = 0; e < mora::mapped_rows(geo, rows) * R; ++e)
    h[e] = mora::decompress_adjoint_at(g, e / R, e % R, geo);
}

void mora_host_compress_adjoint(const float* w, const float* cos, const float* sin, float* dx, int64_t rows,
                                int64_t n, int64_t m, int64_t R, int type) {
  const Geometry geo = mora::make_geometry(n, m, R, type);
  for (int64_t e = 0; e < rows * n; ++e) dx[e] = mora::compress_adjoint_at(w, cos, sin, e, geo);
}

int64_t mora_host_dM_splits(int64_t R, int64_t depth) { return mora::dM_splits(R, depth); }

void mora_host_split_mapped_row(int64_t i, int64_t used, int64_t* row, int64_t* b) {
  Geometry geo = mora::make_geometry(used * 8, used * 8, 8, 7);  // used blocks of 8, m = n = used * 8
  const mora::MappedRow mapped = mora::split_mapped_row(i, geo);
  *row = mapped.row;
  *b = mapped.b;
}

}  // extern "C"

namespace {

// The grid of gemm.cu's launch, each block's threads run phase by phase as the barriers of gemm_kernel order them.
template <typename A, typename Out>
void run_gemm(const mora::GemmProblem<A, Out>& p, int64_t splits) {
  mora::GemmTiles tiles;
  float acc[mora::kGemmThreads][4][4];  // the registers of every thread of one block
  for (int64_t split = 0; split < splits; ++split)
    for (int64_t row_tile = 0; row_tile * mora::kBM < p.rows; ++row_tile)
      for (int64_t col_tile = 0; col_tile * mora::kBN < p.cols; ++col_tile) {
        const mora::GemmBlock block(p, row_tile, col_tile, split);
        for (auto& a_thread : acc)
          for (auto& line : a_thread)
            for (float& value : line) value = 0.f;
        std::vector<mora::GemmARows<A>> a_rows;  // each thread's, made once per block as in gemm_kernel
        for (int t = 0; t < mora::kGemmThreads; ++t) a_rows.emplace_back(p.a, p.rows, block.row0, t);
        for (int64_t k0 = block.k_begin; k0 < block.k_end; k0 += mora::kBK) {
          for (int t = 0; t < mora::kGemmThreads; ++t)
            mora::gemm_load_tiles(p, a_rows[t], tiles, block.row0, block.col0, k0, block.k_end, t);
          for (int t = 0; t < mora::kGemmThreads; ++t) mora::gemm_multiply_tiles(tiles, t, acc[t]);
        }
        for (int t = 0; t < mora::kGemmThreads; ++t) mora::gemm_store(p, block.row0, block.col0, split, t, acc[t]);
      }
}

}  // namespace

extern "C" {

// launch_gemm: split-K partial results.
void mora_host_gemm(const float* a, int64_t a_stride_row, int64_t a_stride_col, const float* b, int64_t b_stride_row,
                    int64_t b_stride_col, float* out, int64_t rows, int64_t cols, int64_t depth, int64_t splits) {
  run_gemm(mora::GemmProblem<mora::StridedOperand, mora::SplitStore>{{{a, a_stride_row, a_stride_col}},
                                                                     {b, b_stride_row, b_stride_col},
                                                                     {out, rows, cols},
                                                                     rows,
                                                                     cols,
                                                                     depth,
                                                                     mora::gemm_depth_per_split(depth, splits)},
           splits);
}

// launch_forward_gemm with float32 x, base and out: out = base + scaling D(a M^T), a = c (types 1-4) or C(x)
// gathered from x (types 6/7; c unused).
void mora_host_forward_gemm(const float* c, const float* x, const float* cos, const float* sin, const float* M,
                            const float* base, float* out, float scaling, int64_t rows, int64_t n, int64_t m,
                            int64_t R, int type) {
  const Geometry geo = mora::make_geometry(n, m, R, type);
  const mora::Strided m_transposed{M, 1, R};
  const mora::DecompressStore<float> store{base, out, scaling, geo};
  const int64_t mapped = mora::mapped_rows(geo, rows);
  if (mora::blockwise(geo)) {
    using A = mora::CompressedOperand<float>;
    run_gemm(mora::GemmProblem<A, mora::DecompressStore<float>>{A{x, cos, sin, geo}, m_transposed, store, mapped, R,
                                                                R, mora::gemm_depth_per_split(R, 1)},
             1);
  } else {
    run_gemm(mora::GemmProblem<mora::StridedOperand, mora::DecompressStore<float>>{
                 {{c, R, 1}}, m_transposed, store, mapped, R, R, mora::gemm_depth_per_split(R, 1)},
             1);
  }
}

}  // extern "C"
