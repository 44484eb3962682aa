"""The Triton backend against the float64 reference, on CPU through the Triton interpreter (TRITON_INTERPRET=1).

Shapes stay small: the interpreter costs a few ms per (program x loop iteration).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from mora_kernels import mora, reference  # noqa: E402
from mora_kernels.core import Geometry, MoRAType  # noqa: E402

triton_mora = pytest.importorskip("mora_kernels.triton_mora")

if not triton_mora.status("cpu")[0]:
    pytest.skip("the Triton interpreter is not active (TRITON_INTERPRET=1 before importing triton)",
                allow_module_level=True)

GOLDEN = Path(__file__).parent / "data" / "mora_cases.npz"
TYPES = (1, 2, 3, 4, 6, 7)


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every float buffer from torch.empty starts as NaN, so an output element a kernel forgets shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", empty)


def run_triton(x, M, m, t, scaling=1.0, base=None, g=None):
    """Output and gradients (dx, dM, dbase) of sum(out * g) through the Triton backend."""
    x = x.detach().requires_grad_()
    M = M.detach().requires_grad_()
    if base is not None:
        base = base.detach().requires_grad_()
    out = mora(x, M, m, t, scaling=scaling, base=base, backend="triton")
    if g is None:
        return out.detach(), None, None, None
    out.backward(g)
    return out.detach(), x.grad, M.grad, (base.grad if base is not None else None)


def abs_terms(x, M, g, geo, scaling):
    """Sums of the absolute values of the terms behind each output and gradient element (float64).

    A float32 sum of N terms is off by at most gamma_N = N u / (1 - N u) times the sum of their absolute values
    (u = 2^-24), so these bound the kernel's rounding error elementwise. For type 6 a rotated value is
    ``v_j cos + (+-v_j') sin`` with |cos|, |sin| <= 1, bounded by ``|v_j| + |v_j'|``: the bound uses type 7 on
    absolute values with each block's halves added (``roll`` by R/2), forward and adjoint alike.
    """
    x, M, g = x.double().abs(), M.double().abs(), g.double().abs()
    rope = geo.t == MoRAType.ROPE
    geo7 = Geometry(geo.n, geo.m, geo.R, MoRAType.DECOUPLED) if rope else geo
    c = reference.compress(x, geo7)
    if rope:
        c = c + c.roll(geo.R // 2, -1)
    out = reference.decompress(c @ M.T, geo7) * abs(scaling)
    h = reference.decompress_adjoint(g, geo7) * abs(scaling)
    w = h @ M
    if rope:
        w = w + w.roll(geo.R // 2, -1)
    dx = reference.compress_adjoint(w, geo7)
    dM = h.reshape(-1, geo.R).T @ c.reshape(-1, geo.R)
    return out, dx, dM


def gamma(geo, tokens):
    """gamma_N for the longest chain of float32 roundings in any element: the block/group sums of compress and
    of both adjoints (at most B + copies + folds terms), the R products of the dot, the token reduction of dM,
    scaling and the base add, and the rounding of float64 inputs to float32 (one each for x, M, g)."""
    blocks = geo.blocks
    copies = geo.m // geo.R + 2
    N = blocks + copies + (blocks + 1) + geo.R + tokens * max(geo.used_blocks, 1) + 8
    u = 2.0**-24
    return N * u / (1 - N * u)


def check_float32(x, M, g, m, t, scaling=1.0, base=None, expected=None):
    """Output and both gradients of the Triton backend within the float32 rounding bound of the float64 truth."""
    geo = Geometry(x.shape[-1], m, M.shape[0], MoRAType(t))
    x32, M32, g32 = x.float(), M.float(), g.float()
    base32 = base.float() if base is not None else None
    out, dx, dM, dbase = run_triton(x32, M32, m, t, scaling, base32, g32)
    if expected is None:
        xd, Md = x.double().requires_grad_(), M.double().requires_grad_()
        ref = reference.forward(xd, Md, geo, None, scaling, base.double() if base is not None else None)
        ref.backward(g.double())
        expected = ref.detach(), xd.grad, Md.grad
    bounds = abs_terms(x, M, g, geo, scaling)
    gam = gamma(geo, math.prod(x.shape[:-1]))
    base_abs = base.double().abs() if base is not None else 0.0
    for name, got, want, bound in zip(("out", "dx", "dM"), (out, dx, dM), expected, bounds):
        if name == "out":
            bound = bound + base_abs
        assert torch.isfinite(got).all(), f"{name}: unwritten (NaN) elements"
        assert got.shape == want.shape and got.dtype == torch.float32, name
        err = (got.double() - want).abs()
        # 1e-30: an element whose terms are all exactly zero must come out exactly zero up to denormals.
        limit = gam * bound + 1e-30
        assert (err <= limit).all(), f"{name}: max err {err.max():.3g}, worst err/limit {(err / limit).max():.3g}"
    if base is not None:
        assert torch.equal(dbase, g32)


def golden_cases():
    with np.load(GOLDEN) as z:
        index = json.loads(bytes(z["index.json"]))
        return [(case, {k: torch.from_numpy(z[f"{case['id']}/{k}"]) for k in ("x", "M", "y", "g", "dx", "dM")})
                for case in index]


GOLDEN_CASES = golden_cases()


# All 60 golden cases (about 0.1 s each under the interpreter): every type, P > n, B == 1, n == 1, odd R.
@pytest.mark.parametrize("case,arrays", GOLDEN_CASES, ids=[c["id"] for c, _ in GOLDEN_CASES])
def test_golden_cases(case, arrays):
    check_float32(arrays["x"], arrays["M"], arrays["g"], case["m"], case["mora_type"],
                  expected=(arrays["y"], arrays["dx"], arrays["dM"]))


@pytest.mark.parametrize("t", (1, 6, 7))
def test_golden_type7_and_scaled_base(t):
    """Scaling and the accumulate mode on a golden geometry (type 7 has no golden case of its own)."""
    torch.manual_seed(t)
    x, M = torch.randn(2, 3, 100, dtype=torch.float64), torch.randn(20, 20, dtype=torch.float64)
    check_float32(x, M, torch.randn(2, 3, 37, dtype=torch.float64), 37, t, scaling=-0.75,
                  base=torch.randn(2, 3, 37, dtype=torch.float64))


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
def test_random_shapes_float32(t, n, m, half_R, odd, tokens, scaling, with_base, seed):
    R = 2 * half_R + (odd and t not in (6, 7))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, n, generator=gen, dtype=torch.float64).float().double()
    M = torch.randn(R, R, generator=gen, dtype=torch.float64).float().double()
    g = torch.randn(*tokens, m, generator=gen, dtype=torch.float64).float().double()
    base = torch.randn(*tokens, m, generator=gen, dtype=torch.float64).float().double() if with_base else None
    check_float32(x, M, g, m, t, scaling, base)


def plain_low_precision(x, M, g, geo, scaling):
    """What plain PyTorch computes for MoRA in x's 16-bit dtype: the reference's maps, every op in that dtype."""
    rope = geo.t == MoRAType.ROPE
    tables = [table.to(x.dtype) for table in reference._rope(geo, None, x.device)] if rope else None
    c = reference.compress(x, geo, tables)
    out = reference.decompress(c @ M.T, geo) * scaling
    h = reference.decompress_adjoint(g, geo) * scaling
    dx = reference.compress_adjoint(h @ M, geo, tables)
    dM = h.reshape(-1, geo.R).T @ c.reshape(-1, geo.R)
    return out, dx, dM


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("n,m,R", ((64, 64, 22), (37, 100, 20), (200, 64, 36)))
def test_low_precision(dtype, t, n, m, R):
    """flash-attention's rule: the kernel's error against float64 is at most 2x (output) / 3x (gradients) the
    error of plain PyTorch in the same dtype, plus a floor of one unit of the dtype's rounding (eps * max|truth|)
    for elements where the plain computation happens to round luckily."""
    torch.manual_seed(n + m + t)
    geo = Geometry(n, m, R, MoRAType(t))
    x = torch.randn(2, 3, n).to(dtype)
    M = (torch.randn(R, R) / math.sqrt(R)).to(dtype)
    g = torch.randn(2, 3, m).to(dtype)
    out, dx, dM, _ = run_triton(x, M, m, t, 0.5, None, g)
    xd, Md = x.double().requires_grad_(), M.double().requires_grad_()
    truth = reference.forward(xd, Md, geo, None, 0.5)
    truth.backward(g.double())
    plain = plain_low_precision(x, M, g, geo, 0.5)
    eps = torch.finfo(dtype).eps
    for name, got, want, base, factor in zip(("out", "dx", "dM"), (out, dx, dM), (truth.detach(), xd.grad, Md.grad),
                                             plain, (2, 3, 3)):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        err = (got.double() - want).abs().max().item()
        plain_err = (base.double() - want).abs().max().item()
        limit = factor * plain_err + eps * want.abs().max().item()
        assert err <= limit, f"{name}: error {err:.3g} > {factor} x plain {dtype} error {plain_err:.3g} + floor"


@pytest.mark.parametrize("t", (1, 2, 6))
def test_low_precision_input_with_float32_M(t):
    """The original release's setup: bfloat16 activations, float32 M. Computed in float32; only the output and dx
    are rounded to bfloat16, so their error stays within one bfloat16 rounding (eps/2 relative) of the truth plus
    the float32 bound."""
    torch.manual_seed(t)
    n, m, R = 64, 64, 22
    geo = Geometry(n, m, R, MoRAType(t))
    x = torch.randn(2, 3, n).bfloat16()
    M = torch.randn(R, R) / math.sqrt(R)
    g = torch.randn(2, 3, m).bfloat16()
    base = torch.randn(2, 3, m).bfloat16()
    out, dx, dM, dbase = run_triton(x, M, m, t, 1.0, base, g)
    assert out.dtype == dx.dtype == dbase.dtype == torch.bfloat16 and dM.dtype == torch.float32
    xd, Md = x.double().requires_grad_(), M.double().requires_grad_()
    truth = reference.forward(xd, Md, geo, None, 1.0, base.double())
    truth.backward(g.double())
    half_ulp = torch.finfo(torch.bfloat16).eps / 2
    for got, want in ((out, truth.detach()), (dx, xd.grad)):
        assert ((got.double() - want).abs() <= half_ulp * want.abs() * 1.01 + 1e-5).all()
    assert torch.allclose(dM.double(), Md.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", TYPES)
def test_strided_inputs_and_leading_dims(t):
    """Non-contiguous x, base and g (every stride reaches the kernels; nothing is copied for these views)."""
    torch.manual_seed(t)
    n, m, R = 50, 70, 12
    x = torch.randn(3, 2 * n)[:, ::2]  # last-dim stride 2
    x = torch.randn(2 * n, 3).T[:, ::2] if t % 2 else x  # transposed and strided
    M = torch.randn(R, R)
    geo = Geometry(n, m, R, MoRAType(t))
    xs, bs, gs = x, torch.randn(m, 3).T, torch.randn(m, 3).T
    assert not xs.is_contiguous() and not bs.is_contiguous() and not gs.is_contiguous()
    out, dx, dM, _ = run_triton(xs, M, m, t, 1.0, bs, gs)
    want = reference.forward(xs.double(), M.double(), geo, None, 1.0, bs.double())
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)
    dx_ref, dM_ref = reference.backward(gs.double(), xs.double(), M.double(), geo)
    assert torch.allclose(dx.double(), dx_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(dM.double(), dM_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", (1, 6))
def test_one_dimensional_input_and_single_output(t):
    """x of shape (n,) (no leading dims) and m == 1."""
    torch.manual_seed(0)
    x, M, g = torch.randn(9, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64), torch.randn(1).double()
    check_float32(x, M, g, 1, t)


@pytest.mark.parametrize("t", (1, 6))
def test_many_rows_split_dM(t):
    """Enough rows (> 512) for the 64-row tiles and for dM to be split over rows, then summed in order."""
    torch.manual_seed(0)
    x, M = torch.randn(600, 24, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    check_float32(x, M, torch.randn(600, 10, dtype=torch.float64), 10, t)


def test_no_grad_for_frozen_x():
    """Only the gradients asked for are computed; x without grad gets none and M's is still right."""
    torch.manual_seed(0)
    x, M = torch.randn(4, 30), torch.randn(10, 10, requires_grad=True)
    mora(x, M, 20, 1, backend="triton").sum().backward()
    x64 = x.double()
    _, dM = reference.backward(torch.ones(4, 20, dtype=torch.float64), x64, M.detach().double(),
                               Geometry(30, 20, 10, MoRAType.SHARING))
    assert torch.allclose(M.grad.double(), dM, rtol=1e-5, atol=1e-5)


def test_float64_falls_back_to_reference():
    x, M = torch.randn(2, 10, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    geo = Geometry(10, 6, 4, MoRAType.SHARING)
    assert torch.equal(mora(x, M, 6, 1, backend="triton"), reference.forward(x, M, geo))


def test_empty_leading_dims():
    out = mora(torch.randn(0, 10), torch.randn(4, 4), 6, 1, backend="triton")
    assert out.shape == (0, 6)


def test_status():
    usable, reason = triton_mora.status("cpu")
    assert usable and "interpreter" in reason
    usable, reason = triton_mora.status("meta")
    assert not usable and "CUDA" in reason


@pytest.mark.parametrize("t", (1, 2, 6))
def test_opcheck(t):
    """torch.library.opcheck on both registered ops (schema, fake tensors, autograd registration)."""
    torch.manual_seed(0)
    n, m, R = 20, 30, 8
    x, M = torch.randn(3, n, requires_grad=True), torch.randn(R, R, requires_grad=True)
    cos, sin = (None, None)
    if t == 6:
        from mora_kernels.core import rope_tables

        cos, sin = rope_tables(R, Geometry(n, m, R, MoRAType(t)).used_blocks)
    base = torch.randn(3, m, requires_grad=True)
    torch.library.opcheck(triton_mora._forward_op, (x, M, cos, sin, base, m, t, 0.5))
    torch.library.opcheck(triton_mora._forward_op, (x, M, cos, sin, None, m, t, 1.0))
    saved = x.detach() if t == 6 else triton_mora._forward_op(x.detach(), M.detach(), None, None, None, m, t, 1.0)[1]
    torch.library.opcheck(triton_mora._backward_op,
                          (torch.randn(3, m), saved, M.detach(), cos, sin, n, t, 0.5, torch.float32, True, True))
    torch.library.opcheck(triton_mora._forward_into_op, (x.detach(), M.detach(), cos, sin, base.detach(), m, t, 0.5))


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_inplace_accumulate_equals_out_of_place(t, dtype):
    """inplace=True writes the same values as the fused out-of-place add, into base's own storage."""
    torch.manual_seed(0)
    n, m = 30, 45
    R = 8
    x = torch.randn(2, 3, n).to(dtype)
    M = torch.randn(R, R) / R
    base = torch.randn(2, 3, m).to(dtype)
    expected = mora(x, M, m, t, scaling=0.5, base=base, backend="triton")
    target = base.clone()
    with torch.no_grad():
        result = mora(x, M, m, t, scaling=0.5, base=target, backend="triton", inplace=True)
    assert result is target
    assert torch.equal(target, expected)


def test_layer_inference_accumulates_in_place():
    """MoRALinear under no_grad adds the update into the base output itself; the values equal training mode's."""
    from mora_kernels import MoRALinear

    torch.manual_seed(0)
    layer = MoRALinear(torch.nn.Linear(24, 40), 2, 6, backend="triton")
    torch.nn.init.normal_(layer.M, std=0.1)
    x = torch.randn(4, 24)
    trained = layer(x)
    calls = []
    real = triton_mora._forward_into_op
    triton_mora._forward_into_op = lambda *args: calls.append(1) or real(*args)
    try:
        with torch.no_grad():
            served = layer(x)
    finally:
        triton_mora._forward_into_op = real
    assert calls and torch.equal(served, trained.detach())


def test_compiles_for_sm90_and_sm80_without_spills():
    """Every kernel at every configuration the launchers choose compiles for sm_90 and sm_80 (no GPU needed), and
    none spills. Runs in a subprocess: the interpreter replaces the compiler in this one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json; from mora_kernels import triton_mora; print(json.dumps(triton_mora.compile_report()))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    print()
    for row in rows:
        print(f"{row['kernel']:28s} {row['arch']} warps={row['num_warps']} regs={row['registers']:3d} "
              f"spills={row['spill_bytes']} smem={row['shared_bytes']:6d}  {row['variant']}")
    assert {row["arch"] for row in rows} == {"sm_90", "sm_80"}
    kernels = {"_compress_kernel", "_project_kernel", "_decompress_adjoint_kernel", "_compress_adjoint_kernel",
               "_dm_kernel"}
    assert {row["kernel"] for row in rows} == kernels
    spilled = [row for row in rows if row["spill_bytes"]]
    assert not spilled, spilled
    # H100 / A100 limits: 255 registers per thread, 227 KiB / 163 KiB of shared memory per block.
    assert all(row["shared_bytes"] <= 163 * 1024 for row in rows)
