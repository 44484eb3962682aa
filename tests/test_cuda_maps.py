"""The CUDA backend's index maps, GEMM tiling and split-K, run on the CPU against the float64 reference.

Nothing built from CUDA runs without a GPU, but the kernels are thin loops around host+device functions
(csrc/maps.cuh, csrc/gemm.cuh). tests/cuda_maps_host.cu compiles those same functions for the host, and this module
chains them exactly as csrc/mora_ops.cpp chains the kernels (same operands, strides and split rule), so every type,
cyclic padding with P > n, B == 1, skipped blocks, ragged tiles, split-K, the forward GEMM's operand gathered from x
(types 6/7) and its decompressing epilogue (base + scaling D(.) written once per output) are checked here, the GEMM's
3xTF32 tensor-core product emulated warp by warp from the registers CuTe's partitions give each thread; only the
launch itself, the dtype conversions and the binding's allocation are left to tests/test_cuda.py on a GPU.
"""

import ctypes
import subprocess
from pathlib import Path

import pytest
import torch

from mora_kernels import cuda_build, reference
from mora_kernels.core import Geometry, MoRAType, rope_tables

from .helpers import abs_terms, float32_error, golden_case, golden_ids

ROOT = Path(__file__).resolve().parent.parent

# (n, m, R): P = 0; P = 3 <= n; B == 1 with P = 5 > n = 3 and m > B R (tiling); R = 64 and R = 70 (one and two GEMM
# column tiles, ragged); m < R (empty groups for types 2-4); for types 6/7 also m < B R (skipped blocks: 2 of 5).
GEOMETRIES = [(40, 50, 8), (37, 50, 8), (3, 20, 8), (5, 3, 8), (100, 70, 64), (130, 90, 70), (300, 100, 70),
              (40, 10, 8)]
TYPES = [1, 2, 3, 4, 6, 7]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    home = cuda_build.cuda_home()
    if home is None:
        pytest.skip("needs nvcc (a CUDA toolkit) to compile the host build of csrc/maps.cuh and csrc/gemm.cuh")
    library = tmp_path_factory.mktemp("cuda_maps_host") / "cuda_maps_host.so"
    subprocess.run(
        [str(home / "bin" / "nvcc"), "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", "-I", str(ROOT / "csrc"),
         "-I", str(cuda_build.cutlass_include_dir()), str(ROOT / "tests" / "cuda_maps_host.cu"), "-o", str(library)],
        check=True,
    )
    lib = ctypes.CDLL(str(library))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sizes = [i64, i64, i64, i64, i32]  # rows, n, m, R, type
    lib.mora_host_compress.argtypes = [p, p, p, p, *sizes]
    lib.mora_host_forward_gemm.argtypes = [p, p, p, p, p, p, p, ctypes.c_float, *sizes]
    lib.mora_host_decompress_adjoint.argtypes = [p, p, *sizes]
    lib.mora_host_compress_adjoint.argtypes = [p, p, p, p, *sizes]
    lib.mora_host_gemm.argtypes = [p, i64, i64, p, i64, i64, p, i64, i64, i64, i64]
    lib.mora_host_dM_splits.argtypes = [i64, i64]
    lib.mora_host_dM_splits.restype = i64
    lib.mora_host_split_mapped_row.argtypes = [i64, i64, p, p]
    return lib


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def gemm(lib, a, a_strides, b, b_strides, rows, cols, depth, splits=1):
    out = torch.full((splits, rows, cols), float("nan"))  # an element the kernel forgets to write fails loudly
    lib.mora_host_gemm(ptr(a), *a_strides, ptr(b), *b_strides, ptr(out), rows, cols, depth, splits)
    return out


