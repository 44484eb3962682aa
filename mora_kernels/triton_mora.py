"""Fused Triton backend of MoRA: forward and backward kernels, registered as ``torch.library`` custom ops.

Every MoRA type is one matrix product ``A @ M^T`` between a gather and a scatter:

- types 1-4: ``A = C(x)``, one row of R values per token (``_compress_kernel`` writes it, float32, ``T x R``);
- types 6/7: ``A`` has one row per (token, used block), gathered from x at ``(b R + j) mod n`` and rotated on
  load (``_load_a``), so neither the padded nor the rotated input ever exists in memory.

``_project_kernel`` computes a tile of ``A @ M^T`` with ``tl.dot`` over R and stores it straight into every output
position that copies it (``_copy_position``: the tiled copies ``k = b R + i + e*period`` or the contiguous group of
column i), adding the base layer's output on the way when given: the output is written exactly once and no tiled
intermediate exists.

Backward (``h = D^T(g)``, ``dx = C^T(h M)``, ``dM = h^T A``):
``_decompress_adjoint_kernel`` gathers and sums the copies of g into ``h`` (float32, one row per row of A),
``_project_kernel`` again computes ``w = h M`` (M passed transposed), ``_compress_adjoint_kernel`` gathers ``w``
back onto x's columns (with the adjoint rotation for type 6), and ``_dm_kernel`` reduces ``h^T A`` over rows in a
fixed order (split over row chunks whose float32 partials are summed in a fixed order: deterministic). Backward keeps
only what it needs: ``C(x)`` (R values per token) for types 1-4, x itself for types 6/7 (A is recomputed).

Bytes (the kernels are memory bound for the R of real models when the dot runs on tensor cores): forward reads x
once (types 6/7: from HBM once, then from L2 by the other ``R / BLOCK_N - 1`` column tiles of M, which the grid
order runs back to back; R/64 L2 reads in all, an assumption until measured on a GPU), writes and
re-reads the T x R float32 ``C(x)`` (types 1-4; ``R / n`` of x's size in elements), and reads base / writes out
once each: about ``T (n + 2m) * elem + 8 T R`` bytes, the floor being ``T (n + 2m) * elem``. FLOPs are
``2 T R^2`` (types 1-4) and ``2 T Bu R^2`` (6/7), under the H100 bf16 ridge (~240 FLOP/byte) for R up to ~1000 at
n = m = 4096 in bf16 (tensor cores). Products with a float32 operand (M float32, the layer's default, or x float32)
run as 3xTF32 (``_dot_mode``: float32 accuracy on tensor cores), ~165 TFLOP/s on an H100 SXM at spec-sheet rates
(a third of the 494 dense TF32, against 989 bf16; benchmarks/bytes_model.py costs it at a derated ~133), a ridge of
~50 FLOP/byte: types 1-4 stay memory bound up to R ~ 880 at n = m = 4096 with bf16 x, types 6/7 (``2 n R`` FLOPs
per token) turn compute bound from R ~ 150 (~1.7x over the memory floor at R = 256); M in bfloat16 keeps them on
the bf16 path. None of this has been measured on a GPU yet.

Dtypes: x float32/float16/bfloat16, M float32 or any of those, base any of those. float64 runs through the reference
(Triton's fp64 dot has no tensor-core path and MoRA in fp64 is a testing configuration, not a training one).
"""

from __future__ import annotations

import contextlib
import enum
import os

import torch
import triton
import triton.language as tl

from . import tuning
from .core import Geometry, MoRAType


class AMode(enum.IntEnum):
    """How ``_load_a`` reads the left operand A of the projection and dM kernels (their ``A_MODE`` constexpr)."""

    DENSE = 0  # a dense float32 matrix: C(x) (types 1-4) or h (backward)
    GATHER = 1  # block b of token t's cyclically padded input, gathered from x (type 7)
    ROPE = 2  # the same block, rotated (type 6)

    @classmethod
    def of(cls, t: MoRAType) -> "AMode":
        return {MoRAType.ROPE: cls.ROPE, MoRAType.DECOUPLED: cls.GATHER}.get(t, cls.DENSE)

    @property
    def kind(self) -> str:
        """The name ``tuning`` keys tiles by."""
        return self.name.lower()


