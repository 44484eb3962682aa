"""Fused Triton backend of MoRA, one adapter: the projection and dM kernels and their launchers ``forward`` /
``backward``, which ``fused.py`` registers as ``torch.library`` custom ops. The gathers and scatters around them
(``C(x)``, ``D^T(g)``, ``C^T(w)``), the jit helpers and the launch records are ``triton_floor``'s, shared with
``triton_mixed``.

``_project_kernel`` computes a tile of ``A @ M^T`` with ``tl.dot`` over R (A: ``C(x)`` for types 1-4, read by
``load_a``; x's (rotated) blocks for types 6/7, one block per program, read by ``gathered_product``) and stores it
straight into every output position that copies it (``copy_position``: the tiled copies ``k = b R + i + e*period``
or the contiguous group of column i), adding the base layer's output on the way when given: the output is written
exactly once and no tiled intermediate exists.
Backward runs it again for ``w = h M`` (M passed transposed), and ``_dm_kernel`` reduces ``h^T A`` over rows in a
fixed order (split over row chunks whose float32 partials are summed in a fixed order: deterministic). Backward keeps
only what it needs: ``C(x)`` (R values per token) for types 1-4, x itself for types 6/7 (A is recomputed).

Bytes (the kernels are memory bound for the R of real models when the dot runs on tensor cores): forward reads x
once (types 6/7: from HBM once, then from L2 by the other ``R / BLOCK_N - 1`` column tiles of M, which the grid
order runs back to back; R/64 L2 reads in all, an assumption until measured on a GPU), writes and
re-reads the T x R ``C(x)`` (types 1-4; ``R / n`` of x's size in elements; float32, or x's dtype for 16-bit x and
M: ``DotMode.operand_dtype``), and reads base / writes out once each: about ``T (n + 2m) * elem + 2 T R * c_elem``
bytes, the floor being ``T (n + 2m) * elem``. FLOPs are
``2 T R^2`` (types 1-4) and ``2 T Bu R^2`` (6/7), under the H100 bf16 ridge (~240 FLOP/byte) for R up to ~1000 at
n = m = 4096 in bf16 (tensor cores). Products with a float32 operand (M float32, the layer's default, or x float32)
run as 3xTF32 at PyTorch's default float32 matmul precision (``triton_floor.DotMode``: float32 accuracy on tensor
cores; "high" and "medium" run TF32 and bfloat16 products), ~165 TFLOP/s on an H100 SXM at
spec-sheet rates (a third of the 494 dense TF32, against 989 bf16; benchmarks/bytes_model.py costs it at a derated
~133), a ridge of ~50 FLOP/byte: types 1-4 stay memory bound up to R ~ 880 at n = m = 4096 with bf16 x, types
6/7 (``2 n R`` FLOPs per token) turn compute bound from R ~ 150 (~1.7x over the memory floor at R = 256); M in
bfloat16 keeps them on the bf16 path. None of this has been measured on a GPU yet.

Dtypes: x float32/float16/bfloat16, M float32 or any of those, base any of those. float64 runs through the reference
(Triton's fp64 dot has no tensor-core path and MoRA in fp64 is a testing configuration, not a training one).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .core import Geometry
from .triton_floor import (
    AMode,
    DotMode,
    Layout,
    Operand,
    Products,
    backward_pass,
    block_tile,
    dm_splits,
    dot,
    forward_pass,
    gathered_product,
    interpreting,
    load_a,
    on_device,
    padded_m,
    store_copies,
)

# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _project_kernel(
    a_ptr, m_ptr, cos_ptr, sin_ptr, base_ptr, out_ptr,
    n_rows, Bu, R, n, m, period, copies,
    stride_ar, stride_ac, stride_mi, stride_mj, stride_br, stride_bc, stride_or, stride_oc,
    scaling,
    A_MODE: tl.constexpr, GROUPS: tl.constexpr, HAS_BASE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, VEC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[t, k] = base[t, k] + scaling * (A M^T)[t Bu + b, i]`` for every copy k of (b, i) (``copy_position``).

    One program owns a ``BLOCK_T x BLOCK_N`` tile of ``A M^T`` (rows of A, columns i of M's rows; for types 6/7
    the rows ``t Bu + b`` of BLOCK_T tokens t and one block b), reduces over R in BLOCK_K steps, then writes the
    tile to each of its copies: each output element is written once.
    Backward uses it for ``w = h M`` with M's strides swapped, no base and ``copies = 1``, ``period = m = R``.
    """
    if VEC > 1:  # the launcher's measure (vector_width): these sizes and row strides are multiples of VEC.
        # ``(v // VEC) * VEC`` is v itself and carries that divisibility into Triton's analysis (tl.multiple_of on
        # a kernel argument set nothing: an argument has no defining op to hold the attribute)
        R = (R // VEC) * VEC
        n = (n // VEC) * VEC
        m = (m // VEC) * VEC
        period = (period // VEC) * VEC
        stride_ar = (stride_ar // VEC) * VEC
        stride_br = (stride_br // VEC) * VEC
        stride_or = (stride_or // VEC) * VEC
    # A 1-D grid with the column tiles fastest: the R / BLOCK_N programs that read the same rows of A run back to
    # back, so all but the first find them in L2 instead of HBM; for types 6/7 the blocks b come next, so the Bu
    # programs that read the same tokens' x rows (one R-wide window each) run back to back as well.
    col_tiles = tl.cdiv(R, BLOCK_N)
    pid = tl.program_id(0)
    i = (pid % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    R16 = tl.cdiv(R, 16) * 16  # M is zero-padded to R16 x R16 (padded_m): masks at R16 keep its loads vectorized
    if A_MODE == 0:  # AMode.DENSE: rows of C(x) or h
        rows = (pid // col_tiles).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        for k0 in range(0, R, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            a = load_a(a_ptr, stride_ar, stride_ac, cos_ptr, sin_ptr, rows[:, None], kk[None, :], n_rows, Bu, R, n,
                       A_MODE)
            mt = tl.load(m_ptr + i[None, :] * stride_mi + kk[:, None] * stride_mj,
                         mask=(i[None, :] < R16) & (kk[:, None] < R16), other=0.0)
            acc = dot(a, mt, acc, DOT_DTYPE, PRECISION, UPCAST)
    else:  # x's blocks (types 6/7): a program owns BLOCK_T tokens of one block b (gathered_product says why)
        tile = pid // col_tiles
        b = tile % Bu
        t = (tile // Bu).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        T = n_rows // Bu
        acc = gathered_product(a_ptr, stride_ar, stride_ac, cos_ptr, sin_ptr, m_ptr, stride_mi, stride_mj, t, b, i,
                               T, R, R16, n, acc, A_MODE, DOT_DTYPE, PRECISION, UPCAST, BLOCK_K)
        rows = t * Bu + b
    store_copies(acc * scaling, rows, i, rows < n_rows, base_ptr, out_ptr, Bu, R, m, period, copies,
                 stride_br, stride_bc, stride_or, stride_oc, GROUPS, HAS_BASE)


@triton.jit
def _dm_kernel(
    h_ptr, a_ptr, cos_ptr, sin_ptr, part_ptr, n_rows, Bu, R, n, per_split, stride_ar, stride_ac,
    A_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``part[s] = sum over rows r of split s of h[r, :]^T A[r, :]``: float32 ``(splits, R, R)`` partials of dM.

    Dense A (types 1-4): a split is ``per_split`` consecutive rows. x's blocks (types 6/7): a split is
    ``per_split`` consecutive tokens with all their blocks, walked block by block (``block_tile``: one block per
    tile, so x's columns are contiguous); for type 6 a program's columns lie in one half of R (the grid's second
    axis counts the column tiles of each half), so their rotation partners are contiguous too. Each program reduces
    in a fixed order and the launcher sums the partials in split order, so dM is bitwise reproducible run to run
    (no atomics).
    """
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    split = tl.program_id(2)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    R16 = tl.cdiv(R, 16) * 16  # h's rows (triton_floor.dense_operand): read to R16, whole vectors
    if A_MODE == 0:  # AMode.DENSE: rows of C(x)
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        j_ok = j < R
        first = split.to(tl.int64) * per_split
        last = tl.minimum(first + per_split, n_rows)
        for r0 in range(first, last, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K).to(tl.int64)
            ht = tl.load(h_ptr + r[None, :] * R16 + i[:, None], mask=(r[None, :] < last) & (i[:, None] < R16),
                         other=0.0)
            a = load_a(a_ptr, stride_ar, stride_ac, cos_ptr, sin_ptr, r[:, None], j[None, :], last, Bu, R, n, A_MODE)
            acc = dot(ht, a, acc, DOT_DTYPE, PRECISION, UPCAST)
    else:  # x's blocks
        if A_MODE == 2:  # AMode.ROPE: columns of one half, partners in the other
            half = R // 2
            half_tiles = tl.cdiv(half, BLOCK_J)
            side = tl.program_id(1) // half_tiles
            jj = (tl.program_id(1) - side * half_tiles) * BLOCK_J + tl.arange(0, BLOCK_J)
            j_ok = jj < half
            j = side * half + jj
            partner = (1 - side) * half + jj
            sign = (2 * side - 1).to(tl.float32)
        else:
            j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
            j_ok = j < R
            partner = j
            sign = 1.0
        first = split * per_split
        last = tl.minimum(first + per_split, n_rows // Bu)
        steps = tl.cdiv(last - first, BLOCK_K)
        for s in range(0, Bu * steps):
            b = s // steps
            t = (first + (s - b * steps) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
            ht = tl.load(h_ptr + (t * Bu + b)[None, :] * R16 + i[:, None],
                         mask=(t[None, :] < last) & (i[:, None] < R16), other=0.0)
            a = block_tile(a_ptr + t[:, None] * stride_ar, t[:, None] < last, cos_ptr, sin_ptr, b * R, j, partner,
                           j_ok, sign, n, stride_ac, A_MODE)
            acc = dot(ht, a, acc, DOT_DTYPE, PRECISION, UPCAST)
    tl.store(part_ptr + split.to(tl.int64) * R * R + (i[:, None] * R + j[None, :]), acc,
             mask=(i[:, None] < R) & j_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------


# A projection is "aligned" when its rows move as 16-byte vectors, which leaves the registers for the larger prefill
# tiles of ``tuning.default_tile(aligned=True)``:
# - over x's blocks (types 6/7): each of ALIGNED_ARGS divisible by 16 (integers; pointers: their address in bytes)
#   and each of UNIT_ARGS equal to 1 (unit column strides, and one copy of each column of ``A M^T`` in out:
#   ``m <= B R``, square and down projections). Then every block starts at a multiple of 16 columns, x's, M's, base's
#   and out's rows start 16-byte aligned, x's block tiles, M's tiles and the stores move 16-byte vectors (cp.async
#   for the loads) and the epilogue runs once. The same tiles spilled 1-5 KB in the unaligned code (2-byte scalar
#   loads), and 24-200 bytes with a loop over copies (the tile and a base tile live together).
# - over a dense A (``C(x)``) with the tiled decompress (types 1/3): the pointers 16-byte aligned, unit column
#   strides (COLUMN_STRIDES), VEC_ARGS multiples of 8 (VEC 8, or all of 16) and a 16-bit out (and base). A's rows
#   (``dense_operand``: R16 columns) and M's (``padded_m``) are 16-byte vectors whatever R is, and VEC 8 makes
#   base's and out's 16-byte too, so the copies loop stores whole vectors: q_proj type 1 r=256 (R = 1448, three
#   copies) fits 128 x 128 x 32 at 174 registers. The group decompress (types 2/4, a copy count per column) spilled
#   64-736 bytes at that tile, and a float32 base and out 24-700 (sm_90 and sm_80, Triton 3.8).
# The compile check (``diagnostics.launch_variants``) compiles an aligned launch with Triton's own specialization of
# ALIGNED_ARGS and UNIT_ARGS (``aligned_specialization``) and the others with none.
ALIGNED_ARGS = ("a_ptr", "m_ptr", "cos_ptr", "sin_ptr", "base_ptr", "out_ptr", "R", "n", "m", "period", "stride_ar",
                "stride_mi", "stride_br", "stride_or")
ALIGNED_POINTERS = ALIGNED_ARGS[:6]
COLUMN_STRIDES = ("stride_ac", "stride_mj", "stride_bc", "stride_oc")
UNIT_ARGS = (*COLUMN_STRIDES, "copies")


# Triton specializes an integer argument only when it is a multiple of 16, so with R = 1448 (type 1 r=256 on
# q_proj) or 348 (type 6 r=8 on up_proj) it knew nothing of R, the period or C(x)'s row stride: every base load,
# output store and (type 6/7) x load was a 2-byte scalar, though 1448 = 8 * 181 makes whole 16-byte rows of
# bfloat16 and 348 = 4 * 87 whole 8-byte ones. VEC tells the kernel the power of two (8 or 4; 1: none) that divides
# all of VEC_ARGS, so those accesses move 16- or 8-byte vectors where the pointers are aligned (Triton's own
# pointer specialization). A fact about the integers, measured at each launch: never a guess about the data.
VEC_ARGS = ("R", "n", "m", "period", "stride_ar", "stride_br", "stride_or")  # M's stride: padded_m's R16
VEC_WIDTHS = (8, 4)  # 16 bytes of 16-bit elements (float32: 32); 8 bytes. Fewer widths, fewer compiled variants.


def vector_width(args: dict) -> int:
    """The VEC of a ``_project_kernel`` launch with these arguments (by name): see VEC_ARGS. 1 where they are all
    multiples of 16, which Triton's specialization says itself (the aligned launches keep their own machine code)."""
    if all(args[name] % 16 == 0 for name in VEC_ARGS):
        return 1
    return next((w for w in VEC_WIDTHS if all(args[name] % w == 0 for name in VEC_ARGS)), 1)


def _divisible(value, by: int = 16) -> bool:
    return (value.data_ptr() if isinstance(value, torch.Tensor) else value) % by == 0


def aligned(args: dict) -> bool:
    """Whether a ``_project_kernel`` launch with these arguments (by name) is aligned (see ALIGNED_ARGS)."""
    if args["A_MODE"] == AMode.DENSE:
        return (not args["GROUPS"] and args["out_ptr"].element_size() == 2
                and all(_divisible(args[name]) for name in ALIGNED_POINTERS)
                and all(args[name] == 1 for name in COLUMN_STRIDES)
                and all(_divisible(args[name], 8) for name in VEC_ARGS))
    return all(_divisible(args[name]) for name in ALIGNED_ARGS) and all(args[name] == 1 for name in UNIT_ARGS)


def aligned_specialization(args: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(divisible by 16, equal to 1): the arguments of an aligned launch that Triton specializes so (of ALIGNED_ARGS
    and UNIT_ARGS), which its tiles rely on; ``((), ())`` for a launch that is not aligned."""
    if not aligned(args):
        return (), ()
    return (tuple(name for name in ALIGNED_ARGS if _divisible(args[name])),
            tuple(name for name in UNIT_ARGS if args[name] == 1))


def _project(a: Operand, M, out, layout: Layout, dots: DotMode, scaling: float, base=None, transpose_m=False):
    """``out = base + scaling * A M^T`` (or ``A M`` with ``transpose_m``) scattered to its copies (base: optional);
    see _project_kernel."""
    M = padded_m(M)  # R16 x R16: int32 offsets inside M are safe for any R below 46340
    m_strides = M.stride()[::-1] if transpose_m else M.stride()
    args = dict(
        a_ptr=a.tensor, m_ptr=M, cos_ptr=a.cos, sin_ptr=a.sin, base_ptr=base if base is not None else out, out_ptr=out,
        **dict(zip(("n_rows", "Bu", "R", "n", "m", "period", "copies"), layout.scatter_args())),
        stride_ar=a.tensor.stride(0), stride_ac=a.tensor.stride(1), stride_mi=m_strides[0], stride_mj=m_strides[1],
        # without base, out's strides: never read (HAS_BASE), they keep an aligned launch aligned
        **dict(zip(("stride_br", "stride_bc"), (base if base is not None else out).stride())),
        stride_or=out.stride(0), stride_oc=out.stride(1), scaling=scaling,
        A_MODE=int(a.mode), GROUPS=layout.groups, HAS_BASE=base is not None, **dots.constexprs(),
    )
    args["VEC"] = vector_width(args)
    rows = "few" if layout.n_rows < tuning.FEW_ROWS else "many"
    BT, BN, BK, warps, stages = tuning.tile(out.device, "project", a.mode.kind, dots.kind, rows,
                                            aligned=aligned(args))
    # row tiles: of A's rows, or of tokens per block for x's blocks (types 6/7)
    row_tiles = triton.cdiv(layout.n_rows, BT) if a.mode == AMode.DENSE else triton.cdiv(layout.T, BT) * layout.Bu
    _project_kernel[(row_tiles * triton.cdiv(layout.R, BN),)](
        **args, BLOCK_T=BT, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages,
    )


def _adjoint(h, M, layout: Layout, dots: DotMode):
    """``w = h M`` (h already scaled): the projection with M transposed, one row of w per row of h (period = m = R,
    no copies)."""
    w = torch.empty((layout.n_rows, layout.R), dtype=torch.float32, device=h.device)
    R = layout.R
    rows_of_h = Layout(T=layout.n_rows, Bu=1, R=R, n=layout.n, m=R, period=R, copies=1, groups=False)
    _project(Operand(h, AMode.DENSE, h, h), M, w, rows_of_h, dots, 1.0, transpose_m=True)
    return w


def _dm(h, a: Operand, M, layout: Layout, dots: DotMode):
    """``dM = h^T A`` (h already scaled), reduced over splits (of rows, or of tokens for x's blocks) in a fixed
    order; see _dm_kernel."""
    R, n_rows = layout.R, layout.n_rows
    BI, BJ, BK, warps, stages = tuning.tile(h.device, "dm", a.mode.kind, dots.kind)
    splits = dm_splits(n_rows, triton.cdiv(R, BI) * triton.cdiv(R, BJ))
    count = n_rows if a.mode == AMode.DENSE else layout.T  # what a split is made of: rows of A, or tokens
    per_split = triton.cdiv(triton.cdiv(count, splits), BK) * BK
    splits = triton.cdiv(count, per_split)
    col_tiles = 2 * triton.cdiv(R // 2, BJ) if a.mode == AMode.ROPE else triton.cdiv(R, BJ)
    part = torch.empty((splits, R, R), dtype=torch.float32, device=h.device)
    _dm_kernel[(triton.cdiv(R, BI), col_tiles, splits)](
        h, a.tensor, a.cos, a.sin, part, n_rows, layout.Bu, R, layout.n, per_split,
        a.tensor.stride(0), a.tensor.stride(1), A_MODE=int(a.mode), **dots.constexprs(),
        BLOCK_I=BI, BLOCK_J=BJ, BLOCK_K=BK, num_warps=warps, num_stages=stages,
    )
    return (part[0] if splits == 1 else part.sum(0)).to(M.dtype)


def _products(M, dots: DotMode, scaling: float, base=None) -> Products:
    return Products(
        project=lambda a, out, layout: _project(a, M, out, layout, dots, scaling, base),
        adjoint=lambda h, layout: _adjoint(h, M, layout, dots),
        dm=lambda h, a, layout: _dm(h, a, M, layout, dots),
        h_scaling=scaling,
        operand_dtype=dots.operand_dtype,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Backend interface (fused.py registers the ops and autograd; ops.py chooses the backend)
# ---------------------------------------------------------------------------------------------------------------------


def forward(x, M, rope, base, geo: Geometry, scaling: float, out=None):
    """``(out, c)``: ``out = base + scaling * D(M C(x))`` of shape ``(T, m)`` from x ``(T, n)``; ``c = C(x)``
    ``(T, R16)`` for types 1-4 (saved for backward; ``triton_floor.dense_operand``'s layout, in x's dtype where x
    and M share a 16-bit one, else float32: ``DotMode.operand_dtype``), an empty tensor for types 6/7. ``rope``:
    type 6's ``(cos, sin)`` tables, ``(None, None)`` for the other types.

    ``out`` may be ``base`` itself (in-place accumulate): each output element is read from base and written by
    the same program, once, so the aliasing is safe."""
    with on_device(x.device):
        products = _products(M, DotMode.of(x.dtype, M.dtype), scaling, base)
        return forward_pass(x, rope, base, geo, out, products)


def backward(g, saved, M, rope, geo: Geometry, scaling: float, x_dtype, needs: tuple[bool, bool]):
    """``(dx, dM)`` of ``sum(out * g)`` for g ``(T, m)``; ``saved`` is ``C(x)`` (types 1-4) or x (types 6/7);
    ``needs``: whether dx and dM are wanted. A gradient that is not needed comes back with 0 rows."""
    need_dx, need_dM = needs
    with on_device(g.device):
        products = _products(M, DotMode.of(x_dtype, M.dtype), scaling)
        dx, dM = backward_pass(g, saved, rope, geo, x_dtype, need_dx, need_dM, products)
    if dM is None:
        dM = torch.zeros((geo.R if need_dM else 0, geo.R), dtype=M.dtype, device=g.device)
    return dx, dM


_MIN_CAPABILITY = (8, 0)


def status(device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device``, and why not."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available to torch on this machine"
        # Triton's bfloat16 and TF32 dots (float32 operands run TF32 products) need Ampere or newer. (Device
        # properties, not get_device_capability: torch.compile constant-folds them when a first call is traced.)
        props = torch.cuda.get_device_properties(device)
        if (props.major, props.minor) < _MIN_CAPABILITY:
            return False, (
                f"{props.name} has compute capability {props.major}.{props.minor}; the Triton kernels' bfloat16 and "
                f"TF32 tensor-core dots need {_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]} (Ampere) or newer"
            )
        return True, f"Triton {triton.__version__} kernels on {device}"
    if device.type == "cpu" and interpreting():
        return True, "CPU through the Triton interpreter (TRITON_INTERPRET=1): for tests only, very slow"
    return False, (
        f"Triton kernels run on CUDA devices; on {device.type} only through the Triton interpreter, which is for "
        "tests (set TRITON_INTERPRET=1 before importing triton)"
    )