class HostOp:
    """csrc/mora_ops.cpp's forward and backward, with the host build of each kernel."""

    def __init__(self, lib, geo: Geometry, rows: int):
        self.lib, self.geo, self.rows = lib, geo, rows
        self.mapped = rows * geo.used_blocks if geo.t.blockwise else rows
        self.sizes = (rows, geo.n, geo.m, geo.R, int(geo.t))
        self.cos = self.sin = None
        if geo.t == MoRAType.ROPE:
            self.cos, self.sin = rope_tables(geo.R, geo.used_blocks)

    def _empty(self, *shape):
        return torch.full(shape, float("nan"))

    def compress(self, x):
        c = self._empty(self.mapped, self.geo.R)
        self.lib.mora_host_compress(ptr(x), ptr(self.cos), ptr(self.sin), ptr(c), *self.sizes)
        return c

    def decompress_adjoint(self, g, scaling):
        h = self._empty(self.mapped, self.geo.R)
        self.lib.mora_host_decompress_adjoint(ptr(g), ptr(h), *self.sizes)
        return scaling * h

    def forward(self, x, M, scaling, base):
        """(out, c): types 1-4 compute c = C(x), then the GEMM decompressing into out, and return c for backward;
        types 6/7 run the GEMM alone, gathering C(x) from x (c None)."""
        c = None if self.geo.t.blockwise else self.compress(x)
        out = self._empty(self.rows, self.geo.m)  # an output the epilogue forgets to write stays NaN
        self.lib.mora_host_forward_gemm(ptr(c), ptr(x), ptr(self.cos), ptr(self.sin), ptr(M), ptr(base),
                                        ptr(out), scaling, *self.sizes)
        return out, c

    def backward(self, g, x, c, M, scaling):
        """(dx, dM) from one h = scaling D^T(g); dM with forward's c (types 1-4) or C(x) recomputed (types 6/7)."""
        R = self.geo.R
        h = self.decompress_adjoint(g, scaling)
        w = gemm(self.lib, h, (R, 1), M, (R, 1), self.mapped, R, R)[0]  # w = h M
        dx = self._empty(self.rows, self.geo.n)
        self.lib.mora_host_compress_adjoint(ptr(w), ptr(self.cos), ptr(self.sin), ptr(dx), *self.sizes)
        a = c if c is not None else self.compress(x)
        splits = self.lib.mora_host_dM_splits(R, self.mapped)
        parts = gemm(self.lib, h, (1, R), a, (R, 1), R, R, self.mapped, splits)  # dM = h^T c, split over rows
        return dx, parts.sum(0)


def assert_float32_close(name, actual, expected, bound, rel):
    """|error| <= rel * bound elementwise, ``bound`` the sum of the magnitudes of the terms behind each element
    (``abs_terms``) and ``rel`` the float32 summation bound relative to it (``float32_error``; Higham, any order of
    summation); a wrong index, tile or mask errs by O(1) of it."""
    error = (actual.double() - expected).abs()
    assert (error <= rel * bound + 1e-30).all(), f"{name}: worst error/bound {(error / (rel * bound)).max():.3g}"


