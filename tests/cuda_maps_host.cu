// Host build of the kernels' element and tile functions (csrc/maps.cuh, csrc/gemm.cuh) for tests/test_cuda_maps.py:
// each function below runs, on the CPU, exactly what the matching kernel runs for every element, thread and block,
// so the index maps, tiling, masking, split-K, the GEMM's gathered operand (types 6/7) and its decompressing epilogue
// are checked against the float64 reference on a machine without a GPU. float32 inputs only; the dtype conversions
// of the kernels are CUDA's own intrinsics. The GEMM's mma.sync, a warp-wide instruction, is emulated warp by warp
// (multiply_tiles below) from the registers gemm.cuh's GemmFragments give each thread.
#include <cmath>
#include <cstring>
#include <stdexcept>
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

float value_of(cutlass::tfloat32_t v) {
  const uint32_t bits = v.raw();
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// acc[t] += a b for every thread t of a block, as gemm_multiply_tiles' three cute::gemm calls do on a GPU: for each
// product (small big', big small', big big', in that order), each warp and each mma.sync of its tile (atoms along
// rows, columns, depth), the 16 x 8 x 8 product D = A B^T + C that the PTX instruction defines, its A, B and C
// elements read from and written to the registers of the warp's 32 lanes at the tile coordinates the TiledMMA's
// partitions of the identity tensor give them (the layouts that place the data in those registers). The products
// of TF32 values are exact in float32; the sum is float32 in order (the tensor core's own order and truncation are
// within the error bound the tests allow, tests/helpers.py float32_error).
void multiply_tiles(const mora::GemmTiles& tiles, mora::GemmAccumulators* acc) {
  using namespace cute;
  std::vector<mora::GemmFragments> fragments;
  for (int t = 0; t < mora::kGemmThreads; ++t) fragments.emplace_back(tiles, t);
  const auto identity_a = make_identity_tensor(Shape<Int<mora::kBM>, Int<mora::kBK>>{});
  const auto identity_b = make_identity_tensor(Shape<Int<mora::kBN>, Int<mora::kBK>>{});
  using A = mora::GemmFragments::A;
  using B = mora::GemmFragments::B;
  const std::pair<A mora::GemmFragments::*, B mora::GemmFragments::*> products[] = {
      {&mora::GemmFragments::a_small, &mora::GemmFragments::b_big},
      {&mora::GemmFragments::a_big, &mora::GemmFragments::b_small},
      {&mora::GemmFragments::a_big, &mora::GemmFragments::b_big}};
  constexpr int kAtomsM = size<1>(A{}), kAtomsN = size<1>(B{}), kAtomsK = size<2>(A{});
  for (const auto& [a_part, b_part] : products)
    for (int warp = 0; warp < mora::kGemmThreads / 32; ++warp)
      for (int ka = 0; ka < kAtomsK; ++ka)
        for (int ma = 0; ma < kAtomsM; ++ma)
          for (int na = 0; na < kAtomsN; ++na) {
            // The warp's operands of this instruction, by tile coordinate; NaN where no lane holds one.
            float a[mora::kBM][mora::kBK], b[mora::kBN][mora::kBK];
            for (auto& line : a)
              for (float& v : line) v = NAN;
            for (auto& line : b)
              for (float& v : line) v = NAN;
            int a_count = 0, b_count = 0;
            for (int lane = 0; lane < 32; ++lane) {
              const int t = 32 * warp + lane;
              const auto mma = mora::GemmMma{}.get_slice(t);
              const auto coords_a = mma.partition_A(identity_a);
              const auto coords_b = mma.partition_B(identity_b);
              const A& frag_a = fragments[t].*a_part;
              const B& frag_b = fragments[t].*b_part;
              for (int v = 0; v < size<0>(frag_a); ++v, ++a_count) {
                const auto c = coords_a(v, ma, ka);
                a[get<0>(c)][get<1>(c)] = value_of(frag_a(v, ma, ka));
              }
              for (int v = 0; v < size<0>(frag_b); ++v, ++b_count) {
                const auto c = coords_b(v, na, ka);
                b[get<0>(c)][get<1>(c)] = value_of(frag_b(v, na, ka));
              }
            }
            if (a_count != 16 * 8 || b_count != 8 * 8) throw std::logic_error("an m16n8k8 atom reads 16x8 and 8x8");
            for (int lane = 0; lane < 32; ++lane) {
              const int t = 32 * warp + lane;
              const auto coords_c = mora::gemm_accumulator_coordinates(t);
              for (int v = 0; v < size<0>(acc[t]); ++v) {
                const int i = get<0>(coords_c(v, ma, na)), j = get<1>(coords_c(v, ma, na));
                float sum = acc[t](v, ma, na);
                int terms = 0;
                for (int k = 0; k < mora::kBK; ++k) {
                  if (std::isnan(a[i][k]) != std::isnan(b[j][k]))
                    throw std::logic_error("an accumulator's row and column operands cover different depths");
                  if (!std::isnan(a[i][k])) {
                    sum += a[i][k] * b[j][k];
                    ++terms;
                  }
                }
                if (terms != 8) throw std::logic_error("an m16n8k8 accumulator sums 8 products");
                acc[t](v, ma, na) = sum;
              }
            }
          }
}

// The grid of gemm.cu's launch, each block's threads run phase by phase as the barriers of gemm_kernel order them.
template <typename A, typename Out>
void run_gemm(const mora::GemmProblem<A, Out>& p, int64_t splits) {
  mora::GemmTiles tiles[2];
  std::vector<mora::GemmAccumulators> acc(mora::kGemmThreads);  // the registers of every thread of one block
  for (int64_t split = 0; split < splits; ++split)
    for (int64_t row_tile = 0; row_tile * mora::kBM < p.rows; ++row_tile)
      for (int64_t col_tile = 0; col_tile * mora::kBN < p.cols; ++col_tile) {
        const mora::GemmBlock block(p, row_tile, col_tile, split);
        for (auto& a_thread : acc) cute::clear(a_thread);
        std::vector<mora::GemmARows<A>> a_rows;  // each thread's, made once per block as in gemm_kernel
        for (int t = 0; t < mora::kGemmThreads; ++t) a_rows.emplace_back(p.a, p.rows, block.row0, t);
        std::vector<mora::GemmStaged<A>> staged(mora::kGemmThreads);
        if (block.k_begin < block.k_end)
          for (int t = 0; t < mora::kGemmThreads; ++t)
            mora::gemm_fetch_tiles(p, a_rows[t], staged[t], tiles[0], block.col0, block.k_begin, block.k_end, t);
        int buffer = 0;
        for (int64_t k0 = block.k_begin; k0 < block.k_end; k0 += mora::kBK, buffer ^= 1) {
          for (int t = 0; t < mora::kGemmThreads; ++t) mora::gemm_stage_tiles(p, staged[t], tiles[buffer], k0, t);
          if (k0 + mora::kBK < block.k_end)
            for (int t = 0; t < mora::kGemmThreads; ++t)
              mora::gemm_fetch_tiles(p, a_rows[t], staged[t], tiles[buffer ^ 1], block.col0, k0 + mora::kBK,
                                     block.k_end, t);
          multiply_tiles(tiles[buffer], acc.data());
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
