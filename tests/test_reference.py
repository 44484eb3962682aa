"""The reference against the golden cases, its own closed forms, autograd, and properties of MoRA (docs/design.md)."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mora_kernels as mk
from mora_kernels import reference
from mora_kernels.core import Geometry, MoRAType, rope_tables

from .helpers import golden_case, golden_ids

# float64 end to end: the golden cases were computed in float64 from docs/design.md, so the only differences are
# summation order over at most a few hundred terms of size ~1: ~1e-14; 1e-10 leaves margin yet catches any
# wrong index (errors of order 1).
F64 = dict(atol=1e-10, rtol=1e-10)
TYPES = [1, 2, 3, 4, 6, 7]


@pytest.mark.parametrize("case_id", golden_ids())
def test_golden_case(case_id):
    case, t = golden_case(case_id)
    n, m = case["n"], case["m"]
    assert mk.r_hat(n, m, case["r"], case["mora_type"]) == case["r_hat"] == t["M"].shape[0]
    geo = Geometry(n, m, case["r_hat"], MoRAType(case["mora_type"]))
    assert geo.pad == case["pad"]
    y = mk.mora(t["x"], t["M"], m, case["mora_type"])
    torch.testing.assert_close(y, t["y"], **F64)
    dx, dM = reference.backward(t["g"], t["x"], t["M"], geo)
    torch.testing.assert_close(dx, t["dx"], **F64)
    torch.testing.assert_close(dM, t["dM"], **F64)
    x, M = t["x"].clone().requires_grad_(), t["M"].clone().requires_grad_()
    (mk.mora(x, M, m, case["mora_type"]) * t["g"]).sum().backward()
    torch.testing.assert_close(x.grad, t["dx"], **F64)
    torch.testing.assert_close(M.grad, t["dM"], **F64)
    dW = mk.delta_weight(t["M"], n, m, case["mora_type"])
    if "dW" in t:
        torch.testing.assert_close(dW, t["dW"], **F64)
    torch.testing.assert_close(t["x"] @ dW.T, t["y"], **F64)
    torch.testing.assert_close(t["g"] @ dW, t["dx"], **F64)


# The table of R in docs/design.md#square-size for (n, m) and r = 8 ... 256, as "type 1 / type 6".
R_TABLE = {
    (4096, 4096): "256/256 362/362 512/512 724/724 1024/1024 1448/1448",
    (4096, 11008): "348/348 492/492 695/694 983/982 1390/1390 1966/1966",
    (4096, 1024): "202/202 286/286 405/404 572/572 810/810 1145/1144",
    (4096, 14336): "384/384 543/542 768/768 1086/1086 1536/1536 2172/2172",
    (2048, 2048): "181/180 256/256 362/362 512/512 724/724 1024/1024",
}


@pytest.mark.parametrize("shape", R_TABLE)
def test_r_hat_matches_spec_table(shape):
    for r, entry in zip((8, 16, 32, 64, 128, 256), R_TABLE[shape].split()):
        t1, t6 = map(int, entry.split("/"))
        assert mk.r_hat(*shape, r, 1) == t1
        assert all(mk.r_hat(*shape, r, t) == t1 for t in (2, 3, 4))
        assert mk.r_hat(*shape, r, 6) == t6 == mk.r_hat(*shape, r, "decoupled")


@given(n=st.integers(1, 20000), m=st.integers(1, 20000), r=st.integers(1, 512))
def test_r_hat_rounds_to_nearest(n, m, r):
    exact = math.sqrt((n + m) * r)
    R = mk.r_hat(n, m, r, 1)
    assert abs(R - exact) <= 0.5
    assert R == math.floor(exact + 0.5)  # the original's float rule, at these sizes exact in float64


# Real model shapes: forward and backward against the closed-form dW, in float64 on a few rows.
REAL = [(4096, 11008, 8, 6), (4096, 4096, 256, 1), (11008, 4096, 8, 6), (4096, 1024, 32, 1), (4096, 14336, 16, 4),
        (4096, 11008, 64, 2), (14336, 4096, 8, 3), (4096, 11008, 8, 7)]


@pytest.mark.parametrize("n,m,r,mora_type", REAL)
def test_real_shapes_match_delta_weight(n, m, r, mora_type):
    torch.manual_seed(0)
    R = mk.r_hat(n, m, r, mora_type)
    M = torch.randn(R, R, dtype=torch.float64) / R
    x = torch.randn(3, n, dtype=torch.float64)
    g = torch.randn(3, m, dtype=torch.float64)
    dW = mk.delta_weight(M, n, m, mora_type)
    torch.testing.assert_close(mk.mora(x, M, m, mora_type), x @ dW.T, **F64)
    dx, _ = reference.backward(g, x, M, Geometry(n, m, R, MoRAType(mora_type)))
    torch.testing.assert_close(dx, g @ dW, **F64)


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("n,m,r", [(7, 5, 2), (5, 19, 3), (1, 6, 2), (12, 1, 2), (30, 30, 1)])
def test_gradcheck(n, m, r, mora_type):
    torch.manual_seed(1)
    R = mk.r_hat(n, m, r, mora_type)
    x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    M = torch.randn(R, R, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, m, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, M, b: mk.mora(x, M, m, mora_type, base=b, scaling=0.5), (x, M, base))


def _float64_case(n, m, R, mora_type, lead, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, dtype=torch.float64, generator=gen)
    M = torch.randn(R, R, dtype=torch.float64, generator=gen)
    g = torch.randn(*lead, m, dtype=torch.float64, generator=gen)
    return x, M, g


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 70),
    m=st.integers(1, 70),
    r=st.integers(1, 12),
    mora_type=st.sampled_from(TYPES),
    lead=st.lists(st.integers(0, 3), min_size=0, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_properties(n, m, r, mora_type, lead, seed):
    """forward == x dW^T, autograd == explicit closed-form backward, dx == g dW, and type 1 == its closed form."""
    t = MoRAType(mora_type)
    R = mk.r_hat(n, m, r, t) if not t.blockwise or (n + m) * r >= 3 else 2
    x, M, g = _float64_case(n, m, R, t, lead, seed)
    geo = Geometry(n, m, R, t)
    dW = mk.delta_weight(M, n, m, t)
    xg, Mg = x.clone().requires_grad_(), M.clone().requires_grad_()
    y = mk.mora(xg, Mg, m, t)
    assert y.shape == (*lead, m)
    torch.testing.assert_close(y, x @ dW.T, **F64)
    (y * g).sum().backward()
    dx, dM = reference.backward(g, x, M, geo)
    torch.testing.assert_close(dx, xg.grad, **F64)
    torch.testing.assert_close(dM, Mg.grad, **F64)
    torch.testing.assert_close(dx, g @ dW, **F64)
    if t == MoRAType.SHARING:
        # Closed form (docs/design.md#merge): dW[k, c] = sum over i < B R with i mod n == c of M[k mod R, i mod R].
        k = torch.arange(m)[:, None]
        expected = torch.zeros(m, n, dtype=torch.float64)
        for i in range(geo.blocks * R):
            expected[:, i % n] += M[k[:, 0] % R, i % R]
        torch.testing.assert_close(dW, expected, **F64)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 50),
    m=st.integers(1, 50),
    mora_type=st.sampled_from(TYPES),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    m_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_reduced_precision_is_computed_in_float32(n, m, mora_type, dtype, m_dtype, seed):
    """Low-precision inputs are upcast: the result equals the float64 result rounded once to x's dtype."""
    R = mk.r_hat(n, m, 4, mora_type)
    x, M, _ = _float64_case(n, m, R, mora_type, (2, 3), seed)
    x, M = x.to(dtype), M.to(m_dtype)
    y = mk.mora(x, M, m, mora_type)
    assert y.dtype == dtype
    exact = mk.mora(x.double(), M.double(), m, mora_type)
    # float32 accumulation of <= ~100 products of size ~1: error ~1e-5 relative, far below one rounding to
    # x's dtype (eps 2^-8 bf16, 2^-11 fp16, 2^-24 fp32 adds its own ~1e-6 at this size): one ulp of the output
    # plus the float32 accumulation bound.
    eps = torch.finfo(dtype).eps
    bound = eps * exact.abs() + 1e-5 * (1 + exact.abs().max())
    assert ((y.double() - exact).abs() <= bound).all()