def check_against_reference(host, geo: Geometry, lead: tuple[int, ...]):
    n, m, R = geo.n, geo.m, geo.R
    generator = torch.Generator().manual_seed(n * 1000 + m * 10 + int(geo.t))
    x = torch.randn(*lead, n, generator=generator)
    M = torch.randn(R, R, generator=generator) / R**0.5
    base = torch.randn(*lead, m, generator=generator)
    g = torch.randn(*lead, m, generator=generator)
    scaling = 0.5
    op = HostOp(host, geo, rows=x.numel() // n)
    rope = None if op.cos is None else (op.cos, op.sin)
    x64, M64 = x.double(), M.double()

    bound_out, bound_dx, bound_dM = abs_terms(x, M, g, geo, scaling)
    rel = float32_error(geo, op.rows, tensor_cores=True)  # the GEMM's 3xTF32 products
    expected = reference.forward(x64, M64, geo, rope, scaling, base.double())
    out, c = op.forward(x, M, scaling, base)
    assert_float32_close("out", out.reshape(expected.shape), expected, bound_out + base.double().abs(), rel)
    dx, dM = reference.backward(g.double(), x64, M64, geo, rope, scaling)
    dx_host, dM_host = op.backward(g, x, c, M, scaling)
    assert_float32_close("dx", dx_host.reshape(dx.shape), dx, bound_dx, rel)
    assert_float32_close("dM", dM_host, dM, bound_dM, rel)


@pytest.mark.parametrize("n, m, R", GEOMETRIES)
@pytest.mark.parametrize("mora_type", TYPES)
def test_host_build_matches_reference(host, n, m, R, mora_type):
    check_against_reference(host, Geometry(n=n, m=m, R=R, t=MoRAType(mora_type)), (2, 3))


@pytest.mark.parametrize("case_id", golden_ids())
def test_host_build_matches_golden_cases(host, case_id):
    case, arrays = golden_case(case_id)
    x, M, g = arrays["x"].float(), arrays["M"].float(), arrays["g"].float()
    geo = Geometry(n=case["n"], m=case["m"], R=M.shape[0], t=MoRAType(case["mora_type"]))
    op = HostOp(host, geo, rows=x.numel() // geo.n)
    bound_y, bound_dx, bound_dM = abs_terms(x, M, g, geo, 1.0)
    # 3xTF32 GEMM; the bound's + 8 covers the rounding of the float64 inputs to float32
    rel = float32_error(geo, op.rows, tensor_cores=True)
    # base None: the epilogue's path without a base (the other tests give one)
    y, c = op.forward(x, M, 1.0, None)
    assert_float32_close("y", y.reshape(arrays["y"].shape), arrays["y"], bound_y, rel)
    dx, dM = op.backward(g, x, c, M, 1.0)
    assert_float32_close("dx", dx.reshape(arrays["dx"].shape), arrays["dx"], bound_dx, rel)
    assert_float32_close("dM", dM, arrays["dM"], bound_dM, rel)


@pytest.mark.parametrize("mora_type", [1, 6])
def test_host_build_dM_with_split_k(host, mora_type):
    geo = Geometry(n=20, m=12, R=8, t=MoRAType(mora_type))  # 1024 (type 1) or 2048 (type 6) mapped rows
    rows = 1024
    assert host.mora_host_dM_splits(8, rows) > 1
    check_against_reference(host, geo, (rows,))


def test_host_split_mapped_row_is_exact_divmod(host):
    """split_mapped_row (the kernels' i // used without a 64-bit division) is the exact divmod, up to mapped-row
    counts far beyond the binding's limit (2^37). The float64 estimate was exact in every case tried here; the
    correction step covers the off-by-one that the rounding argument allows."""
    row, b = ctypes.c_int64(), ctypes.c_int64()
    for used in (1, 2, 3, 5, 7, 11, 13, 97, 1000, 4097, 65535):
        for i in (0, 1, used - 1, used, 2**31 + 5, 2**40 - 1, 2**40 + 3, 2**47 + 12345, 2**51 - 1,
                  *range(2**50, 2**50 + 40), *range(used * 2**35 - 3, used * 2**35 + 3)):
            host.mora_host_split_mapped_row(i, used, ctypes.byref(row), ctypes.byref(b))
            assert (row.value, b.value) == divmod(i, used), (i, used)


@pytest.mark.parametrize("a_strides_kind", ["row-major", "transposed"])
@pytest.mark.parametrize("b_strides_kind", ["row-major", "transposed"])
@pytest.mark.parametrize("splits", [1, 3])
def test_host_gemm_ragged_tiles_and_splits(host, a_strides_kind, b_strides_kind, splits):
    rows, cols, depth = 70, 130, 37  # none a multiple of the 64 x 64 x 16 tile; 3 splits of 16, 16 and 5
    generator = torch.Generator().manual_seed(splits)
    a = torch.randn(rows, depth, generator=generator)
    b = torch.randn(depth, cols, generator=generator)
    a_store = a.contiguous() if a_strides_kind == "row-major" else a.T.contiguous()
    b_store = b.contiguous() if b_strides_kind == "row-major" else b.T.contiguous()
    a_strides = (depth, 1) if a_strides_kind == "row-major" else (1, rows)
    b_strides = (cols, 1) if b_strides_kind == "row-major" else (1, depth)
    parts = gemm(host, a_store, a_strides, b_store, b_strides, rows, cols, depth, splits)
    N = depth + splits  # products summed within the splits, then the partials
    # 3xTF32 on tensor cores: u = 2^-23 and 5 * 2^-22 per product, as tests/helpers.py float32_error argues
    gamma = N * 2.0**-23 / (1 - N * 2.0**-23) + 5 * 2.0**-22
    assert_float32_close("gemm", parts.sum(0), a.double() @ b.double(), a.double().abs() @ b.double().abs(), gamma)
    if splits == 3:  # each split holds the product over its own slice of the depth only
        torch.testing.assert_close(parts[2].double(), a[:, 32:].double() @ b[32:].double(), rtol=0, atol=1e-5)