class AdjointMode(enum.IntEnum):
    """How ``_compress_adjoint_kernel`` maps w back onto x's columns (its ``MODE`` constexpr)."""

    GROUPS = 0  # types 2/3: dx[c] = w[group of c]
    BLOCK_SUM = 1  # types 1/4: sum over the padded positions of c, one w row per token
    GATHER = 2  # type 7: the same over (token, block) rows of w
    ROPE = 3  # type 6: with the adjoint rotation

    @classmethod
    def of(cls, t: MoRAType) -> "AdjointMode":
        if t.compress_groups:
            return cls.GROUPS
        return {MoRAType.ROPE: cls.ROPE, MoRAType.DECOUPLED: cls.GATHER}.get(t, cls.BLOCK_SUM)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------

# The interpreter (triton 3.8) truncates float32 -> bfloat16 casts instead of rounding to nearest even as the GPU
# does; _round_to emulates the GPU there so the interpreter tests measure the GPU's rounding, not a worse one.
_INTERPRET_BF16_FIX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """``v.to(DTYPE)``, rounding float32 to nearest even."""
    if _INTERPRET_BF16_FIX and DTYPE == tl.bfloat16 and v.dtype == tl.float32:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(DTYPE)



@triton.jit
def _copy_position(b, i, e, R, m, period, GROUPS: tl.constexpr):
    """Output column of copy ``e`` of column ``i`` of block ``b`` of ``A @ M^T``, and whether that copy exists.

    Tile decompress (types 1, 3, 6, 7): ``k = b R + i + e * period`` while ``k < m`` (period R, or B R for 6/7).
    Group decompress (types 2, 4): column i owns the contiguous group ``[i q + min(i, s), ... + q + (i < s))`` of
    the split of m into R groups, ``q = m div R``, ``s = m mod R``.
    """
    if GROUPS:
        q = m // R
        s = m % R
        k = i * q + tl.minimum(i, s) + e
        valid = e < q + (i < s).to(tl.int32)
    else:
        k = b * R + i + e * period
        valid = k < m
    return k, valid


@triton.jit
def _load_a(a_ptr, stride_ar, stride_ac, cos_ptr, sin_ptr, rows, cols, n_rows, Bu, R, n, A_MODE: tl.constexpr):
    """Float32 tile of the left operand A at (rows, cols) (broadcastable int64 rows, int32 cols).

    A_MODE 0: A is a dense matrix (``C(x)`` or ``h``). 1: row ``t Bu + b`` of A is block b of token t's padded
    input, ``xp[b R + j] = x[(b R + j) mod n]`` (type 7). 2: the same block rotated (type 6):
    ``z[j] = v[j] cos[b, j] + rotate_half(v)[j] sin[b, j]``, ``rotate_half(v)[j] = -v[j + R/2]`` for ``j < R/2``
    and ``v[j - R/2]`` above, in float32 with the reference's float32 tables, so z equals the reference's exactly.
    """
    mask = (rows < n_rows) & (cols < R)
    if A_MODE == 0:  # AMode.DENSE
        a = tl.load(a_ptr + rows * stride_ar + cols.to(tl.int64) * stride_ac, mask=mask, other=0.0).to(tl.float32)
    else:
        row_ptr = a_ptr + (rows // Bu) * stride_ar
        b = (rows % Bu).to(tl.int32)
        column = ((b * R + cols) % n).to(tl.int64)
        a = tl.load(row_ptr + column * stride_ac, mask=mask, other=0.0).to(tl.float32)
        if A_MODE == 2:  # AMode.ROPE
            half = R // 2
            partner = tl.where(cols < half, cols + half, cols - half)
            column = ((b * R + partner) % n).to(tl.int64)
            v = tl.load(row_ptr + column * stride_ac, mask=mask, other=0.0).to(tl.float32)
            cos = tl.load(cos_ptr + b * R + cols, mask=mask, other=0.0)
            sin = tl.load(sin_ptr + b * R + cols, mask=mask, other=0.0)
            a = a * cos + tl.where(cols < half, -v, v) * sin
    return a


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with operands rounded to DOT_DTYPE, float32 accumulation.

    UPCAST (set by the launcher under the interpreter, whose bf16 arithmetic is wrong) rounds the operands to
    DOT_DTYPE and multiplies them in float32: products of 8/11-bit mantissas are exact in float32, so this equals
    a tensor-core bf16/fp16 dot up to the order of the float32 accumulation.
    """
    a = _round_to(a, DOT_DTYPE)
    b = _round_to(b, DOT_DTYPE)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _compress_kernel(
    x_ptr, c_ptr, T, n, R, B, stride_xr, stride_xc,
    GROUPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """``c = C(x)`` for types 1-4, float32 ``(T, R)`` contiguous: strided block sum or contiguous group sum."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)[:, None]
    j = (tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J))[None, :]
    inside = (rows < T) & (j < R)
    acc = tl.zeros((BLOCK_T, BLOCK_J), dtype=tl.float32)
    x_rows = x_ptr + rows * stride_xr
    if GROUPS:
        q = n // R
        s = n % R
        start = j * q + tl.minimum(j, s)
        size = q + (j < s).to(tl.int32)
        for e in range(0, q + 1):
            column = (start + e).to(tl.int64)
            acc += tl.load(x_rows + column * stride_xc, mask=inside & (e < size), other=0.0).to(tl.float32)
    else:
        for b in range(0, B):
            column = ((b * R + j) % n).to(tl.int64)
            acc += tl.load(x_rows + column * stride_xc, mask=inside, other=0.0).to(tl.float32)
    tl.store(c_ptr + rows * R + j, acc, mask=inside)


