"""The fused backends against the float64 reference, with one tolerance rule, on every device they run on here.

Targets (backend, device): ``triton``/``cpu`` runs the Triton kernels through the interpreter (TRITON_INTERPRET=1,
which conftest.py sets by default): shapes stay small, the interpreter costs a few ms per (program x loop iteration),
and its dot is exact float32 whatever precision a kernel asks for. ``triton``/``cuda`` runs the compiled kernels on a
GPU of compute capability >= 8.0 with TRITON_INTERPRET not "1", and ``cuda``/``cuda`` the csrc kernels
(``benchmarks/gpu_suite.sh`` runs both: ``pytest -m gpu``). The rule (docs/design.md#tolerance-rule): float32 results,
and 16-bit ones computed in float32, lie within the float32 summation bound of the float64 truth elementwise
(``helpers.float32_error``, widened by exactly what 3xTF32 dots on tensor cores may add for Triton on a GPU), plus one
rounding to their dtype; x and M both 16-bit: at most 2x (output) / 3x (gradients) the error of plain PyTorch in
that dtype. GPU-only cases: R = 4096 and 3072, a bitwise reproducible backward, more than 2^31 output elements,
tensors on another GPU than the current one. A target that cannot run skips with the reason.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from mora_kernels import backends, diagnostics, fused, mora, ops, r_hat, reference, tuning  # noqa: E402
from mora_kernels.core import Geometry, MoRAType, rope_tables  # noqa: E402

from . import helpers  # noqa: E402
from .helpers import (  # noqa: E402
    abs_terms,
    float32_error,
    fused_targets,
    golden_case,
    golden_ids,
    plain_torch,
    product_error,
)

triton_mora = pytest.importorskip("mora_kernels.triton_mora")
triton_floor = pytest.importorskip("mora_kernels.triton_floor")

TYPES = (1, 2, 3, 4, 6, 7)


# (backend, device): the Triton kernels on CPU (interpreter) and GPU, the CUDA kernels on GPU.
TARGETS = fused_targets(("triton", "cpu"), ("triton", "cuda"), ("cuda", "cuda"))
GPU = fused_targets(("triton", "cuda"), ("cuda", "cuda"))
TRITON = fused_targets(("triton", "cpu"), ("triton", "cuda"))


@pytest.fixture(autouse=True)
def _poisoned(poison_empty):
    """torch.empty fills NaN here (conftest.poison_empty): an output element a kernel forgets shows up."""


def run_fused(backend, x, M, m, t, scaling=1.0, base=None, g=None):
    """Output and gradients (dx, dM, dbase) of sum(out * g) through ``backend``, on the inputs' device."""
    x = x.detach().requires_grad_()
    M = M.detach().requires_grad_()
    if base is not None:
        base = base.detach().requires_grad_()
    out = mora(x, M, m, t, scaling=scaling, base=base, backend=backend)
    if g is None:
        return out.detach(), None, None, None
    out.backward(g)
    return out.detach(), x.grad, M.grad, (base.grad if base is not None else None)


def check_against_float64(backend, x, M, g, m, t, scaling=1.0, base=None, expected=None, results=None):
    """Output and both gradients within float32 rounding of the float64 truth, plus one rounding to their dtype.

    For float32 x and M, and for 16-bit x (and base) with float32 M, the original release's setup, where every
    product and sum is float32 and only out and dx are rounded to x's (base's) dtype: with r that dtype's unit
    roundoff (0 for float32, whose final rounding the float32 bound counts), an element of value v computed with
    error e <= rel * S (S = ``abs_terms``) is stored within ``r |truth| + (1 + r) rel S`` of the truth.
    ``expected`` = (out, dx, dM) from the golden file, else the reference in float64 on the inputs' values.
    ``results`` = (out, dx, dM, dbase) the backend already computed for these inputs (None where not to check),
    else ``run_fused``'s, whose base requires grad: then dbase must be g exactly (``out`` is ``base + ...``, so
    its gradient in base is g, in base's dtype).
    """
    geo = Geometry(x.shape[-1], m, M.shape[0], MoRAType(t))
    if results is None:
        results = run_fused(backend, x, M, m, t, scaling, base, g)
        if base is not None:
            assert results[3] is not None, "base requires grad but got no gradient"
    out, dx, dM, dbase = results
    if expected is None:
        xd, Md = x.double().requires_grad_(), M.double().requires_grad_()
        ref = reference.forward(xd, Md, geo, None, scaling, base.double() if base is not None else None)
        ref.backward(g.double())
        expected = ref.detach(), xd.grad, Md.grad
    bounds = abs_terms(x, M, g, geo, scaling)
    # On a GPU both backends' float32 products run on tensor cores: Triton's at the float32 matmul precision in
    # force, the CUDA GEMM's always as 3xTF32 (mma.sync).
    rel = float32_error(geo, math.prod(x.shape[:-1]), tensor_cores=x.is_cuda,
                        products=product_error(backend, x.dtype, M.dtype))
    out_dtype = base.dtype if base is not None else x.dtype
    for name, got, want, bound, dtype in zip(("out", "dx", "dM"), (out, dx, dM), expected, bounds,
                                             (out_dtype, x.dtype, M.dtype)):
        if got is None:
            continue
        if name == "out" and base is not None:
            bound = bound + base.double().abs()
        assert torch.isfinite(got).all(), f"{name}: unwritten (NaN) elements"
        assert got.shape == want.shape and got.dtype == dtype, name
        info = torch.finfo(dtype)
        r = 0.0 if dtype == torch.float32 else info.eps / 2
        err = (got.double() - want.to(got.device)).abs()
        # An element whose terms are all zero must come out zero up to the dtype's smallest subnormal.
        limit = r * want.abs().to(got.device) + (1 + r) * rel * bound + max(1e-30, info.smallest_normal * info.eps)
        assert (err <= limit).all(), f"{name}: max err {err.max():.3g}, worst err/limit {(err / limit).max():.3g}"
    if dbase is not None:
        assert dbase.shape == base.shape and torch.equal(dbase, g.to(base.dtype)), "dbase: must be g exactly"