def test_rope_tables_float32_and_follow_spec():
    cos, sin = rope_tables(6, 3)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (3, 6)
    freqs = 1.0 / (10000 ** (torch.arange(0, 6, 2, dtype=torch.float32) / 6))
    angles = torch.outer(torch.arange(3, dtype=torch.float32), freqs)
    torch.testing.assert_close(cos[:, :3], angles.cos(), rtol=0, atol=0)
    torch.testing.assert_close(cos[:, 3:], cos[:, :3], rtol=0, atol=0)  # the halves share angles
    torch.testing.assert_close(sin[0], torch.zeros(6), rtol=0, atol=0)  # block 0 is not rotated


def test_type6_skips_blocks_that_cannot_reach_the_output():
    """When m < B R, inputs past block ceil(m / R) have no effect (Llama-2 down_proj at r=8: 4176 of 11008)."""
    n, m = 11008, 4096
    R = mk.r_hat(n, m, 8, 6)
    geo = Geometry(n, m, R, MoRAType.ROPE)
    assert geo.used_blocks * R == 4176
    torch.manual_seed(0)
    M = torch.randn(R, R, dtype=torch.float64)
    x = torch.randn(2, n, dtype=torch.float64)
    x2 = x.clone()
    x2[:, geo.used_blocks * R :] = torch.randn(2, n - geo.used_blocks * R, dtype=torch.float64)
    torch.testing.assert_close(mk.mora(x, M, m, 6), mk.mora(x2, M, m, 6), rtol=0, atol=0)
    assert (mk.delta_weight(M, n, m, 6)[:, geo.used_blocks * R :] == 0).all()