@triton.jit
def _project_kernel(
    a_ptr, m_ptr, cos_ptr, sin_ptr, base_ptr, out_ptr,
    n_rows, Bu, R, n, m, period, copies,
    stride_ar, stride_ac, stride_mi, stride_mj, stride_br, stride_bc, stride_or, stride_oc,
    scaling,
    A_MODE: tl.constexpr, GROUPS: tl.constexpr, HAS_BASE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[t, k] = base[t, k] + scaling * (A M^T)[t Bu + b, i]`` for every copy k of (b, i) (``_copy_position``).

    One program owns a ``BLOCK_T x BLOCK_N`` tile of ``A M^T`` (rows of A, columns i of M's rows), reduces over
    R in BLOCK_K steps, then writes the tile to each of its copies: each output element is written once.
    Backward uses it for ``w = h M`` with M's strides swapped, no base and ``copies = 1``, ``period = m = R``.
    """
    # A 1-D grid with the column tiles fastest: the R / BLOCK_N programs that read the same rows of A (the same
    # rows of x for types 6/7) run back to back, so all but the first find them in L2 instead of HBM.
    col_tiles = tl.cdiv(R, BLOCK_N)
    pid = tl.program_id(0)
    rows = (pid // col_tiles).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    i = (pid % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = _load_a(a_ptr, stride_ar, stride_ac, cos_ptr, sin_ptr, rows[:, None], kk[None, :], n_rows, Bu, R, n,
                    A_MODE)
        mt = tl.load(m_ptr + i[None, :] * stride_mi + kk[:, None] * stride_mj,
                     mask=(i[None, :] < R) & (kk[:, None] < R), other=0.0)
        acc = _dot(a, mt, acc, DOT_DTYPE, PRECISION, UPCAST)
    acc = acc * scaling
    t = (rows // Bu)[:, None]
    b = (rows % Bu).to(tl.int32)[:, None]
    inside = (rows[:, None] < n_rows) & (i[None, :] < R)
    for e in range(0, copies):
        k, valid = _copy_position(b, i[None, :], e, R, m, period, GROUPS)
        mask = inside & valid
        value = acc
        if HAS_BASE:
            value += tl.load(base_ptr + t * stride_br + k.to(tl.int64) * stride_bc, mask=mask, other=0.0).to(
                tl.float32)
        tl.store(out_ptr + t * stride_or + k.to(tl.int64) * stride_oc, _round_to(value, out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _decompress_adjoint_kernel(
    g_ptr, h_ptr, n_rows, Bu, R, m, period, copies, stride_gr, stride_gc, scaling,
    GROUPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``h[t Bu + b, i] = scaling * sum of g[t, k]`` over the copies k of (b, i): float32 ``(n_rows, R)``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)[:, None]
    i = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    inside = (rows < n_rows) & (i < R)
    g_rows = g_ptr + (rows // Bu) * stride_gr
    b = (rows % Bu).to(tl.int32)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for e in range(0, copies):
        k, valid = _copy_position(b, i, e, R, m, period, GROUPS)
        acc += tl.load(g_rows + k.to(tl.int64) * stride_gc, mask=inside & valid, other=0.0).to(tl.float32)
    tl.store(h_ptr + rows * R + i, acc * scaling, mask=inside)


@triton.jit
def _compress_adjoint_kernel(
    w_ptr, cos_ptr, sin_ptr, dx_ptr, T, Bw, R, n, span, folds, stride_dr, stride_dc,
    MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``dx = C^T(w)`` from float32 ``w`` of shape ``(T Bw, R)`` contiguous (MODE: ``AdjointMode``).

    MODE 0 (types 2/3): ``dx[c] = w[group of c in the split of n]``. MODE 1 (types 1/4), 2 (type 7), 3 (type 6):
    ``dx[c] = sum over padded positions p = c + a n < span`` of the value at p: ``w[p mod R]`` (one w row per
    token), ``w_b[j]`` with ``b = p div R``, ``j = p mod R``, or for type 6 the adjoint rotation
    ``w_b[j] cos[b, j] + s_j w_b[j'] sin[b, j']``, ``j' = (j + R/2) mod R``, ``s_j = +1`` below R/2, -1 above.
    """
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)[:, None]
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    inside = (t < T) & (c < n)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if MODE == 0:
        q = n // R
        s = n % R
        head = s * (q + 1)
        group = tl.where(c < head, c // (q + 1), s + (c - head) // tl.maximum(q, 1))
        acc += tl.load(w_ptr + t * R + group, mask=inside, other=0.0)
    else:
        half = R // 2
        for a in range(0, folds):
            p = c + a * n
            mask = inside & (p < span)
            b = p // R
            j = p % R
            row = t * Bw + b if MODE >= 2 else t
            value = tl.load(w_ptr + row * R + j, mask=mask, other=0.0)
            if MODE == 3:
                partner = (j + half) % R
                value = value * tl.load(cos_ptr + b * R + j, mask=mask, other=0.0)
                rotated = tl.load(w_ptr + row * R + partner, mask=mask, other=0.0) * tl.load(
                    sin_ptr + b * R + partner, mask=mask, other=0.0)
                value += tl.where(j < half, rotated, -rotated)
            acc += value
    tl.store(dx_ptr + t * stride_dr + c.to(tl.int64) * stride_dc, _round_to(acc, dx_ptr.dtype.element_ty),
             mask=inside)


@triton.jit
def _dm_kernel(
    h_ptr, a_ptr, cos_ptr, sin_ptr, part_ptr, n_rows, Bu, R, n, rows_per_split, stride_ar, stride_ac,
    A_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``part[s] = sum over rows r of split s of h[r, :]^T A[r, :]``: float32 ``(splits, R, R)`` partials of dM.

    Each program reduces its rows in ascending order and the launcher sums the partials in split order, so dM is
    bitwise reproducible run to run (no atomics).
    """
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    split = tl.program_id(2).to(tl.int64)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, n_rows)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for r0 in range(first, last, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K).to(tl.int64)
        ht = tl.load(h_ptr + r[None, :] * R + i[:, None], mask=(r[None, :] < last) & (i[:, None] < R), other=0.0)
        a = _load_a(a_ptr, stride_ar, stride_ac, cos_ptr, sin_ptr, r[:, None], j[None, :], last, Bu, R, n, A_MODE)
        acc = _dot(ht, a, acc, DOT_DTYPE, PRECISION, UPCAST)
    tl.store(part_ptr + split * R * R + (i[:, None] * R + j[None, :]), acc, mask=(i[:, None] < R) & (j[None, :] < R))


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------

# Tile configurations of the projection and dM kernels come from ``tuning.tile``: a sweep measured on this GPU and
# Triton version where ``tuned.json`` has one, else ``tuning.DEFAULT_TILES`` (why those sizes: see there). The same
# choice runs under the interpreter (no autotuning, which fails there with more than one config).
# Gathers and scatters (compress, both adjoints): 32 x 64 tiles, 16 elements per thread at 4 warps, 64 contiguous
# columns per row so each row's loads/stores are 256-byte (fp32) or 128-byte (16-bit) segments.
_GATHER_CONFIG = (32, 64, 4)
# dM splits over rows so that there are about two programs per SM of an H100/H200 (132 SMs) even when R is small
# (R = 256 gives only 16 output tiles of 64 x 64).
_DM_TARGET_PROGRAMS = 264
_DM_MIN_ROWS_PER_SPLIT = 512


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_mode(x_dtype: torch.dtype, m_dtype: torch.dtype):
    """(DOT_DTYPE, PRECISION, UPCAST) for the products with M: computed in at least float32, or in the 16-bit
    dtype the caller chose for both x and M.

    - x and M both float16 or both bfloat16: tensor-core products in that dtype, float32 accumulation. The
      operands (``C(x)`` or ``h``, and M) are rounded to that dtype, as plain PyTorch in that dtype rounds them.
    - Any other pair (M float32 as in the original release, x float32, or mixed 16-bit dtypes): float32 operands
      with ``"tf32x3"``. Plain TF32 (``"tf32"``, Triton's default) rounds both operands to 11 significant bits:
      a 2^-11 relative error per product, the same as float16's and 2^13 times float32's, while the original
      release multiplies in float32 (PyTorch's default float32 matmul precision, "highest", uses no TF32).
      ``"ieee"`` (float32 FMA) is as accurate but runs on the CUDA cores: 67 TFLOP/s on an H100 SXM against 494
      dense TF32 (spec sheet), so 3xTF32 (three TF32 products, ~165 effective) is ~2.5x faster. 3xTF32 splits
      ``a = big + small`` with ``big = tf32(a)`` (rounded, ``|small| <= 2^-11 |a|``) and sums
      ``big*big' + big*small' + small*big'``: the dropped ``small*small'`` is at most 2^-22 |a b|, and the tensor
      core truncates each ``small`` to TF32 (at most 2^-10 of it, 2^-21 |a|), so each product errs by at most
      5 * 2^-22 |a b| (20 float32 unit roundoffs), independent of R; the float32 sum of the R products (up to
      R * 2^-24 of the sum of their magnitudes, Higham) dominates from R ~ 20 on, as in any float32 matmul.
      The interpreter ignores the precision (its dot is exact float32): only a GPU run measures it.
    """
    if x_dtype == m_dtype and x_dtype in (torch.float16, torch.bfloat16):
        # The precision only applies to float32 operands; with UPCAST (interpreter) the dot is exact anyway.
        return _TL_DTYPE[x_dtype], "ieee", _interpreting()
    return tl.float32, "tf32x3", False


def _geometry_launch_args(geo: Geometry):
    """(rows of A per token, period of the tile decompress, copies per column of A M^T)."""
    Bu = geo.used_blocks if geo.t.blockwise else 1
    period = geo.blocks * geo.R if geo.t.blockwise else geo.R
    copies = -(-geo.m // geo.R) if geo.t.decompress_groups else -(-geo.m // period)
    return Bu, period, copies


def _dot_kind(precision: str) -> str:
    return "f32" if precision == "tf32x3" else "b16"


def _project(a, M, out, *, a_mode: AMode, n_rows: int, Bu: int, R: int, n: int, m: int, period: int, copies: int,
             groups: bool, scaling: float, x_dtype: torch.dtype, transpose_m: bool = False, cos=None, sin=None,
             base=None):
    """``out (+)= scaling * A M^T`` (or ``A M`` with ``transpose_m``) scattered to its copies; see _project_kernel."""
    dot_dtype, precision, upcast = _dot_mode(x_dtype, M.dtype)
    rows = "few" if n_rows < tuning.FEW_ROWS else "many"
    BT, BN, BK, warps, stages = tuning.tile(out.device, "project", a_mode.kind, _dot_kind(precision), rows)
    M = M.contiguous()  # R x R: int32 offsets inside M are safe for any R below 46340
    m_strides = (1, R) if transpose_m else (R, 1)
    if cos is None:
        cos = sin = a  # never read unless a_mode is ROPE
    grid = (triton.cdiv(n_rows, BT) * triton.cdiv(R, BN),)
    _project_kernel[grid](
        a, M, cos, sin, base if base is not None else out, out,
        n_rows, Bu, R, n, m, period, copies,
        a.stride(0), a.stride(1), m_strides[0], m_strides[1],
        *(base.stride() if base is not None else (0, 0)), out.stride(0), out.stride(1),
        scaling,
        A_MODE=int(a_mode), GROUPS=groups, HAS_BASE=base is not None,
        DOT_DTYPE=dot_dtype, PRECISION=precision, UPCAST=upcast,
        BLOCK_T=BT, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages,
    )


def _rope_args(cos, sin, x):
    """The tables as kernel arguments; types other than 6 pass x (never read: A_MODE is not ROPE)."""
    if cos is None:
        return x, x
    return cos.contiguous(), sin.contiguous()


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (a layer on cuda:1 of a model split with
    ``device_map="auto"`` while cuda:0 is current), as the CUDA binding's device guard does."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward(x, M, cos, sin, base, geo: Geometry, scaling: float, out=None):
    """``(out, c)``: ``out = base + scaling * D(M C(x))`` of shape ``(T, m)`` from x ``(T, n)``; ``c = C(x)``
    float32 ``(T, R)`` for types 1-4 (saved for backward), an empty tensor for types 6/7.

    ``out`` may be ``base`` itself (in-place accumulate): each output element is read from base and written by
    the same program, once, so the aliasing is safe."""
    with _on(x.device):
        return _forward(x, M, cos, sin, base, geo, scaling, out)


def _forward(x, M, cos, sin, base, geo: Geometry, scaling: float, out):
    T, R = x.shape[0], geo.R
    if out is None:
        out = torch.empty((T, geo.m), dtype=base.dtype if base is not None else x.dtype, device=x.device)
    blockwise = geo.t.blockwise
    c = torch.empty((0 if blockwise else T, R), dtype=torch.float32, device=x.device)
    if T == 0:
        return out, c
    Bu, period, copies = _geometry_launch_args(geo)
    if blockwise:
        a = x
    else:
        BT, BJ, warps = _GATHER_CONFIG
        _compress_kernel[(triton.cdiv(T, BT), triton.cdiv(R, BJ))](
            x, c, T, geo.n, R, geo.blocks, x.stride(0), x.stride(1),
            GROUPS=geo.t.compress_groups, BLOCK_T=BT, BLOCK_J=BJ, num_warps=warps,
        )
        a = c
    cos, sin = _rope_args(cos, sin, x)
    _project(a, M, out, a_mode=AMode.of(geo.t), n_rows=T * Bu, Bu=Bu, R=R, n=geo.n, m=geo.m, period=period,
             copies=copies, groups=geo.t.decompress_groups, scaling=scaling, x_dtype=x.dtype, cos=cos, sin=sin,
             base=base)
    return out, c


def backward(g, saved, M, cos, sin, geo: Geometry, scaling: float, x_dtype, need_dx: bool, need_dM: bool):
    """``(dx, dM)`` of ``sum(out * g)`` for g ``(T, m)``; ``saved`` is ``C(x)`` (types 1-4) or x (types 6/7).
    A gradient that is not needed comes back with 0 rows."""
    with _on(g.device):
        return _backward(g, saved, M, cos, sin, geo, scaling, x_dtype, need_dx, need_dM)


def _backward(g, saved, M, cos, sin, geo: Geometry, scaling: float, x_dtype, need_dx: bool, need_dM: bool):
    T, R, n = g.shape[0], geo.R, geo.n
    dx = torch.empty((T if need_dx else 0, n), dtype=x_dtype, device=g.device)
    dM = torch.zeros((R if need_dM else 0, R), dtype=M.dtype, device=g.device)
    if T == 0 or not (need_dx or need_dM):
        return dx, dM
    Bu, period, copies = _geometry_launch_args(geo)
    n_rows = T * Bu
    h = torch.empty((n_rows, R), dtype=torch.float32, device=g.device)
    BT, BN, warps = _GATHER_CONFIG
    _decompress_adjoint_kernel[(triton.cdiv(n_rows, BT), triton.cdiv(R, BN))](
        g, h, n_rows, Bu, R, geo.m, period, copies, g.stride(0), g.stride(1), scaling,
        GROUPS=geo.t.decompress_groups, BLOCK_T=BT, BLOCK_N=BN, num_warps=warps,
    )
    cos, sin = _rope_args(cos, sin, h)
    if need_dx:
        w = torch.empty((n_rows, R), dtype=torch.float32, device=g.device)
        # w = h M: the projection with M transposed (strides swapped), stored once (period = m = R).
        _project(h, M, w, a_mode=AMode.DENSE, n_rows=n_rows, Bu=1, R=R, n=n, m=R, period=R, copies=1, groups=False,
                 scaling=1.0, x_dtype=x_dtype, transpose_m=True)
        mode = AdjointMode.of(geo.t)
        span = (geo.used_blocks if geo.t.blockwise else geo.blocks) * R
        BT, BC, warps = _GATHER_CONFIG
        _compress_adjoint_kernel[(triton.cdiv(T, BT), triton.cdiv(n, BC))](
            w, cos, sin, dx, T, Bu, R, n, span, -(-span // n), dx.stride(0), dx.stride(1),
            MODE=int(mode), BLOCK_T=BT, BLOCK_C=BC, num_warps=warps,
        )
    if need_dM:
        dot_dtype, precision, upcast = _dot_mode(x_dtype, M.dtype)
        a_mode = AMode.of(geo.t)
        BI, BJ, BK, warps, stages = tuning.tile(g.device, "dm", a_mode.kind, _dot_kind(precision))
        tiles = triton.cdiv(R, BI) * triton.cdiv(R, BJ)
        splits = max(1, min(triton.cdiv(_DM_TARGET_PROGRAMS, tiles), triton.cdiv(n_rows, _DM_MIN_ROWS_PER_SPLIT)))
        rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), BK) * BK
        splits = triton.cdiv(n_rows, rows_per_split)
        part = torch.empty((splits, R, R), dtype=torch.float32, device=g.device)
        _dm_kernel[(triton.cdiv(R, BI), triton.cdiv(R, BJ), splits)](
            h, saved, cos, sin, part, n_rows, Bu, R, n, rows_per_split, saved.stride(0), saved.stride(1),
            A_MODE=int(a_mode), DOT_DTYPE=dot_dtype, PRECISION=precision, UPCAST=upcast,
            BLOCK_I=BI, BLOCK_J=BJ, BLOCK_K=BK, num_warps=warps, num_stages=stages,
        )
        dM = (part[0] if splits == 1 else part.sum(0)).to(M.dtype)
    return dx, dM


# ---------------------------------------------------------------------------------------------------------------------
# Backend interface (fused.py registers the ops and autograd; ops.py chooses the backend)
# ---------------------------------------------------------------------------------------------------------------------


_MIN_CAPABILITY = (8, 0)


def status(device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device``, and why not."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available to torch on this machine"
        # Triton's bfloat16 and TF32 dots (every float32 dot here is 3xTF32) need Ampere or newer. (Device
        # properties, not get_device_capability: torch.compile constant-folds them when a first call is traced.)
        props = torch.cuda.get_device_properties(device)
        if (props.major, props.minor) < _MIN_CAPABILITY:
            return False, (
                f"{props.name} has compute capability {props.major}.{props.minor}; the Triton kernels' bfloat16 and "
                f"TF32 tensor-core dots need {_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]} (Ampere) or newer"
            )
        return True, f"Triton {triton.__version__} kernels on {device}"
    if device.type == "cpu" and _interpreting():
        return True, "CPU through the Triton interpreter (TRITON_INTERPRET=1): for tests only, very slow"
    return False, (
        f"Triton kernels run on CUDA devices; on {device.type} only through the Triton interpreter, which is for "
        "tests (set TRITON_INTERPRET=1 before importing triton)"
    )