def check_low_precision(backend, x, M, g, m, t, scaling):
    """flash-attention's rule for x and M in the same 16-bit dtype: the kernel's error against float64 is at most
    2x (output) / 3x (gradients) the error of plain PyTorch in that dtype, plus a floor of one unit of the dtype's
    rounding (eps * max|truth|) for elements where the plain computation happens to round luckily."""
    geo = Geometry(x.shape[-1], m, M.shape[0], MoRAType(t))
    out, dx, dM, _ = run_fused(backend, x, M, m, t, scaling, None, g)
    xd, Md = x.double().requires_grad_(), M.double().requires_grad_()
    truth = reference.forward(xd, Md, geo, None, scaling)
    truth.backward(g.double())
    plain = plain_torch(x, M, g, geo, scaling)
    eps = torch.finfo(x.dtype).eps
    for name, got, want, base, factor in zip(("out", "dx", "dM"), (out, dx, dM), (truth.detach(), xd.grad, Md.grad),
                                             plain, (2, 3, 3)):
        assert got.dtype == x.dtype and torch.isfinite(got).all(), name
        err = (got.double() - want).abs().max().item()
        plain_err = (base.double() - want).abs().max().item()
        limit = factor * plain_err + eps * want.abs().max().item()
        assert err <= limit, f"{name}: error {err:.3g} > {factor} x plain {x.dtype} error {plain_err:.3g} + floor"


# All 60 golden cases (about 0.1 s each under the interpreter): every type, P > n, B == 1, n == 1, odd R.
@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case_id", golden_ids())
def test_golden_cases(case_id, device, backend):
    case, arrays = golden_case(case_id)
    x, M, g = (arrays[k].float().to(device) for k in ("x", "M", "g"))
    check_against_float64(backend, x, M, g, case["m"], case["mora_type"],
                          expected=(arrays["y"], arrays["dx"], arrays["dM"]))


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("t", (1, 6, 7))
def test_golden_type7_and_scaled_base(t, device, backend):
    """Scaling and the accumulate mode on a golden geometry (type 7 has no golden case of its own)."""
    gen = torch.Generator().manual_seed(t)
    x, M, g, base = (torch.randn(*shape, generator=gen).to(device) for shape in ((2, 3, 100), (20, 20), (2, 3, 37),
                                                                                 (2, 3, 37)))
    check_against_float64(backend, x, M, g, 37, t, scaling=-0.75, base=base)


@pytest.mark.parametrize("backend,device", TARGETS)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    t=st.sampled_from(TYPES),
    n=st.integers(1, 160),
    m=st.integers(1, 160),
    half_R=st.integers(1, 36),
    odd=st.booleans(),
    tokens=st.sampled_from([(1,), (3,), (2, 3), (5,)]),
    scaling=st.sampled_from([1.0, 0.5, -2.0]),
    with_base=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_float32(device, backend, t, n, m, half_R, odd, tokens, scaling, with_base, seed):
    R = 2 * half_R + (odd and t not in (6, 7))
    gen = torch.Generator().manual_seed(seed)
    x, M, g, base = (torch.randn(*shape, generator=gen).to(device) for shape in ((*tokens, n), (R, R), (*tokens, m),
                                                                                 (*tokens, m)))
    check_against_float64(backend, x, M, g, m, t, scaling, base if with_base else None)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("n,m,R", ((64, 64, 22), (37, 100, 20), (200, 64, 36)))
def test_low_precision(dtype, t, n, m, R, device, backend):
    torch.manual_seed(n + m + t)
    x = torch.randn(2, 3, n).to(device, dtype)
    M = (torch.randn(R, R) / math.sqrt(R)).to(device, dtype)
    g = torch.randn(2, 3, m).to(device, dtype)
    check_low_precision(backend, x, M, g, m, t, 0.5)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("x_dtype,m_dtype", ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.bfloat16), (torch.float32, torch.float32)))
@pytest.mark.parametrize("t", (1, 2, 3, 4))
def test_saved_compression_in_the_products_dtype(t, x_dtype, m_dtype, device, backend):
    """The Triton forward returns C(x) as its kernels read it: rows of R16 columns, zero past R, in x's dtype where x
    and M share a 16-bit one (the products round it to that on load anyway), else in float32; either way C(x) is
    summed exactly (a few 16-bit terms) and rounded once to nearest even, bit for bit, and the fake kernel names the
    same layout."""
    torch.manual_seed(t)
    n, m, R = 64, 50, 22
    geo = Geometry(n, m, R, MoRAType(t))
    x = torch.randn(5, n).bfloat16().to(device, x_dtype)  # 8-bit mantissas: float32 sums of a few are exact
    M = torch.randn(R, R).to(device, m_dtype)
    _, c = fused.forward_op(x, M, None, None, None, m, t, 0.5, backend)
    expected_dtype = x_dtype if x_dtype == m_dtype and x_dtype != torch.float32 else torch.float32
    assert (c.shape, c.dtype) == ((5, 32), expected_dtype)
    assert backends.FUSED[backend].compressed_layout(R, x_dtype, m_dtype) == (32, expected_dtype)
    assert torch.equal(c[:, :R].cpu(), reference.compress(x.cpu().double(), geo).float().to(expected_dtype))
    assert not c[:, R:].any()


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("t", TYPES)
def test_low_precision_input_with_float32_M(t, dtype, device, backend):
    """The original release's setup: 16-bit activations and base, float32 M, computed in float32 (on a GPU this is
    where a TF32 dot would show: its 2^-11 per product is far above the bound for R = 22)."""
    torch.manual_seed(t)
    n, m, R = 64, 64, 22
    x, g, base = (torch.randn(2, 3, k).to(device, dtype) for k in (n, m, m))
    M = (torch.randn(R, R) / math.sqrt(R)).to(device)
    check_against_float64(backend, x, M, g, m, t, base=base)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("t", TYPES)
