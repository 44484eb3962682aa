"""``mora_mixed``: K adapters over one batch, against the per-row reference (float64), on the reference backend and
the Triton one (CPU through the interpreter; a GPU where one runs the compiled kernels), plus opcheck,
torch.compile(fullgraph=True), the launch count's independence of K, and the layers' per-row batches through it.

Shapes stay tiny: the interpreter costs a few ms per program x loop iteration.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import mora_kernels  # noqa: E402
from mora_kernels import diagnostics, fused, mora, mora_mixed  # noqa: E402
from mora_kernels.core import Geometry, MoRAType, rope_tables  # noqa: E402

from .helpers import PRODUCT_ERROR, abs_terms, float32_error, fused_targets, plain_torch, product_error  # noqa: E402

triton_mixed = pytest.importorskip("mora_kernels.triton_mixed")
triton_floor = pytest.importorskip("mora_kernels.triton_floor")

TYPES = (1, 2, 3, 4, 6, 7)
# The Triton backend's devices (cpu: the interpreter; cuda: marked gpu), skipped with the reason where it cannot run.
DEVICES = [pytest.param(p.values[1], marks=p.marks, id=p.values[1])
           for p in fused_targets(("triton", "cpu"), ("triton", "cuda"))]
N, M_OUT, R = 21, 30, 8  # P > 0 (types 1/4/6/7 pad), m not a multiple of R (a partial last copy)


@pytest.fixture(autouse=True)
def _poisoned(poison_empty):
    """torch.empty fills NaN here (conftest.poison_empty): an output element a kernel forgets shows up."""


def index_pattern(pattern: str, K: int, shape, gen) -> torch.Tensor:
    """Token -> adapter: "mixed" (unsorted, with -1, most adapters without rows when K is large), "equal" (every
    token the same adapter, the last one) or "none" (every token -1)."""
    if pattern == "equal":
        return torch.full(shape, K - 1, dtype=torch.int64)
    if pattern == "none":
        return torch.full(shape, -1, dtype=torch.int64)
    index = torch.randint(-1, K, shape, generator=gen)
    index.view(-1)[:2] = torch.tensor([K - 1, -1])  # both ends of the range appear
    return index


def per_row(x, M, index, g, m, t, scaling, base):
    """Output and gradients (float64) of each row computed alone by the single-adapter reference ``mora``."""
    x = x.double().detach().requires_grad_()
    M = M.double().detach().requires_grad_()
    rows_x, rows_i = x.reshape(-1, x.shape[-1]), index.reshape(-1).tolist()
    rows_b = base.double().reshape(-1, m) if base is not None else torch.zeros(len(rows_i), m, dtype=torch.float64)
    out = []
    for r, a in enumerate(rows_i):
        if a < 0:
            out.append(rows_b[r])
            continue
        factor = float(scaling[a]) if isinstance(scaling, torch.Tensor) else scaling
        out.append(mora(rows_x[r: r + 1], M[a], m, t, scaling=factor, base=rows_b[r: r + 1], backend="reference")[0])
    out = torch.stack(out).reshape(*x.shape[:-1], m)
    if not out.requires_grad:  # no row has an adapter
        return out, torch.zeros_like(x), torch.zeros_like(M)
    out.backward(g.double())
    return out.detach(), x.grad, M.grad


def run_mixed(x, M, index, g, m, t, scaling, base, backend):
    """(out, dx, dM) of sum(out * g) through ``backend``. With a base, base requires grad too and its gradient is
    checked here, for every caller: ``out[t]`` is ``base[t]`` plus an update (or nothing, index -1), so dbase is g
    exactly, in base's dtype, on every row."""
    x = x.detach().requires_grad_()
    M = M.detach().requires_grad_()
    if base is not None:
        base = base.detach().requires_grad_()
    out = mora_mixed(x, M, index.to(x.device), m, t, scaling=scaling, base=base, backend=backend)
    out.backward(g)
    if base is not None:
        assert base.grad is not None, "base requires grad but got no gradient"
        assert torch.equal(base.grad, g.to(base.dtype)), "dbase: must be g exactly"
    return out.detach(), x.grad, M.grad


