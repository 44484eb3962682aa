"""Parity of the CUDA backend with the float64 reference on a GPU: golden cases, random shapes of every type, all
dtypes, outputs and gradients; opcheck, torch.compile, determinism of dM, 64-bit offsets and argument checks.

Tolerance rule (STYLE.md, flash-attention's): the kernel's largest error against the float64 reference is at most 2x
(outputs) or 3x (gradients) the error of plain PyTorch computing the same maps in the same dtype, plus what a correct
kernel may differ by even where plain PyTorch is exact: one rounding to the dtype (eps |truth|), and the float32
summation bound gamma_N times the sum of the magnitudes of the terms behind each element (Higham; any summation
order), with N the longest chain of float32 roundings the kernels actually take (``helpers.float32_terms``: the
block sums, the R products, the rows of dM). For these shapes N <= 416 (R = 362), so in float32 the allowance is at
most 2.5e-5 of that sum of magnitudes, where a wrong index, mask or tile errs by O(1) of it. In float16 and bfloat16
the plain error dominates. Without a GPU the whole module skips.
"""

import pytest
import torch

from mora_kernels import cuda_mora, mora, reference
from mora_kernels.core import check_inputs, rope_tables

from .helpers import abs_terms, float32_error, golden_case, golden_ids, plain_torch

pytestmark = pytest.mark.gpu  # benchmarks/gpu_suite.sh runs these (-m gpu)

if not torch.cuda.is_available():
    pytest.skip("the CUDA backend's parity tests need a CUDA GPU (none available)", allow_module_level=True)