@pytest.mark.parametrize("mora_type", TYPES)
def test_delta_weight_is_vectorized(mora_type):
    """The merge is a fixed number of tensor ops whatever the layer size (the original looped over n + P columns).

    Counted with a TorchDispatchMode: the same count for a 40 x 24 and a 4096 x 11008 layer.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n, m in ((40, 24), (4096, 11008)):
        R = mk.r_hat(n, m, 8, mora_type)
        M = torch.randn(R, R)
        with CountOps() as mode:
            mk.delta_weight(M, n, m, mora_type)
        counts.append(mode.count)
    assert counts[0] == counts[1] < 40, counts


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("n,m", [(40, 24), (24, 40), (5, 40), (40, 6)])
def test_delta_weight_of_a_stack_is_each_matrix_in_one_pass(n, m, mora_type):
    """One M per expert, ``(E, R, R)``: the same ops as for one M (padded, tiny-n and group cases included), so each
    expert's dW and its gradient are bit for bit those of its own M."""
    geo = Geometry(n, m, mk.r_hat(n, m, 3, mora_type), MoRAType(mora_type))
    M = torch.randn(5, geo.R, geo.R, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    G = torch.randn(5, m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    stacked = reference.delta_weight(M, geo)
    (grad,) = torch.autograd.grad((stacked * G).sum(), M)
    for e in range(5):
        Me = M[e].detach().requires_grad_()
        one = reference.delta_weight(Me, geo)
        assert torch.equal(stacked[e], one)
        assert torch.equal(grad[e], torch.autograd.grad((one * G[e]).sum(), Me)[0])


@pytest.mark.parametrize("mora_type", TYPES)
def test_one_to_one_is_the_rank_of_the_update_map(mora_type):
    """``Geometry.one_to_one`` (R <= min(n, m), docs/design.md#one-to-one) against the rank of M -> dW itself: the
    R^2 x (m n) matrix of dW's of the unit matrices, full rank exactly when dW determines M. The shapes cover n and
    m below, at and above R, R dividing them or not (type 1's padded columns), one and several blocks."""
    seen = set()
    for n, m, r in itertools.product((3, 5, 8, 12, 17, 40), (4, 8, 13, 40), (1, 3)):
        try:
            R = mk.r_hat(n, m, r, mora_type)
        except ValueError:  # too small for the rotation's even R
            continue
        geo = Geometry(n, m, R, MoRAType(mora_type))
        units = torch.eye(R * R, dtype=torch.float64).view(R * R, R, R)
        rank = torch.linalg.matrix_rank(torch.stack([reference.delta_weight(u, geo).flatten() for u in units]))
        assert (rank == R * R) == geo.one_to_one, (n, m, R, int(rank))
        seen.add(geo.one_to_one)
    assert seen == {True, False}