def inputs(K, pattern, t, dtype=torch.float32, m_dtype=None, shape=(2, 5), seed=0, device="cpu", base=True):
    gen = torch.Generator().manual_seed(seed * 100 + K * 7 + t)
    x = torch.randn(*shape, N, generator=gen)
    M = torch.randn(K, R, R, generator=gen) / math.sqrt(R)
    g = torch.randn(*shape, M_OUT, generator=gen)
    b = torch.randn(*shape, M_OUT, generator=gen) if base else None
    scaling = torch.linspace(-1.5, 2.0, K) if K > 1 else 0.5
    index = index_pattern(pattern, K, shape, gen)
    to = lambda v, d: v.to(device, d) if v is not None else None  # noqa: E731
    scaling = scaling.to(device) if isinstance(scaling, torch.Tensor) else scaling
    return to(x, dtype), to(M, m_dtype or dtype), index.to(device), to(g, dtype), scaling, to(b, dtype)


def float32_bounds(x, M, index, g, geo, scaling):
    """Elementwise bounds (float64) on out, dx, dM of a float32 computation: gamma_N times the sums of the absolute
    terms (``helpers.abs_terms``), adapter by adapter; rows without an adapter get 0 (exact: base or zeros)."""
    rows_x, rows_g, rows_i = x.reshape(-1, geo.n), g.reshape(-1, geo.m), index.reshape(-1).cpu()
    out_b = torch.zeros(rows_x.shape[0], geo.m, dtype=torch.float64, device=x.device)
    dx_b = torch.zeros(rows_x.shape[0], geo.n, dtype=torch.float64, device=x.device)
    dM_b = torch.zeros(M.shape, dtype=torch.float64, device=x.device)
    for a in range(M.shape[0]):
        sel = (rows_i == a).nonzero().squeeze(1).to(x.device)
        if sel.numel():
            factor = float(scaling[a]) if isinstance(scaling, torch.Tensor) else scaling
            out_b[sel], dx_b[sel], dM_b[a] = abs_terms(rows_x[sel], M[a], rows_g[sel], geo, factor)
    products = product_error("triton", x.dtype, M.dtype)  # every check_float32 call runs the Triton backend
    rel = float32_error(geo, rows_x.shape[0], tensor_cores=x.is_cuda, products=products)
    return rel * out_b.reshape(*x.shape[:-1], geo.m), rel * dx_b.reshape(x.shape), rel * dM_b


def check_float32(x, M, index, g, t, scaling, base, got):
    """Each of out, dx, dM within float32 rounding of the float64 per-row truth, plus one rounding to its dtype
    (as ``test_triton.check_against_float64``); rows without an adapter and adapters without rows exactly."""
    geo = Geometry(N, M_OUT, R, MoRAType(t))
    cpu = lambda v: v.cpu() if isinstance(v, torch.Tensor) else v  # noqa: E731
    want = per_row(cpu(x), cpu(M), cpu(index), cpu(g), M_OUT, t, cpu(scaling), cpu(base))
    bounds = float32_bounds(x, M, index, g, geo, scaling)
    out_dtype = base.dtype if base is not None else x.dtype
    for name, value, truth, bound, dtype in zip(("out", "dx", "dM"), got, want, bounds, (out_dtype, x.dtype, M.dtype)):
        truth = truth.to(value.device)
        assert value.dtype == dtype and value.shape == truth.shape, name
        assert torch.isfinite(value).all(), f"{name}: unwritten (NaN) elements"
        if name == "out" and base is not None:
            bound = bound + torch.finfo(torch.float32).eps / 2 * base.double().abs()
        r = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2
        info = torch.finfo(dtype)
        limit = r * truth.abs() + (1 + r) * bound + info.smallest_normal * info.eps
        err = (value.double() - truth).abs()
        assert (err <= limit).all(), f"{name}: max err {err.max():.3g}, worst err/limit {(err / limit).max():.3g}"
    out, dx, dM = got
    none = index.to(out.device) < 0
    expected_none = base[none] if base is not None else torch.zeros_like(out[none])
    assert torch.equal(out[none], expected_none.to(out.dtype)), "rows without an adapter: base (or 0) exactly"
    assert torch.equal(dx[none], torch.zeros_like(dx[none])), "rows without an adapter: dx = 0 exactly"
    unused = torch.ones(M.shape[0], dtype=torch.bool)
    unused[index[index >= 0].unique().cpu()] = False
    assert torch.equal(dM[unused.to(dM.device)], torch.zeros_like(dM[unused.to(dM.device)])), "unused adapters"