_usable, _reason = cuda_mora.status(torch.device("cuda"))
if not _usable:
    pytest.skip(f"the CUDA backend cannot run here: {_reason}", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (n, m, R): P = 0; P <= n; B == 1 with P > n and m > B R; R not a power of two and above one 64-wide tile;
# m < R (empty groups); m < B R (types 6/7 skip blocks); odd R (types 1-4 only); R = 362 as in Llama at r=16.
SHAPES = [(64, 64, 16), (100, 37, 20), (3, 40, 8), (300, 200, 98), (37, 5, 12), (1000, 150, 70), (50, 70, 13),
          (2048, 600, 362)]
TYPES = [1, 2, 3, 4, 6, 7]


def assert_error_within(name, actual, expected, plain, factor, bound, rel):
    """flash-attention's rule with the allowance of the module docstring: ``bound`` is the elementwise sum of the
    magnitudes of the terms (``abs_terms``), ``rel`` the float32 bound relative to it (``float32_error``)."""
    expected = expected.double()
    error = (actual.double() - expected).abs().max().item()
    plain_error = (plain.double() - expected).abs().max().item()
    allowance = (torch.finfo(actual.dtype).eps * expected.abs() + rel * bound).max().item()
    assert error <= factor * plain_error + allowance, (
        f"{name}: error {error:.3g} > {factor} x plain PyTorch's {plain_error:.3g} + {allowance:.3g}"
    )


def run_cuda(x, M, geo, scaling, base, g):
    x = x.detach().requires_grad_()
    M = M.detach().requires_grad_()
    base = None if base is None else base.detach().requires_grad_()
    out = mora(x, M, geo.m, int(geo.t), scaling=scaling, base=base, backend="cuda")
    out.backward(g)
    return out, x.grad, M.grad, None if base is None else base.grad


def check_case(x, M, geo, scaling, base, g):
    out, dx, dM, dbase = run_cuda(x, M, geo, scaling, base, g)
    base64 = None if base is None else base.double()
    expected_out = reference.forward(x.double(), M.double(), geo, None, scaling, base64)
    expected_dx, expected_dM = reference.backward(g.double(), x.double(), M.double(), geo, None, scaling)
    plain_out, plain_dx, plain_dM = plain_torch(x, M, g, geo, scaling, base)
    assert out.dtype == (x.dtype if base is None else base.dtype) and out.shape == g.shape
    assert dx.dtype == x.dtype and dM.dtype == M.dtype
    bound_out, bound_dx, bound_dM = abs_terms(x, M, g, geo, scaling)
    if base is not None:
        bound_out = bound_out + base.double().abs()
    rel = float32_error(geo, x.numel() // geo.n)  # the csrc GEMM multiplies with float32 FMAs
    assert_error_within("out", out, expected_out, plain_out, 2, bound_out, rel)
    assert_error_within("dx", dx, expected_dx, plain_dx, 3, bound_dx, rel)
    assert_error_within("dM", dM, expected_dM, plain_dM.to(M.dtype), 3, bound_dM, rel)
    if base is not None:
        torch.testing.assert_close(dbase, g.to(base.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("case_id", golden_ids())
def test_golden_cases_float32(case_id):
    case, arrays = golden_case(case_id)
    x, M, g = (arrays[k].float().cuda() for k in ("x", "M", "g"))
    geo = check_inputs(x, M, case["m"], case["mora_type"])
    out, dx, dM, _ = run_cuda(x, M, geo, 1.0, None, g)
    # float32 from float64 inputs: within gamma_N of the sum of magnitudes (module docstring; the +8 of N covers
    # the rounding of the inputs to float32); an index error is O(1) of it.
    rel = float32_error(geo, x.numel() // geo.n)
    for name, actual, bound in zip(("y", "dx", "dM"), (out, dx, dM), abs_terms(x, M, g, geo, 1.0)):
        error = (actual.double() - arrays[name].cuda()).abs()
        assert (error <= rel * bound + 1e-30).all(), f"{name}: worst error/bound {(error / (rel * bound)).max():.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("n, m, R", SHAPES)
def test_random_shapes_match_reference(n, m, R, mora_type, dtype):
    if mora_type in (6, 7) and R % 2:
        pytest.skip("types 6/7 need an even R")
    generator = torch.Generator(device="cuda").manual_seed(n + 7 * m + R + mora_type)
    x = torch.randn(3, 5, n, device="cuda", generator=generator).to(dtype)
    M = (torch.randn(R, R, device="cuda", generator=generator) / R**0.5).to(dtype)
    base = torch.randn(3, 5, m, device="cuda", generator=generator).to(dtype)
    g = torch.randn(3, 5, m, device="cuda", generator=generator).to(dtype)
    geo = check_inputs(x, M, m, mora_type)
    check_case(x, M, geo, 0.5, None, g)
    check_case(x, M, geo, 0.5, base, g)


@pytest.mark.parametrize("mora_type", [1, 6])
def test_layer_dtypes_bf16_input_float32_M(mora_type):
    """The layer's case: activations and base in bfloat16, M kept in float32 (as the original release)."""
    x = torch.randn(4, 9, 300, device="cuda").bfloat16()
    M = torch.randn(98, 98, device="cuda") / 10
    base = torch.randn(4, 9, 200, device="cuda").bfloat16()
    g = torch.randn(4, 9, 200, device="cuda").bfloat16()
    check_case(x, M, check_inputs(x, M, 200, mora_type), 1.0, base, g)


def test_empty_rows_and_single_row():
    M = torch.randn(8, 8, device="cuda")
    assert mora(torch.empty(0, 20, device="cuda"), M, 12, 1, backend="cuda").shape == (0, 12)
    x = torch.randn(20, device="cuda")  # no leading dims at all
    torch.testing.assert_close(mora(x, M, 12, 1, backend="cuda"), mora(x, M, 12, 1, backend="reference"))


def test_dM_is_deterministic_with_split_k():
    x = torch.randn(8192, 512, device="cuda", dtype=torch.bfloat16)
    M = torch.randn(64, 64, device="cuda", requires_grad=True)
    g = torch.randn(8192, 512, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        M.grad = None
        mora(x, M, 512, 1, backend="cuda").backward(g)
        grads.append(M.grad.clone())
    assert all(torch.equal(grads[0], other) for other in grads[1:])


def test_64_bit_offsets():
    """More than 2^31 output elements: offsets past 2^31 must not wrap."""
    m, rows = 4096, (1 << 31) // 4096 + 3
    if torch.cuda.mem_get_info()[0] < 3 * rows * m * 2:
        pytest.skip("needs ~13 GB of free GPU memory")
    x = torch.randn(rows, 32, device="cuda", dtype=torch.bfloat16)
    M = torch.randn(16, 16, device="cuda")
    out = mora(x, M, m, 1, backend="cuda")
    tail = slice(rows - 4, rows)
    # Both round float32 results to bfloat16: assert_close's bfloat16 default (2 ulp) covers a boundary case.
    torch.testing.assert_close(out[tail], mora(x[tail], M, m, 1, backend="reference"))
    del out


def test_opcheck():
    ops = cuda_mora._loaded()
    x = torch.randn(3, 40, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    M = torch.randn(8, 8, device="cuda", requires_grad=True)
    base = torch.randn(3, 50, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_tables(8, 5, "cuda")
    g = torch.randn(3, 50, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(ops.forward.default, (x, M, base, None, None, 50, 1, 0.5))
    torch.library.opcheck(ops.forward.default, (x, M, None, cos, sin, 50, 6, 1.0))
    _, c = ops.forward(x.detach(), M.detach(), None, None, None, 50, 2, 1.0)
    torch.library.opcheck(ops.backward.default, (g, x.detach(), None, M.detach(), cos, sin, 50, 6, 1.0, True, True))
    torch.library.opcheck(ops.backward.default, (g, x.detach(), c, M.detach(), None, None, 50, 2, 1.0, False, True))


def test_torch_compile_fullgraph():
    ops = cuda_mora._loaded()

    def layer(x, M, base):
        return ops.forward(x, M, base, None, None, 50, 1, 0.5)[0]

    x = torch.randn(3, 40, device="cuda", requires_grad=True)
    M = torch.randn(8, 8, device="cuda", requires_grad=True)
    base = torch.randn(3, 50, device="cuda")
    eager = layer(x, M, base)
    (eager_dx, eager_dM) = torch.autograd.grad(eager.sum(), (x, M))
    compiled = torch.compile(layer, fullgraph=True)(x, M, base)
    (compiled_dx, compiled_dM) = torch.autograd.grad(compiled.sum(), (x, M))
    for actual, expected in ((compiled, eager), (compiled_dx, eager_dx), (compiled_dM, eager_dM)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_argument_errors_name_the_argument():
    ops = cuda_mora._loaded()
    x = torch.randn(4, 40, device="cuda")
    M = torch.randn(8, 8, device="cuda")
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.forward(torch.randn(40, 4, device="cuda").T, M, None, None, None, 50, 1, 1.0)
    with pytest.raises(ValueError, match="M must be on x's device|M must be a CUDA tensor"):
        ops.forward(x, M.cpu(), None, None, None, 50, 1, 1.0)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ops.forward(x.double(), M, None, None, None, 50, 1, 1.0)
    with pytest.raises(ValueError, match="base must have shape"):
        ops.forward(x, M, torch.zeros(4, 49, device="cuda"), None, None, 50, 1, 1.0)
    with pytest.raises(ValueError, match="type 6 needs the rope tables"):
        ops.forward(x, M, None, None, None, 50, 6, 1.0)
    with pytest.raises(ValueError, match="rope cos must have shape"):
        cos, sin = rope_tables(8, 1, "cuda")
        ops.forward(x, M, None, cos, sin, 50, 6, 1.0)
    with pytest.raises(ValueError, match="even square size"):
        ops.forward(x, torch.randn(7, 7, device="cuda"), None, None, None, 50, 7, 1.0)
    with pytest.raises(ValueError, match="mora_type must be one of"):
        ops.forward(x, M, None, None, None, 50, 5, 1.0)
    g = torch.randn(4, 50, device="cuda")
    with pytest.raises(ValueError, match="c must have shape"):
        ops.backward(g, x, torch.zeros(4, 7, device="cuda"), M, None, None, 50, 1, 1.0, False, True)
    with pytest.raises(TypeError, match="c must be float32"):
        ops.backward(g, x, torch.zeros(4, 8, device="cuda", dtype=torch.float16), M, None, None, 50, 1, 1.0, True, True)
    with pytest.raises(ValueError, match="c: types 6/7 recompute"):
        ops.backward(g, x, torch.zeros(4, 8, device="cuda"), M, None, None, 50, 7, 1.0, True, True)