def test_strided_inputs_and_leading_dims(t, device, backend):
    """Non-contiguous x, base and g (every stride reaches the kernels; nothing is copied for these views)."""
    torch.manual_seed(t)
    n, m, R = 50, 70, 12
    x = torch.randn(3, 2 * n, device=device)[:, ::2]  # last-dim stride 2
    x = torch.randn(2 * n, 3, device=device).T[:, ::2] if t % 2 else x  # transposed and strided
    M = torch.randn(R, R, device=device)
    base, g = torch.randn(m, 3, device=device).T, torch.randn(m, 3, device=device).T
    assert not x.is_contiguous() and not base.is_contiguous() and not g.is_contiguous()
    check_against_float64(backend, x, M, g, m, t, base=base)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("t", (1, 6))
def test_one_dimensional_input_and_single_output(t, device, backend):
    """x of shape (n,) (no leading dims) and m == 1."""
    torch.manual_seed(0)
    x, M, g = torch.randn(9, device=device), torch.randn(4, 4, device=device), torch.randn(1, device=device)
    check_against_float64(backend, x, M, g, 1, t)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("t", (1, 6))
def test_many_rows_split_dM(t, device, backend):
    """Enough rows (> 512) for the 64-row tiles and for dM to be split over rows, then summed in order."""
    torch.manual_seed(0)
    x, M, g = torch.randn(600, 24, device=device), torch.randn(8, 8, device=device), torch.randn(600, 10, device=device)
    check_against_float64(backend, x, M, g, 10, t)


def recorded_project_tiles(x, M, m, t, base=None):
    """The (BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages) of each projection launch ``triton_mora.forward``
    makes for these (meta) inputs, recorded, not run."""
    geo = Geometry(x.shape[-1], m, M.shape[0], MoRAType(t))
    tables = [torch.empty(geo.used_blocks, geo.R, device="meta") for _ in range(2)] if t == 6 else (None, None)
    with diagnostics.recording() as launches:
        triton_mora.forward(x, M, tables, base, geo, 0.5)
    return [(*(launch.args[k] for k in ("BLOCK_T", "BLOCK_N", "BLOCK_K")), launch.num_warps, launch.num_stages)
            for launch in launches if launch.kernel.__name__ == "_project_kernel"]


@pytest.mark.parametrize("t", (6, 7))
def test_aligned_projection_takes_its_own_tiles(t):
    """x's blocks read as 16-byte vectors (R, n, m and the strides multiples of 16, 16-byte aligned pointers, one
    copy per column) take the aligned prefill tiles; a 2-byte offset of x, R = 24, or m above B R (two copies) do
    not, and a float32 M at precision "highest" has no aligned tile of its own."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, M, base = torch.empty(100, 64, **meta), torch.empty(16, 16, **meta), torch.empty(100, 64, **meta)
    wide = tuple(tuning.DEFAULT_TILES["project/many/b16/aligned"])
    narrow = tuple(tuning.default_tile("project", triton_floor.AMode(t - 5).kind, "b16", "many"))
    assert wide != narrow
    assert recorded_project_tiles(x, M, 64, t) == [wide]
    assert recorded_project_tiles(x, M, 64, t, base) == [wide]
    assert recorded_project_tiles(torch.empty(100, 65, **meta)[:, 1:], M, 64, t) == [narrow]
    assert recorded_project_tiles(torch.empty(100, 72, **meta), torch.empty(24, 24, **meta), 64, t) == [narrow]
    assert recorded_project_tiles(x, M, 80, t) == [narrow]
    assert recorded_project_tiles(x, M.float(), 64, t) == [tuple(tuning.default_tile(
        "project", triton_floor.AMode(t - 5).kind, "f32", "many"))]


@pytest.mark.parametrize("t", (1, 3))
def test_aligned_dense_projection_takes_the_aligned_tiles(t):
    """Over C(x) with the tiled decompress (types 1/3), a projection whose 16-bit base and out rows are 16-byte
    vectors (R, n, m and the period multiples of 8, unit column strides, 16-byte aligned pointers) takes the aligned
    prefill tiles, copies or not: C(x)'s and M's rows are padded to 16 columns whatever R is. R = 20, m = 44, base 2
    bytes off alignment or in float32 do not, nor the group decompress (types 2/4), and a float32 M at precision
    "highest" keeps its own tile."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, M, base = torch.empty(100, 64, **meta), torch.empty(24, 24, **meta), torch.empty(100, 48, **meta)
    wide = tuple(tuning.DEFAULT_TILES["project/many/b16/aligned"])
    narrow = tuple(tuning.default_tile("project", "dense", "b16", "many"))
    assert wide != narrow
    assert recorded_project_tiles(x, M, 48, t) == [wide]
    assert recorded_project_tiles(x, M, 48, t, base) == [wide]
    assert recorded_project_tiles(x, M, 48, t, torch.empty(100, 49, **meta)[:, 1:]) == [narrow]
    assert recorded_project_tiles(x, torch.empty(20, 20, **meta), 40, t) == [narrow]
    assert recorded_project_tiles(x, M, 44, t) == [narrow]
    assert recorded_project_tiles(x, M, 48, t, base.float()) == [narrow]
    assert recorded_project_tiles(x, M, 48, t + 1) == [narrow]
    assert recorded_project_tiles(x, M.float(), 48, t) == [tuple(tuning.default_tile("project", "dense", "f32",
                                                                                      "many"))]