@pytest.mark.parametrize("pattern", ("mixed", "equal", "none"))
@pytest.mark.parametrize("K", (1, 2, 8, 64))
@pytest.mark.parametrize("t", TYPES)
def test_reference_equals_per_row(t, K, pattern):
    """The reference's loop over adapters equals the single-adapter reference row by row (float64)."""
    x, M, index, g, scaling, base = inputs(K, pattern, t, torch.float64)
    got = run_mixed(x, M, index, g, M_OUT, t, scaling, base, "reference")
    want = per_row(x, M, index, g, M_OUT, t, scaling, base)
    for name, a, b in zip(("out", "dx", "dM"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", (1, 2, 8, 64))
@pytest.mark.parametrize("t", TYPES)
def test_triton_float32(t, K, device):
    """Unsorted indices with -1 and (for K 8, 64) adapters without rows; per-adapter scaling; base."""
    x, M, index, g, scaling, base = inputs(K, "mixed", t, device=device)
    got = run_mixed(x, M, index, g, M_OUT, t, scaling, base, "triton")
    check_float32(x, M, index, g, t, scaling, base, got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", ("equal", "none"))
@pytest.mark.parametrize("t", (1, 6))
def test_triton_all_equal_and_no_adapter(t, pattern, device):
    x, M, index, g, scaling, _ = inputs(8, pattern, t, device=device, base=False)
    got = run_mixed(x, M, index, g, M_OUT, t, scaling, None, "triton")
    check_float32(x, M, index, g, t, scaling, None, got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t", (1, 6, 7))
@pytest.mark.parametrize("tokens", (200, 1100))
def test_triton_prefill_tiles_and_dm_splits(t, tokens, device):
    """Long segments: the prefill tile (64 rows; half width for the gathered blocks of types 6/7 with float32) and,
    with 1100 tokens over 2 adapters, dM split within a segment (partials summed in a fixed order)."""
    x, M, index, g, scaling, base = inputs(2, "mixed", t, shape=(tokens,), device=device)
    assert triton_mixed._rows_kind(tokens, 2, tokens) == "many"
    got = run_mixed(x, M, index, g, M_OUT, t, scaling, base, "triton")
    check_float32(x, M, index, g, t, scaling, base, got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("t", TYPES)
def test_triton_low_precision(t, dtype, device):
    """x and M in one 16-bit dtype (the dot in that dtype): error at most 2x (out) / 3x (gradients) plain PyTorch's
    in that dtype, row by row as each adapter computes alone, plus one unit of the dtype's rounding
    (``test_triton.check_low_precision``'s rule)."""
    K = 8
    x, M, index, g, scaling, _ = inputs(K, "mixed", t, dtype, device=device, base=False)
    got = run_mixed(x, M, index, g, M_OUT, t, scaling, None, "triton")
    truth = per_row(x.cpu(), M.cpu(), index.cpu(), g.cpu(), M_OUT, t, scaling.cpu(), None)
    geo = Geometry(N, M_OUT, R, MoRAType(t))
    rows_x, rows_g, rows_i = x.cpu().reshape(-1, N), g.cpu().reshape(-1, M_OUT), index.cpu().reshape(-1)
    plain = [torch.zeros(rows_x.shape[0], M_OUT, dtype=dtype), torch.zeros_like(rows_x),
             torch.zeros(M.shape, dtype=dtype)]
    for a in range(K):
        sel = (rows_i == a).nonzero().squeeze(1)
        if sel.numel():
            out_a, dx_a, dM_a = plain_torch(rows_x[sel], M[a].cpu(), rows_g[sel], geo, float(scaling[a]))
            plain[0][sel], plain[1][sel], plain[2][a] = out_a, dx_a, dM_a
    plain[0], plain[1] = plain[0].reshape(truth[0].shape), plain[1].reshape(truth[1].shape)
    eps = torch.finfo(dtype).eps
    for name, value, want, base_line, factor in zip(("out", "dx", "dM"), got, truth, plain, (2, 3, 3)):
        assert value.dtype == dtype and torch.isfinite(value).all(), name
        err = (value.cpu().double() - want).abs().max().item()
        plain_err = (base_line.double() - want).abs().max().item()
        assert err <= factor * plain_err + eps * want.abs().max().item(), f"{name}: {err:.3g} vs plain {plain_err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("t", (1, 6))
def test_triton_16bit_x_with_float32_M(t, dtype, device):
    """The layer's default: 16-bit x and base, float32 M, computed in float32, out and dx rounded once."""
    x, M, index, g, scaling, base = inputs(8, "mixed", t, dtype, torch.float32, device=device)
    got = run_mixed(x, M, index, g, M_OUT, t, scaling, base, "triton")
    check_float32(x, M, index, g, t, scaling, base, got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("t", (1, 6, 7))
@pytest.mark.parametrize("matmul_precision", tuple(PRODUCT_ERROR), indirect=True)
def test_triton_float32_matmul_precision(matmul_precision, t, x_dtype, device):
    """The mixed kernels follow the float32 matmul precision as the single-adapter ones do (docs/design.md#precision):
    float32 M with float32 or bfloat16 x, each mode within its own bound (``check_float32`` adds the mode's error per
    product, ``helpers.product_error``)."""
    x, M, index, g, scaling, base = inputs(8, "mixed", t, x_dtype, torch.float32, device=device)
    got = run_mixed(x, M, index, g, M_OUT, t, scaling, base, "triton")
    check_float32(x, M, index, g, t, scaling, base, got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ("high", "medium"))
def test_triton_float32_matmul_precision_changes_the_result(precision, device):
    """A mixed kernel that ignored the mode would fail: with R = 40 the 'high' (TF32, ~2^-12 sqrt(R) per output) and
    'medium' (bfloat16, ~2^-9 sqrt(R)) results lie outside the "highest" bound of the float64 truth (~N 2^-24), for
    out, dx and dM alike."""
    gen = torch.Generator().manual_seed(1)
    n, m, R, K = 96, 72, 40, 4
    x, g = torch.randn(3, 8, n, generator=gen).to(device), torch.randn(3, 8, m, generator=gen).to(device)
    M = (torch.randn(K, R, R, generator=gen) / math.sqrt(R)).to(device)
    index = torch.arange(24).remainder(K).reshape(3, 8).to(device)
    geo = Geometry(n, m, R, MoRAType.SHARING)
    truth = per_row(x.cpu(), M.cpu(), index.cpu(), g.cpu(), m, 1, 1.0, None)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        got = run_mixed(x, M, index, g, m, 1, 1.0, None, "triton")
    finally:
        torch.set_float32_matmul_precision(before)
    bounds = float32_bounds(x, M, index, g, geo, 1.0)  # under "highest", restored above
    for name, value, want, bound in zip(("out", "dx", "dM"), got, truth, bounds):
        ratio = (value.double() - want.to(value.device)).abs() / (bound + 1e-300)
        assert ratio.max() > 1, f"{name}: within the 'highest' bound"


@pytest.mark.parametrize("backend", ("reference", "triton"))
@pytest.mark.parametrize("needs_grad", ("x", "M", "base"))
def test_inplace_refused_under_autograd(needs_grad, backend):
    """inplace=True writes into base, which autograd cannot differentiate: refused whichever input requires grad,
    and base is left untouched."""
    x, M, index, _, _, base = inputs(4, "mixed", 1)
    tensors = {"x": x, "M": M, "base": base}
    tensors[needs_grad].requires_grad_()
    before = base.detach().clone()
    with pytest.raises(ValueError, match="inplace=True writes into base, which autograd cannot differentiate"):
        mora_mixed(tensors["x"], tensors["M"], index, M_OUT, 1, base=tensors["base"], backend=backend, inplace=True)
    assert torch.equal(base.detach(), before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t", (1, 6))
def test_inplace_and_float_scaling(t, device):
    """inplace=True writes the out-of-place values into base; a float scaling equals a tensor of that value."""
    x, M, index, _, _, base = inputs(8, "mixed", t, device=device)
    expected = mora_mixed(x, M, index, M_OUT, t, scaling=torch.full((8,), 0.5, device=device), base=base,
                          backend="triton")
    target = base.clone()
    with torch.no_grad():
        result = mora_mixed(x, M, index, M_OUT, t, scaling=0.5, base=target, backend="triton", inplace=True)
    assert result is target and torch.equal(target, expected)


def test_float64_runs_the_reference():
    x, M, index, g, scaling, base = inputs(8, "mixed", 6, torch.float64)
    got = run_mixed(x, M, index, g, M_OUT, 6, scaling, base, "triton")
    want = per_row(x, M, index, g, M_OUT, 6, scaling, base)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ("reference", "triton"))
def test_bad_input(backend):
    x, M, index, _, _, base = inputs(4, "mixed", 1)
    call = lambda **kw: mora_mixed(**{"x": x, "M": M, "adapter_index": index, "out_features": M_OUT,  # noqa: E731
                                       "mora_type": 1, "backend": backend, **kw})
    with pytest.raises(ValueError, match=r"adapter_index must hold values in \[-1, 4\).*from -1 to 4"):
        call(adapter_index=torch.where(index == 0, 4, index))
    with pytest.raises(ValueError, match=r"adapter_index must hold values in \[-1, 4\).*from -2"):
        call(adapter_index=torch.where(index == 0, -2, index))
    with pytest.raises(TypeError, match="adapter_index must be an integer tensor"):
        call(adapter_index=index.float())
    with pytest.raises(ValueError, match=r"adapter_index must have x's leading shape \(2, 5\)"):
        call(adapter_index=index[:, :3])
    with pytest.raises(ValueError, match=r"M must stack K >= 1 adapters as \(K, R, R\)"):
        call(M=M[0])
    with pytest.raises(ValueError, match="M must be a square matrix"):
        call(M=M[:, :, :5])
    with pytest.raises(ValueError, match=r"scaling: a tensor must hold one factor per adapter, shape \(4,\)"):
        call(scaling=torch.ones(3))
    with pytest.raises(ValueError, match="scaling must be finite"):
        call(scaling=torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="scaling: gradients"):
        call(scaling=torch.ones(4, requires_grad=True))
    with pytest.raises(ValueError, match="base must have shape"):
        call(base=base[:, :, :3])
    with pytest.raises(ValueError, match="inplace=True adds the update into base"):
        call(inplace=True)
    with pytest.raises(ValueError, match="mixed-adapter batches .* run only on the Triton backend"):
        call(backend="cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("t", (1, 2, 6))
def test_opcheck(t, dtype, device):
    """torch.library.opcheck on the three mixed ops (schema, fake tensors, autograd registration); bfloat16 x and M:
    C(x) saved in bfloat16, as the fake kernel says."""
    K, n, m, R_ = 3, 20, 30, 8
    torch.manual_seed(0)
    x = torch.randn(5, n, device=device, dtype=dtype, requires_grad=True)
    M = torch.randn(K, R_, R_, device=device, dtype=dtype, requires_grad=True)
    index = torch.tensor([2, -1, 0, 2, 0], device=device)
    scale = torch.tensor([0.5, 1.0, -2.0], device=device)
    cos, sin = rope_tables(R_, Geometry(n, m, R_, MoRAType(t)).used_blocks, device) if t == 6 else (None, None)
    base = torch.randn(5, m, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(fused.mixed_forward_op, (x, M, cos, sin, base, m, t, index, scale, True, "triton"))
    torch.library.opcheck(fused.mixed_forward_op, (x, M, cos, sin, None, m, t, index, scale, False, "triton"))
    saved = x.detach() if t == 6 else fused.mixed_forward_op(x.detach(), M.detach(), None, None, None, m, t, index,
                                                              scale, False, "triton")[1]
    g = torch.randn(5, m, device=device, dtype=dtype)
    torch.library.opcheck(fused.mixed_backward_op, (g, saved, M.detach(), cos, sin, n, t, dtype, True, True,
                                                    index, scale, "triton"))
    torch.library.opcheck(fused.mixed_forward_into_op, (x.detach(), M.detach(), cos, sin, base.detach(), m, t, index,
                                                        scale, True, "triton"))


class Served(torch.nn.Module):
    def __init__(self, K, t):
        super().__init__()
        self.base = torch.nn.Linear(N, M_OUT)
        self.M = torch.nn.Parameter(torch.randn(K, R, R) / R)
        self.t = t

    def forward(self, x, index):
        return mora_mixed(x, self.M, index, M_OUT, self.t, scaling=0.5, base=self.base(x), backend="triton")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t", (1, 6))
def test_compile_fullgraph(t, device):
    """No graph break (fullgraph=True raises on one); output and gradients equal eager."""
    torch.manual_seed(0)
    module = Served(4, t).to(device)
    x = torch.randn(2, 3, N, device=device, requires_grad=True)
    index = torch.tensor([[3, -1, 0], [0, 3, 1]], device=device)
    out = torch.compile(module, fullgraph=True)(x, index)
    out.square().sum().backward()
    dx, dM = x.grad.clone(), module.M.grad.clone()
    x.grad = module.M.grad = None
    eager = module(x, index)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dM, module.M.grad, rtol=1e-5, atol=1e-5)


class _Ops(TorchDispatchMode):
    """Records the ops dispatched below autograd that can launch a kernel: views, ``detach`` (autograd storing a
    gradient it was handed), ``lift_fresh`` and allocations without a fill launch none."""

    NO_KERNEL = {"aten.detach", "aten.lift_fresh", "aten.empty", "aten.empty_like", "aten.empty_strided",
                 "aten._unsafe_view"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not func.is_view and name not in self.NO_KERNEL:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class _Launches:
    """Stands in for a Triton kernel and counts its launches."""

    def __init__(self, kernel, counter, name):
        self.kernel, self.counter, self.name = kernel, counter, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter.append(self.name)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("t", (1, 6))
def test_launches_and_ops_do_not_grow_with_K(t, monkeypatch):
    """Forward + backward of one mixed batch: the same dispatched ops (top level, and inside the Triton op's
    launchers) and the same Triton launches for K = 2, 8 and 64 adapters; and the same for a MoRALinear with K
    adapters (of different scalings: a (K,) tensor of factors) in a per-row batch (training and inference)."""
    launches = []
    for module, names in ((triton_mixed, diagnostics.MIXED_KERNELS), (triton_floor, diagnostics.FLOOR_KERNELS)):
        for name in names:
            monkeypatch.setattr(module, name, _Launches(getattr(module, name), launches, name))
    counts = {}
    for K in (2, 8, 64):
        x, M, index, g, _, base = inputs(K, "mixed", t, shape=(16,), base=True)
        scaling = torch.linspace(0.5, 1.5, K)  # a tensor for every K (a float adds one op: the (K,) fill)
        x.requires_grad_()
        M.requires_grad_()
        launches.clear()
        with _Ops() as top:
            mora_mixed(x, M, index, M_OUT, t, scaling=scaling, base=base, backend="triton").backward(g)
        top_launches = list(launches)
        geo = Geometry(N, M_OUT, R, MoRAType(t))
        cos, sin = rope_tables(R, geo.used_blocks) if t == 6 else (None, None)
        scale = scaling
        with _Ops() as inner:
            out, c = triton_mixed.mixed_forward(x.detach(), M.detach(), (index, scale), (cos, sin), base, geo)
            triton_mixed.mixed_backward(g, x.detach() if t == 6 else c, M.detach(), (index, scale), (cos, sin), geo,
                                        torch.float32, (True, True))
        layer = mora_kernels.MoRALinear(torch.nn.Linear(N, M_OUT), r=1, mora_type=t, backend="triton")
        for k in range(1, K):
            layer.add_adapter(f"a{k}", r=1, mora_type=t, scaling=1.0 + k)
        names = layer.mora_adapter_names()
        layer.set_adapter(names)
        rows = [names[k % K] for k in range(5)] + ["__base__"]
        xl = torch.randn(6, 2, N, requires_grad=True)
        with _Ops() as train:
            layer(xl, adapter_names=rows).sum().backward()
        with torch.no_grad(), _Ops() as serve:
            layer(xl, adapter_names=rows)
        counts[K] = (top.ops, inner.ops, list(launches), train.ops, serve.ops, top_launches)
    for K in (8, 64):
        for what, a, b in zip(("top-level ops", "launcher ops", "Triton launches", "layer training ops",
                               "layer inference ops"), counts[2], counts[K]):
            assert a == b, f"{what} differ between K=2 and K={K}: {a} vs {b}"
    # One forward + backward: compress (types 1-4), the projection, h = D^T(g), w = h M, C^T(w) and dM.
    assert counts[2][5] == (["compress_kernel"] if t == 1 else []) + [
        "_mixed_project_kernel", "decompress_adjoint_kernel", "_mixed_project_kernel", "compress_adjoint_kernel",
        "_mixed_dm_kernel"]
    assert counts[2][0].count("mora_kernels.mixed_forward") == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", (0.0, 0.3))
def test_layer_rows_match_each_adapter(device, dropout):
    """MoRALinear with adapters of two (type, R) groups, per-row batch through mora_mixed: each row equals that
    adapter alone (eval mode; dropout only changes training), gradients reach exactly the adapters used."""
    torch.manual_seed(0)
    layer = mora_kernels.MoRALinear(torch.nn.Linear(N, M_OUT), r=2, mora_type=6, dropout=dropout, backend="triton")
    layer.add_adapter("b", r=2, mora_type=6, scaling=0.5, dropout=dropout)
    layer.add_adapter("c", r=1, mora_type=1, scaling=2.0)
    layer.add_adapter("unused", r=2, mora_type=6)
    for adapter in layer.adapters.values():
        torch.nn.init.normal_(adapter.weight, std=0.3)
    layer.set_adapter(list(layer.adapters))
    layer.to(device).eval()
    x = torch.randn(5, 3, N, device=device)
    rows = ["b", "c", "__base__", "default", "b"]
    y = layer(x, adapter_names=rows)
    y.sum().backward()
    for i, name in enumerate(rows):
        want = layer.base(x[i])
        if name != "__base__":
            a = layer.adapters[name]
            want = mora(x[i], a.weight, M_OUT, a.mora_type, scaling=layer.scalings[name], base=want,
                        backend="reference")
        torch.testing.assert_close(y[i], want, rtol=1e-5, atol=1e-5)
    assert layer.adapters["unused"].weight.grad is None
    assert all(layer.adapters[n].weight.grad.abs().sum() > 0 for n in ("default", "b", "c"))
    with torch.no_grad():
        torch.testing.assert_close(layer(x, adapter_names=rows), y.detach(), rtol=1e-6, atol=1e-6)
        layer.adapters["b"].weight.mul_(2)  # the inference stack follows an in-place update
        y2 = layer(x, adapter_names=rows)
    assert not torch.allclose(y2[0], y[0].detach()) and torch.equal(y2[3], y[3].detach())


def test_layer_dropout_per_row_in_training():
    """Training mode: each row is dropped out with its own adapter's probability (0 for rows of other adapters)."""
    torch.manual_seed(0)
    layer = mora_kernels.MoRALinear(torch.nn.Linear(N, M_OUT), r=2, mora_type=1, dropout=0.5, backend="reference")
    layer.add_adapter("keep", r=2, mora_type=1)
    layer.set_adapter(["default", "keep"])
    for adapter in layer.adapters.values():
        torch.nn.init.normal_(adapter.weight, std=0.3)
    layer.train()
    x = torch.randn(2, 400, N)
    y = layer(x, adapter_names=["default", "keep"])
    with torch.no_grad():
        plain = mora(x[1], layer.adapters["keep"].weight, M_OUT, 1, base=layer.base(x[1]), backend="reference")
    torch.testing.assert_close(y[1], plain, rtol=1e-6, atol=1e-6)
    alone = mora(x[0], layer.adapters["default"].weight, M_OUT, 1, base=layer.base(x[0]), backend="reference")
    assert not torch.allclose(y[0], alone)  # row 0 was dropped out


def test_launch_variants_cover_decode_and_prefill():
    """The compile report's enumeration holds the mixed kernels' launches, found by running their launchers: every
    A_MODE, base or none, the decode and prefill tiles, every float dtype of out and M, the float32 w = h M, index
    pointers, and the dM kernel; every tl.dot tile at least 16."""
    from mora_kernels import diagnostics, triton_mixed, tuning

    variants = [v for v in diagnostics.launch_variants() if v[0].__name__ in diagnostics.MIXED_KERNELS]
    project = [(s, c) for kernel, s, c, *_ in variants if kernel.__name__ == "_mixed_project_kernel"]
    assert {c["A_MODE"] for _, c in project} == {0, 1, 2}
    assert {c["HAS_BASE"] for _, c in project} == {False, True}
    few_many = {tuning.DEFAULT_TILES[f"project/{k}"].block_t for k in ("few", "many")}
    assert {c["BLOCK_T"] for _, c in project} == few_many | {triton_mixed.DECODE_TILE_F32.block_t}
    assert {s["out_ptr"] for s, _ in project} == {s["m_ptr"] for s, _ in project} == {"*fp32", "*fp16", "*bf16"}
    assert all(s["order_ptr"] == s["seg_ptr"] == s["tile_seg_ptr"] == "*i64" for s, _ in project)
    assert any(s["a_ptr"] == s["out_ptr"] == "*fp32" and not c["HAS_BASE"] for s, c in project)
    assert {kernel.__name__ for kernel, *_ in variants} == set(diagnostics.MIXED_KERNELS)
    assert all(min(c[k] for k in c if k.startswith("BLOCK_")) >= 16 for _, _, c, *_ in variants)