@pytest.mark.parametrize("n,m,r,t,width", [
    (4096, 4096, 256, 1, 8),  # q_proj type 1: R = 1448 = 8 * 181 (16-byte rows of bfloat16)
    (4096, 11008, 8, 6, 4),  # up_proj type 6: R = 348 = 4 * 87 (8-byte)
    (4096, 4096, 8, 6, 1),  # q_proj type 6: R = 256, all multiples of 16 (Triton's own specialization says it)
    (30, 20, 4, 7, 1),  # R = 10
    (4096, 4096, 256, 2, 8),
])
def test_projection_vector_width(n, m, r, t, width):
    """VEC, the power of two the projection kernel is told divides R, n, m, the period and the row strides
    (``triton_mora.vector_width``), for forward and backward launches: it is what makes their accesses vectors, and
    a VEC that did not divide them all would make wrong addresses on a GPU, so each is checked against the launch's
    own arguments as well as against the expected width."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    geo = Geometry(n, m, r_hat(n, m, r, t), MoRAType(t))
    x, M, base = torch.empty(64, n, **meta), torch.empty(geo.R, geo.R, **meta), torch.empty(64, m, **meta)
    tables = [torch.empty(geo.used_blocks, geo.R, device="meta") for _ in range(2)] if t == 6 else (None, None)
    with diagnostics.recording() as launches:
        out, c = triton_mora.forward(x, M, tables, base, geo, 0.5)
        triton_mora.backward(torch.empty_like(out), x if geo.t.blockwise else c, M, tables, geo, 0.5, x.dtype,
                             (True, True))
    projections = [launch.args for launch in launches if launch.kernel.__name__ == "_project_kernel"]
    assert len(projections) == 2  # forward, and backward's w = h M
    assert projections[0]["VEC"] == width
    for args in projections:
        # the largest of 16, 8, 4 dividing them all; 16 (and none) leave VEC at 1
        common = max((w for w in (16, 8, 4, 1) if all(args[name] % w == 0 for name in triton_mora.VEC_ARGS)))
        assert args["VEC"] == {16: 1, 8: 8, 4: 4, 1: 1}[common]


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("t", (1, 3, 6, 7))
@pytest.mark.parametrize("matmul_precision", ("high", "medium"), indirect=True)
def test_aligned_prefill_tiles(t, matmul_precision, device, backend):
    """The aligned prefill tiles (128 x 128 x 32, over x's blocks or C(x)) within the bound of the float64 truth:
    bfloat16 x and base with a float32 M under "high" and "medium" (their own aligned tiles), x and M both bfloat16,
    and the same x read through a view 2 bytes off alignment (the unaligned tiles for x's blocks; C(x) is the
    kernels' own)."""
    torch.manual_seed(t)
    n, m, R, T = 64, 64, 16, 100  # type 6: 4 blocks of 16 per token, 400 rows of A; types 1/3: 100 rows of C(x)
    x, g, base = (torch.randn(T, k).to(device, torch.bfloat16) for k in (n, m, m))
    M = (torch.randn(R, R) / math.sqrt(R)).to(device)
    assert recorded_project_tiles(x.to("meta"), M.to("meta"), m, t, base.to("meta")) == [
        tuple(tuning.DEFAULT_TILES[f"project/many/{'tf32' if matmul_precision == 'high' else 'rb16'}/aligned"])]
    check_against_float64(backend, x, M, g, m, t, scaling=0.5, base=base)
    check_low_precision(backend, x, M.to(torch.bfloat16), g, m, t, 0.5)
    shifted = torch.empty(T, n + 1, device=device, dtype=x.dtype)[:, 1:].copy_(x)
    check_against_float64(backend, shifted, M, g, m, t, scaling=0.5, base=base)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_no_grad_for_frozen_x(device, backend):
    """Only the gradients asked for are computed; x without grad gets none and M's is still right."""
    torch.manual_seed(0)
    x, M = torch.randn(4, 30, device=device), torch.randn(10, 10, device=device, requires_grad=True)
    mora(x, M, 20, 1, backend=backend).sum().backward()
    assert x.grad is None
    _, dM = reference.backward(torch.ones(4, 20, dtype=torch.float64, device=device), x.double(), M.detach().double(),
                               Geometry(30, 20, 10, MoRAType.SHARING))
    assert torch.allclose(M.grad.double(), dM, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_float64_falls_back_to_reference(device, backend):
    x, M = torch.randn(2, 10, dtype=torch.float64, device=device), torch.randn(4, 4, dtype=torch.float64, device=device)
    geo = Geometry(10, 6, 4, MoRAType.SHARING)
    assert torch.equal(mora(x, M, 6, 1, backend=backend), reference.forward(x, M, geo))


@pytest.mark.parametrize("backend,device", TARGETS)
def test_empty_leading_dims(device, backend):
    out = mora(torch.randn(0, 10, device=device), torch.randn(4, 4, device=device), 6, 1, backend=backend)
    assert out.shape == (0, 6)


def test_status():
    usable, reason = triton_mora.status("cpu")
    assert usable == triton_floor.interpreting() and "interpreter" in reason
    usable, reason = triton_mora.status("meta")
    assert not usable and "CUDA" in reason


class _Props:
    def __init__(self, major, minor):
        self.major, self.minor, self.name = major, minor, f"a GPU of compute capability {major}.{minor}"


@pytest.mark.parametrize("capability,usable", (((7, 5), False), ((8, 0), True), ((9, 0), True)))
def test_status_needs_compute_capability_8(monkeypatch, capability, usable):
    """bfloat16 and TF32 dots need Ampere: on an older GPU the backend reports why, and auto does not pick it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: _Props(*capability))
    got, reason = triton_mora.status("cuda")
    assert got == usable
    if not usable:
        assert "7.5" in reason and "8.0" in reason
        assert ops.resolve_backend("auto", torch.device("cuda")) != "triton"
        with pytest.raises(RuntimeError, match="compute capability 7.5"):
            ops.resolve_backend("triton", torch.device("cuda"))


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("t", (1, 2, 6))
def test_opcheck(t, dtype, device, backend):
    """torch.library.opcheck on the three registered ops (schema, fake tensors, autograd registration); bfloat16 x
    and M: the Triton forward's C(x) in bfloat16, which its fake kernel must name."""
    torch.manual_seed(0)
    n, m, R = 20, 30, 8
    x = torch.randn(3, n, device=device, dtype=dtype, requires_grad=True)
    M = torch.randn(R, R, device=device, dtype=dtype, requires_grad=True)
    cos, sin = rope_tables(R, Geometry(n, m, R, MoRAType(t)).used_blocks, device) if t == 6 else (None, None)
    base = torch.randn(3, m, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(fused.forward_op, (x, M, cos, sin, base, m, t, 0.5, backend))
    torch.library.opcheck(fused.forward_op, (x, M, cos, sin, None, m, t, 1.0, backend))
    saved = x.detach() if t == 6 else fused.forward_op(x.detach(), M.detach(), None, None, None, m, t, 1.0, backend)[1]
    g = torch.randn(3, m, device=device)
    torch.library.opcheck(fused.backward_op, (g.to(dtype), saved, M.detach(), cos, sin, n, t, dtype, True, True, 0.5,
                                              backend))
    torch.library.opcheck(fused.forward_into_op, (x.detach(), M.detach(), cos, sin, base.detach(), m, t, 0.5, backend))


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_inplace_accumulate_equals_out_of_place(t, dtype, device, backend):
    """inplace=True writes the same values as the fused out-of-place add, into base's own storage."""
    torch.manual_seed(0)
    n, m = 30, 45
    R = 8
    x = torch.randn(2, 3, n).to(device, dtype)
    M = (torch.randn(R, R) / R).to(device)
    base = torch.randn(2, 3, m).to(device, dtype)
    expected = mora(x, M, m, t, scaling=0.5, base=base, backend=backend)
    target = base.clone()
    with torch.no_grad():
        result = mora(x, M, m, t, scaling=0.5, base=target, backend=backend, inplace=True)
    assert result is target
    assert torch.equal(target, expected)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("needs_grad", ("x", "M", "base"))
def test_inplace_refused_under_autograd(needs_grad, device, backend):
    """inplace=True writes into base, which autograd cannot differentiate: refused (naming the way out) whichever
    input requires grad, and base is left untouched; under no_grad the same call runs."""
    torch.manual_seed(0)
    tensors = {"x": torch.randn(3, 20, device=device), "M": torch.randn(8, 8, device=device),
               "base": torch.randn(3, 30, device=device)}
    tensors[needs_grad].requires_grad_()
    before = tensors["base"].detach().clone()
    with pytest.raises(ValueError, match="inplace=True writes into base, which autograd cannot differentiate"):
        mora(tensors["x"], tensors["M"], 30, 1, base=tensors["base"], backend=backend, inplace=True)
    assert torch.equal(tensors["base"].detach(), before)
    with torch.no_grad():
        assert mora(tensors["x"], tensors["M"], 30, 1, base=tensors["base"], backend=backend, inplace=True) is \
            tensors["base"]


@pytest.mark.parametrize("backend,device", TARGETS)
def test_layer_inference_accumulates_in_place(device, backend):
    """MoRALinear under no_grad adds the update into the base output itself; the values equal training mode's."""
    from mora_kernels import MoRALinear

    torch.manual_seed(0)
    layer = MoRALinear(torch.nn.Linear(24, 40), 2, 6, backend=backend).to(device)
    torch.nn.init.normal_(layer.M, std=0.1)
    x = torch.randn(4, 24, device=device)
    trained = layer(x)
    calls = []
    real = fused.forward_into_op
    fused.forward_into_op = lambda *args: calls.append(1) or real(*args)
    try:
        with torch.no_grad():
            served = layer(x)
    finally:
        fused.forward_into_op = real
    assert calls and torch.equal(served, trained.detach())


# ---------------------------------------------------------------------------------------------------------------------
# Large cases, GPU only
# ---------------------------------------------------------------------------------------------------------------------


# (n, m, R): P = 0; P <= n; B == 1 with P > n and m > B R; R not a power of two and above one 64-wide tile;
# m < R (empty groups); m < B R (types 6/7 skip blocks); odd R (types 1-4 only); R = 362 as in Llama at r=16.
GPU_SHAPES = [(64, 64, 16), (100, 37, 20), (3, 40, 8), (300, 200, 98), (37, 5, 12), (1000, 150, 70), (50, 70, 13),
              (2048, 600, 362)]


@pytest.mark.parametrize("backend,device", GPU)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("n,m,R", GPU_SHAPES)
def test_shape_grid(n, m, R, t, dtype, device, backend):
    """Every type and dtype on shapes that only a GPU runs quickly, with and without base; M in x's dtype (16-bit:
    the plain-PyTorch rule) and, for 16-bit x, also float32 M (the layer's default: the float32 rule)."""
    if t in (6, 7) and R % 2:
        pytest.skip("types 6/7 need an even R")
    gen = torch.Generator(device=device).manual_seed(n + 7 * m + R + t)
    x, base, g = (torch.randn(3, 5, k, device=device, generator=gen).to(dtype) for k in (n, m, m))
    M = torch.randn(R, R, device=device, generator=gen) / R**0.5
    if dtype == torch.float32:
        check_against_float64(backend, x, M, g, m, t, 0.5)
        check_against_float64(backend, x, M, g, m, t, 0.5, base)
    else:
        check_low_precision(backend, x, M.to(dtype), g, m, t, 0.5)
        check_against_float64(backend, x, M, g, m, t, 0.5, base)


@pytest.mark.parametrize("backend,device", GPU)
@pytest.mark.parametrize("x_dtype,m_dtype", ((torch.float32,) * 2, (torch.bfloat16, torch.float32),
                                             (torch.bfloat16,) * 2), ids=("fp32", "bf16-fp32M", "bf16"))
@pytest.mark.parametrize("t", (1, 6))
@pytest.mark.parametrize("R", (4096, 3072))
def test_large_R(R, t, x_dtype, m_dtype, device, backend):
    """R = 4096 and a non-power of two, 3072 (64 and 48 column tiles, R / 16 steps of the dot), with 2 blocks and
    2 x 40 tokens: 80 or 160 rows of A, the many-rows tiles."""
    torch.manual_seed(R + t)
    n = m = 2 * R
    x = torch.randn(2, 40, n, device=device).to(x_dtype)
    M = (torch.randn(R, R, device=device) / math.sqrt(R)).to(m_dtype)
    g = torch.randn(2, 40, m, device=device).to(x_dtype)
    if x_dtype == m_dtype != torch.float32:
        check_low_precision(backend, x, M, g, m, t, 0.5)
    else:
        check_against_float64(backend, x, M, g, m, t, scaling=0.5)


@pytest.mark.parametrize("backend,device", GPU)
@pytest.mark.parametrize("t", (1, 6))
def test_backward_is_bitwise_reproducible(t, device, backend):
    """dM is reduced in a fixed order over 16 (type 1: 8192 rows of A) or 128 (type 6: 65536 rows) row splits,
    whose partials are summed in split order; dx has no reduction across programs: both bitwise equal run to run."""
    torch.manual_seed(t)
    x = torch.randn(8192, 512, device=device, dtype=torch.bfloat16)
    M = torch.randn(64, 64, device=device) / 8
    g = torch.randn(8192, 512, device=device, dtype=torch.bfloat16)
    runs = [run_fused(backend, x, M, 512, t, 1.0, None, g)[1:3] for _ in range(3)]
    for dx, dM in runs[1:]:
        assert torch.equal(dx, runs[0][0]) and torch.equal(dM, runs[0][1])


@pytest.mark.parametrize("backend,device", GPU)
@pytest.mark.parametrize("t", (1, 6))
def test_launches_on_the_tensors_device(t, device, backend):
    """Tensors on the last GPU while the first is current (a model split with device_map="auto"): the kernels must
    run on the tensors' device, not the current one (a wrong device faults or reads another GPU's memory)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices to make the current one differ from the tensors', found "
                    f"{torch.cuda.device_count()}")
    other = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.manual_seed(t)
    x = torch.randn(3, 40, 64, device=other)
    M = torch.randn(16, 16, device=other) / 4
    g = torch.randn(3, 40, 48, device=other)
    with torch.cuda.device(0):
        check_against_float64(backend, x, M, g, 48, t, scaling=0.5)


@pytest.mark.parametrize("backend,device", GPU)
def test_64_bit_offsets(device, backend):
    """More than 2^31 elements in x, base, out, g and dx (n = m = 4096, 2^19 + 3 rows, bfloat16; ~21 GB of GPU
    memory): offsets past 2^31 must not wrap. Checks the last rows (offsets past 2^31) and the first (where a wrapped
    offset would write)."""
    n = m = 4096
    rows = (1 << 31) // m + 3
    need = 5 * rows * n * 2 + (1 << 30)  # x, base, out, g, dx: 5 x 4.3 GB of bfloat16, and 1 GiB for the rest
    free = torch.cuda.mem_get_info(device)[0]
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    torch.manual_seed(0)
    x = torch.randn(rows, n, device=device, dtype=torch.bfloat16)
    base = torch.randn(rows, m, device=device, dtype=torch.bfloat16)
    g = torch.randn(rows, m, device=device, dtype=torch.bfloat16)
    M = torch.randn(16, 16, device=device) / 4
    x.requires_grad_()
    out = mora(x, M, m, 1, base=base, backend=backend)
    out.backward(g)
    for part in (slice(0, 4), slice(rows - 4, rows)):
        check_against_float64(backend, x.detach()[part], M, g[part], m, 1, base=base[part],
                              results=(out.detach()[part], x.grad[part], None, None))


# ---------------------------------------------------------------------------------------------------------------------
# PyTorch's float32 matmul precision (docs/design.md#precision)
# ---------------------------------------------------------------------------------------------------------------------

PRECISIONS = tuple(helpers.PRODUCT_ERROR)  # "highest", "high", "medium"; the fixture matmul_precision: conftest


def rounded_operands(v, precision):
    """What the mode's dot rounds a float32 operand to, computed independently of the kernels' bit arithmetic:
    TF32 ("high") keeps 11 significant bits, to nearest with ties away from zero (PTX ``cvt.rna.tf32.f32``), by
    frexp / ldexp in float64; bfloat16 ("medium") is torch's own round to nearest even."""
    if precision == "medium":
        return v.to(torch.bfloat16).to(v.dtype)
    mantissa, exponent = torch.frexp(v.double())  # v = mantissa 2^exponent, 1/2 <= |mantissa| < 1
    scaled = mantissa * 2.0**11
    return torch.ldexp(torch.sign(scaled) * torch.floor(scaled.abs() + 0.5), exponent - 11).to(v.dtype)


def test_rounded_operands_is_tf32_rounding():
    """The test's TF32 rounding: 1 + 2^-11 is a tie (away from zero: up), 1 + 2^-11 - 2^-23 rounds down."""
    v = torch.tensor([1 + 2**-11, 1 + 2**-11 - 2**-23, -(1 + 2**-11), 1 + 3 * 2**-12])
    assert rounded_operands(v, "high").tolist() == [1 + 2**-10, 1.0, -(1 + 2**-10), 1 + 2**-10]


@pytest.mark.parametrize("matmul_precision", PRECISIONS, indirect=True)
def test_dot_mode_follows_float32_matmul_precision(matmul_precision):
    """Float32 operands (float32 M, or mixed dtypes) follow the mode; x and M both 16-bit never do."""
    tl = triton_floor.tl
    want = {"highest": (tl.float32, "tf32x3", "f32"), "high": (tl.float32, "tf32", "tf32"),
            "medium": (tl.bfloat16, "ieee", "rb16")}[matmul_precision]
    for x_dtype, m_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.float16, torch.bfloat16)):
        mode = triton_floor.DotMode.of(x_dtype, m_dtype)
        assert (mode.dtype, mode.precision, mode.kind) == want
    for dtype in (torch.float16, torch.bfloat16):
        mode = triton_floor.DotMode.of(dtype, dtype)
        assert (mode.dtype, mode.precision, mode.kind) == (triton_floor.TL_DTYPE[dtype], "ieee", "b16")


def test_matmul_precision_under_the_per_backend_api():
    """A program that sets only ``torch.backends.cuda.matmul.fp32_precision`` (PyTorch's newer API; the legacy
    getter raises then) gets TF32 for "tf32", as torch.matmul does (a subprocess: the setting cannot be undone)."""
    code = ("import torch; torch.backends.cuda.matmul.fp32_precision = 'tf32'; "
            "from mora_kernels.triton_floor import DotMode, matmul_precision; "
            "print(matmul_precision(), DotMode.of(torch.float32, torch.float32).precision)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["high", "tf32"]


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("t", (1, 6, 7))
@pytest.mark.parametrize("matmul_precision", PRECISIONS, indirect=True)
def test_float32_matmul_precision(matmul_precision, t, x_dtype, device, backend):
    """Each mode within its own bound of the float64 truth (``helpers.PRODUCT_ERROR``: 3xTF32, TF32 or bfloat16
    products, plus the float32 sums); the CUDA kernels compute at "highest" whatever the mode (their bound adds
    nothing per product). R = 40: TF32's ~2^-12 sqrt(R) and bfloat16's ~2^-9 sqrt(R) per output are far above the
    "highest" bound (~N 2^-24, N ~ 100), so a kernel that ignored the mode fails
    ``test_float32_matmul_precision_changes_the_result``."""
    torch.manual_seed(t)
    n, m, R = 96, 72, 40
    x, g, base = (torch.randn(2, 3, k).to(device, x_dtype) for k in (n, m, m))
    M = (torch.randn(R, R) / math.sqrt(R)).to(device)
    check_against_float64(backend, x, M, g, m, t, scaling=0.5, base=base)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("matmul_precision", ("high", "medium"), indirect=True)
def test_float32_matmul_precision_rounds_the_operands(matmul_precision, device, backend):
    """The mode's products are exact products of rounded operands: type 7 with n = m = 3 R, so every operand of the
    dots is an input's value (A = x's blocks, h = g's, M), matches the float64 reference on inputs rounded as the
    mode rounds them within the float32 sums' bound alone (no per-product term): a dot that rounded otherwise
    (truncating TF32, or not rounding) errs by up to a unit of the rounding, 2^-11 or 2^-8 per product."""
    torch.manual_seed(0)
    R = 16
    n = m = 3 * R
    x, g = (torch.randn(2, 5, k, device=device) for k in (n, m))
    M = torch.randn(R, R, device=device) / 4
    geo = Geometry(n, m, R, MoRAType.DECOUPLED)
    out, dx, dM, _ = run_fused(backend, x, M, m, 7, 1.0, None, g)
    xr, Mr, gr = (rounded_operands(v, matmul_precision).double().requires_grad_() for v in (x, M, g))
    want = reference.forward(xr, Mr, geo, None, 1.0)
    want.backward(gr.detach())
    rel = float32_error(geo, 10, tensor_cores=x.is_cuda)
    for name, got, truth, bound in zip(("out", "dx", "dM"), (out, dx, dM), (want.detach(), xr.grad, Mr.grad),
                                       abs_terms(x, M, g, geo, 1.0)):
        err = (got.double() - truth.to(got.device)).abs()
        limit = rel * bound + 1e-30
        assert (err <= limit).all(), f"{name}: worst err/limit {(err / limit).max():.3g}"


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("precision", ("high", "medium"))
def test_float32_matmul_precision_changes_the_result(precision, device, backend):
    """A kernel that ignored the mode would fail: the 'high' and 'medium' results of the inputs of
    ``test_float32_matmul_precision`` lie outside the "highest" bound of the truth, each output and gradient."""
    torch.manual_seed(1)
    n, m, R = 96, 72, 40
    x, g = (torch.randn(2, 3, k, device=device) for k in (n, m))
    M = torch.randn(R, R, device=device) / math.sqrt(R)
    geo = Geometry(n, m, R, MoRAType.SHARING)
    xd, Md = x.double().requires_grad_(), M.double().requires_grad_()
    truth = reference.forward(xd, Md, geo, None, 1.0)
    truth.backward(g.double())
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        out, dx, dM, _ = run_fused(backend, x, M, m, 1, 1.0, None, g)
    finally:
        torch.set_float32_matmul_precision(before)
    highest = float32_error(geo, 6, tensor_cores=x.is_cuda, products=helpers.PRODUCT_ERROR["highest"])
    for name, got, want, bound in zip(("out", "dx", "dM"), (out, dx, dM), (truth.detach(), xd.grad, Md.grad),
                                      abs_terms(x, M, g, geo, 1.0)):
        assert ((got.double() - want).abs() / (highest * bound)).max() > 1, f"{name}: within the 'highest' bound"


# ---------------------------------------------------------------------------------------------------------------------
# Compiling for GPUs without one
# ---------------------------------------------------------------------------------------------------------------------


def test_launch_variants_cover_every_launcher_choice():
    """The enumeration behind compile_report runs the launchers themselves, so it holds every constexpr and pointer
    type they can pick: all three A_MODEs, with and without base, every float dtype, the float32 w = h M."""
    variants = diagnostics.launch_variants()
    project = [(signature, constexprs) for kernel, signature, constexprs, *_ in variants
               if kernel.__name__ == "_project_kernel"]
    assert {c["A_MODE"] for _, c in project} == {0, 1, 2}
    assert {c["HAS_BASE"] for _, c in project} == {False, True}
    assert {s["out_ptr"] for s, _ in project} == {"*fp32", "*fp16", "*bf16"}
    assert {s["m_ptr"] for s, _ in project} == {"*fp32", "*fp16", "*bf16"}
    # Float32 operands at each float32 matmul precision: 3xTF32, TF32, and (medium) rounded to bfloat16.
    assert {c["PRECISION"] for _, c in project if c["DOT_DTYPE"] == triton_mora.tl.float32} == {"tf32x3", "tf32"}
    assert any(c["DOT_DTYPE"] == triton_mora.tl.bfloat16 and s["m_ptr"] == "*fp32" for s, c in project)
    default_rows = {tile.block_t for key, tile in tuning.DEFAULT_TILES.items() if key.startswith("project/")}
    assert {c["BLOCK_T"] for _, c in project} == default_rows
    # Backward's w = h M: float32 h in, float32 w out, no base, here with a bfloat16 M.
    assert any(s["a_ptr"] == s["out_ptr"] == "*fp32" and s["m_ptr"] == "*bf16" and not c["HAS_BASE"]
               for s, c in project)
    assert {kernel.__name__ for kernel, *_ in variants} == {*diagnostics.KERNELS, *diagnostics.MIXED_KERNELS}
    assert {c["MODE"] for kernel, _, c, *_ in variants if kernel.__name__ == "compress_adjoint_kernel"} == {0, 1, 2, 3}


@pytest.mark.slow
def test_compiles_for_sm90_and_sm80_without_spills():
    """Every launch the launchers can make with the default dtypes (x float32, float16 or bfloat16; M float32 or x's
    dtype; base none or x's dtype) compiles for sm_90 and sm_80 (no GPU needed), spills nothing and runs its dots on
    tensor cores. Runs in a subprocess: the interpreter replaces the compiler in this one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from mora_kernels import diagnostics; "
            "print(json.dumps(diagnostics.compile_report(dtypes='defaults')))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent)  # no fixed limit: a busy machine broke 900 s
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    print()
    for row in rows:
        print(f"{row['kernel']:28s} {row['arch']} warps={row['num_warps']} regs={row['registers']:3d} "
              f"spills={row['spill_bytes']} smem={row['shared_bytes']:6d} tc={row['tensor_cores']:d}  {row['variant']}")
    assert {row["arch"] for row in rows} == {"sm_90", "sm_80"}
    assert {row["kernel"] for row in rows} == {*diagnostics.KERNELS, *diagnostics.MIXED_KERNELS}
    spilled = [row for row in rows if row["spill_bytes"]]
    assert not spilled, spilled
    dots = ("_project_kernel", "_dm_kernel", *diagnostics.MIXED_KERNELS)
    assert all(row["tensor_cores"] for row in rows if row["kernel"] in dots)
    # A100 limit (the lower one): 163 KiB of shared memory per block.
    assert all(row["shared_bytes"] <= 163 * 1024 for row in rows)


@pytest.mark.slow
def test_benchmark_launches_compile_without_spills():
    """The static report's launches (the benchmark's shapes) compiled as a real launch specializes them (sizes that
    are multiples of 16 known as such; the variants above hold none of that) spill nothing on sm_90 and sm_80, on
    this Triton: the mixed decode under "highest" (3.8) and type 6's dx (3.6) spilled 8 bytes here and nowhere in
    the generic check. Runs in a subprocess: the interpreter replaces the compiler in this one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json; from mora_kernels import sass_report; print(json.dumps(sass_report.resource_usage()))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert {row["arch"] for row in rows} == {"sm_90", "sm_80"}
    assert {"_project_kernel", "_mixed_project_kernel", "compress_adjoint_kernel"} <= {row["kernel"] for row in rows}
    spilled = [row for row in rows if row["spill_bytes"]]
    assert not spilled, spilled


def test_one_type_encoding_for_python_triton_and_cpp():
    """MoRAType is the one source of the type numbers: the Triton launchers derive their modes from it and the C++
    enum in csrc/mora.h carries the same names and values (Python passes int(MoRAType) to the CUDA ops)."""
    import re
    from pathlib import Path

    header = (Path(__file__).parent.parent / "csrc" / "mora.h").read_text()
    body = re.search(r"enum Type : int \{(.*?)\};", header, re.S).group(1)
    cpp = {name: int(value) for name, value in re.findall(r"\bk(\w+) = (\d+)", body)}
    assert cpp == {"".join(w.capitalize() for w in t.name.split("_")): int(t) for t in MoRAType}
    for t in MoRAType:
        a_mode, adjoint = triton_floor.AMode.of(t), triton_floor.AdjointMode.of(t)
        assert (a_mode != triton_floor.AMode.DENSE) == t.blockwise
        assert (a_mode == triton_floor.AMode.ROPE) == (adjoint == triton_floor.AdjointMode.ROPE) == (t == MoRAType.ROPE)
        assert (adjoint == triton_floor.AdjointMode.GROUPS) == t.compress_groups

