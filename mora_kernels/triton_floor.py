"""The floor both Triton launcher pairs stand on: ``triton_mora`` (one adapter) and ``triton_mixed`` (K adapters per
batch) differ only in their projection ``A M^T`` and their dM reduction; everything else is here, once.

- ``@triton.jit`` helpers the projection and dM kernels call: ``round_to``, ``copy_position``, ``load_a``, ``dot``,
  ``block_tile`` and ``gathered_product`` (x's blocks one block per tile, types 6/7), ``store_copies``;
- the kernels that do not depend on M, the same for one adapter or many: ``compress_kernel`` (``c = C(x)``, types
  1-4), ``decompress_adjoint_kernel`` (``h = D^T(g)``) and ``compress_adjoint_kernel`` (``dx = C^T(w)``);
- the records a launch is described by: ``Layout`` (how rows of A map onto tokens and columns of ``A M^T`` onto
  out's), ``Operand`` (the left operand A and how to read it), ``DotMode`` (how the products with M round);
- the two passes that run those kernels around a launcher pair's products: ``forward_pass`` and ``backward_pass``.

Every MoRA type is one matrix product ``A @ M^T`` between a gather and a scatter: types 1-4 have ``A = C(x)``, one
row of R values per token (``compress_kernel`` writes it, float32, ``T x R``); types 6/7 have one row of A per
(token, used block), gathered from x at ``(b R + j) mod n`` and rotated on load (``load_a``), so neither the padded
nor the rotated input ever exists in memory. The product's tile is stored straight into every output position that
copies it (``copy_position``, ``store_copies``), base added on the way: the output is written exactly once.
Backward: ``h = D^T(g)`` (``decompress_adjoint_kernel``), ``w = h M`` (the projection again, M transposed),
``dx = C^T(w)`` (``compress_adjoint_kernel``, with the adjoint rotation for type 6) and ``dM = h^T A``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .core import Geometry, MoRAType, padded_width, sixteen_bit_products


class AMode(enum.IntEnum):
    """How ``load_a`` reads the left operand A of the projection and dM kernels (their ``A_MODE`` constexpr)."""

    DENSE = 0  # a dense float32 matrix: C(x) (types 1-4) or h (backward)
    GATHER = 1  # block b of token t's cyclically padded input, gathered from x (type 7)
    ROPE = 2  # the same block, rotated (type 6)

    @classmethod
    def of(cls, t: MoRAType) -> AMode:
        return {MoRAType.ROPE: cls.ROPE, MoRAType.DECOUPLED: cls.GATHER}.get(t, cls.DENSE)

    @property
    def kind(self) -> str:
        """The name ``tuning`` keys tiles by."""
        return self.name.lower()


class AdjointMode(enum.IntEnum):
    """How ``compress_adjoint_kernel`` maps w back onto x's columns (its ``MODE`` constexpr)."""

    GROUPS = 0  # types 2/3: dx[c] = w[group of c]
    BLOCK_SUM = 1  # types 1/4: sum over the padded positions of c, one w row per token
    GATHER = 2  # type 7: the same over (token, block) rows of w
    ROPE = 3  # type 6: with the adjoint rotation

    @classmethod
    def of(cls, t: MoRAType) -> AdjointMode:
        if t.compress_groups:
            return cls.GROUPS
        return {MoRAType.ROPE: cls.ROPE, MoRAType.DECOUPLED: cls.GATHER}.get(t, cls.BLOCK_SUM)


# ---------------------------------------------------------------------------------------------------------------------
# Jit helpers
# ---------------------------------------------------------------------------------------------------------------------

# Under the interpreter the rounding helpers compute what the GPU's instructions do with integer arithmetic: it
# (triton 3.8) truncates float32 -> bfloat16 casts instead of rounding to nearest even as the GPU does (round_to),
# and runs no PTX (round_tf32's cvt.rna), so the interpreter tests measure the GPU's rounding, not another one.
INTERPRETER = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def round_to(v, DTYPE: tl.constexpr):
    """``v.to(DTYPE)``, rounding float32 to nearest even."""
    if INTERPRETER and DTYPE == tl.bfloat16 and v.dtype == tl.float32:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(DTYPE)


@triton.jit
def copy_position(b, i, e, R, m, period, GROUPS: tl.constexpr):
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
def load_a(a_ptr, stride_ar, stride_ac, cos_ptr, sin_ptr, rows, cols, n_rows, Bu, R, n, A_MODE: tl.constexpr):
    """Float32 tile of the left operand A at (rows, cols) (broadcastable int64 rows, int32 cols).

    A_MODE 0: A is a dense matrix (``C(x)`` or ``h``) of R16 columns, zero past R (``dense_operand``), read up
    to R16 so that its loads move whole vectors whatever R is. 1: row ``t Bu + b`` of A is block b of token t's padded
    input, ``xp[b R + j] = x[(b R + j) mod n]`` (type 7). 2: the same block rotated (type 6):
    ``z[j] = v[j] cos[b, j] + rotate_half(v)[j] sin[b, j]``, ``rotate_half(v)[j] = -v[j + R/2]`` for ``j < R/2``
    and ``v[j - R/2]`` above, in float32 with the reference's float32 tables, so z equals the reference's exactly.
    """
    if A_MODE == 0:  # AMode.DENSE
        mask = (rows < n_rows) & (cols < tl.cdiv(R, 16) * 16)
        a = tl.load(a_ptr + rows * stride_ar + cols.to(tl.int64) * stride_ac, mask=mask, other=0.0).to(tl.float32)
    else:
        mask = (rows < n_rows) & (cols < R)
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
def round_tf32(v):
    """float32 ``v`` rounded to TF32 (10 explicit mantissa bits) to nearest, ties away from zero: PTX's
    ``cvt.rna.tf32.f32`` on the GPU (overflow gives inf, NaN stays NaN), the same rounding in integer arithmetic
    under the interpreter (NaN kept apart: the GPU's 0x7FFFFFFF would carry into the sign bit). The TF32 dots below
    then see exact TF32 values (the tensor core's truncation of float32 inputs to TF32 changes nothing) and the
    interpreter's exact float32 dot reproduces their products. (The integer form on the GPU made ptxas spill 8-16
    bytes in five launch variants that the one instruction does not.)"""
    if INTERPRETER:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return tl.where(v == v, rounded, v)
    return tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def dot(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with operands rounded to DOT_DTYPE, float32 accumulation (``DotMode`` chooses the three).

    PRECISION "tf32x3" (float32 operands, precision "highest"): 3xTF32 written out, ``a = big + small`` with
    ``big`` rounded to TF32 (``small`` is exact; the tensor core truncates it to TF32, as in Triton's own), summing
    ``big*big' + big*small' + small*big'``. Triton's own "tf32x3" lowering issued 10 wgmma per K-step on sm_90
    where 6 do the work (its correction products feed the main one, and Triton lays the warps of a product whose
    result feeds another product along M only: both warpgroups of a 64-row tile computed both corrections in
    full); here each correction has its own accumulator, added after the main product, so no product feeds
    another: 6. mma.sync (sm_80; sm_90 tiles under 64 rows) still issues twice the needed HMMA (48 per K-step for
    64x64x16 at 8 warps and 32x32x32 at 4), written out or not: Triton lays the warps of products that share an
    operand along M there, and these tiles have fewer than 16 rows per warp. Tiles under 64 rows cannot use
    wgmma, so they keep Triton's own lowering (the same HMMA count, two accumulators fewer: written out, the
    mixed decode tile spilled 8 bytes on sm_90; rounding ``small`` as well spilled 8 bytes in a 64-row tile on
    sm_80). NaN in a correction product is dropped, as Triton does: an infinite operand makes ``small`` NaN while
    ``big*big'`` already carries the infinity. "tf32" (precision "high"): both operands rounded to TF32, one pass.

    UPCAST (set by the launcher under the interpreter, whose bf16 arithmetic is wrong) rounds the operands to
    DOT_DTYPE and multiplies them in float32: products of 8/11-bit mantissas are exact in float32, so this equals
    a tensor-core bf16/fp16 dot up to the order of the float32 accumulation.
    """
    if PRECISION == "tf32x3":
        if a.shape[0] < 64 or a.dtype != tl.float32 or b.dtype != tl.float32:
            # mma.sync (see above), and a 16-bit operand beside a float32 one (M or x, widened exactly): Triton's
            # own lowering, since written out these spilled 16-32 bytes in mixed-batch tiles on sm_80
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
        a_big = round_tf32(a)
        b_big = round_tf32(b)
        a_small = a - a_big
        b_small = b - b_big
        small_a = tl.dot(a_small, b_big, input_precision="tf32")
        small_b = tl.dot(a_big, b_small, input_precision="tf32")
        acc = tl.dot(a_big, b_big, acc, input_precision="tf32")
        return acc + tl.where(small_a == small_a, small_a, 0.0) + tl.where(small_b == small_b, small_b, 0.0)
    if PRECISION == "tf32":  # a 16-bit operand of a mixed pair is widened first (exactly), then rounded (a no-op)
        return tl.dot(round_tf32(a.to(tl.float32)), round_tf32(b.to(tl.float32)), acc, input_precision="tf32")
    a = round_to(a, DOT_DTYPE)
    b = round_to(b, DOT_DTYPE)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def block_tile(x_rows, row_ok, cos_ptr, sin_ptr, start, j, partner, col_ok, sign, n, stride_xc, A_MODE: tl.constexpr):
    """Float32 tile of A for the tokens of ``x_rows`` (``(rows, 1)`` pointers to x's rows, ``row_ok``) and columns
    ``j`` (1-D, contiguous, ``col_ok``) of the block starting at column ``start`` (a scalar) of the padded input:
    ``x[(start + j) mod n]`` (A_MODE 1, type 7), rotated (2, type 6) with the rotation partners ``partner`` (the
    other half's columns, contiguous too) times ``sign`` (-1 below R/2, 1 above) and the block's tables, as
    ``load_a`` computes them (the same values and float32 rounding).

    One block per tile is what lets the machine code move whole vectors: the columns ``(start + j) mod n`` differ
    from contiguous ones only by a scalar, which the compiler sees as contiguous and, where R and n are multiples
    of 8, 16-byte aligned (``load_a``'s per-row block index hides both), and the tables are one row per block,
    broadcast over the tokens instead of loaded per row."""
    mask = row_ok & col_ok[None, :]
    a = tl.load(x_rows + ((start + j) % n).to(tl.int64)[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    if A_MODE == 2:  # AMode.ROPE: z_lo = lo cos_lo - hi sin_lo, z_hi = hi cos_hi + lo sin_hi
        p = tl.load(x_rows + ((start + partner) % n).to(tl.int64)[None, :] * stride_xc, mask=mask,
                    other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + start + j, mask=col_ok, other=0.0)[None, :]
        sin = tl.load(sin_ptr + start + j, mask=col_ok, other=0.0)[None, :]
        a = a * cos + p * (sin * sign)
    return a


@triton.jit
def gathered_product(x_ptr, stride_xr, stride_xc, cos_ptr, sin_ptr, m_ptr, stride_mi, stride_mj, t, b, i, T, R, R16,
                     n, acc, A_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + A_b M^T[:, i]`` for the tokens ``t`` (int64) of one block ``b`` (a scalar): A_b's row for token t is
    block b of t's padded input, gathered from x (A_MODE 1, type 7) and rotated (2, type 6), read by
    ``block_tile``. M is ``padded_m``'s, read up to ``R16``.

    Type 6 walks each half of R in its own steps (BLOCK_K columns of one half, the last one masked), so a step's
    rotation partners are contiguous too, at a per-step scalar offset with a per-step scalar sign. One loop with
    scalar bookkeeping keeps the operands of one step live, as ``load_a``'s loop does: two loops, one per half,
    spilled in 18 launch variants on Triton 3.8, and walking both halves in one step (two dots sharing each x
    load) in 27.
    """
    x_rows = x_ptr + t[:, None] * stride_xr
    row_ok = t[:, None] < T
    start = b * R
    if A_MODE == 2:  # AMode.ROPE
        half = R // 2
        steps = tl.cdiv(half, BLOCK_K)
        for s in range(0, 2 * steps):
            side = s // steps  # 0: the low half, 1: the high half
            k = (s - side * steps) * BLOCK_K + tl.arange(0, BLOCK_K)  # columns of this half
            k_ok = k < half
            j = side * half + k  # columns of the block
            a = block_tile(x_rows, row_ok, cos_ptr, sin_ptr, start, j, (1 - side) * half + k, k_ok,
                           (2 * side - 1).to(tl.float32), n, stride_xc, A_MODE)
            mt = tl.load(m_ptr + i[None, :] * stride_mi + j[:, None] * stride_mj,
                         mask=(i[None, :] < R16) & k_ok[:, None], other=0.0)
            acc = dot(a, mt, acc, DOT_DTYPE, PRECISION, UPCAST)
    else:  # AMode.GATHER
        for k0 in range(0, R, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = block_tile(x_rows, row_ok, cos_ptr, sin_ptr, start, k, k, k < R, 1.0, n, stride_xc, A_MODE)
            mt = tl.load(m_ptr + i[None, :] * stride_mi + k[:, None] * stride_mj,
                         mask=(i[None, :] < R16) & (k[:, None] < R16), other=0.0)
            acc = dot(a, mt, acc, DOT_DTYPE, PRECISION, UPCAST)
    return acc


@triton.jit
def store_copies(acc, rows, i, row_ok, base_ptr, out_ptr, Bu, R, m, period, copies,
                 stride_br, stride_bc, stride_or, stride_oc, GROUPS: tl.constexpr, HAS_BASE: tl.constexpr):
    """Store the tile ``acc`` of ``A M^T`` (rows of A, columns i; rows with ``row_ok`` false are skipped) to every
    output that copies it, plus base when given, rounded once to out's dtype: each output element written once."""
    t = (rows // Bu)[:, None]
    b = (rows % Bu).to(tl.int32)[:, None]
    inside = row_ok[:, None] & (i[None, :] < R)
    for e in range(0, copies):
        k, valid = copy_position(b, i[None, :], e, R, m, period, GROUPS)
        mask = inside & valid
        value = acc
        if HAS_BASE:
            value += tl.load(base_ptr + t * stride_br + k.to(tl.int64) * stride_bc, mask=mask, other=0.0).to(
                tl.float32)
        tl.store(out_ptr + t * stride_or + k.to(tl.int64) * stride_oc, round_to(value, out_ptr.dtype.element_ty),
                 mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# The kernels that do not depend on M
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def compress_kernel(
    x_ptr, c_ptr, T, n, R, B, stride_xr, stride_xc,
    GROUPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """``c = C(x)`` for types 1-4, ``(T, R16)`` contiguous (``dense_operand``: zeros past R): strided block sum or
    contiguous group sum, in float32, stored in c's dtype (``Products.operand_dtype``)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)[:, None]
    j = (tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J))[None, :]
    R16 = tl.cdiv(R, 16) * 16
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
    tl.store(c_ptr + rows * R16 + j, round_to(acc, c_ptr.dtype.element_ty), mask=(rows < T) & (j < R16))


@triton.jit
def decompress_adjoint_kernel(
    g_ptr, h_ptr, n_rows, Bu, R, m, period, copies, stride_gr, stride_gc, scaling,
    GROUPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``h[t Bu + b, i] = scaling * sum of g[t, k]`` over the copies k of (b, i), ``(n_rows, R16)`` (zeros past R,
    ``dense_operand``) in h's dtype (``Products.operand_dtype``), summed in float32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)[:, None]
    i = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    inside = (rows < n_rows) & (i < R)
    g_rows = g_ptr + (rows // Bu) * stride_gr
    b = (rows % Bu).to(tl.int32)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for e in range(0, copies):
        k, valid = copy_position(b, i, e, R, m, period, GROUPS)
        acc += tl.load(g_rows + k.to(tl.int64) * stride_gc, mask=inside & valid, other=0.0).to(tl.float32)
    R16 = tl.cdiv(R, 16) * 16
    tl.store(h_ptr + rows * R16 + i, round_to(acc * scaling, h_ptr.dtype.element_ty), mask=(rows < n_rows) & (i < R16))


@triton.jit
def compress_adjoint_kernel(
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
    tl.store(dx_ptr + t * stride_dr + c.to(tl.int64) * stride_dc, round_to(acc, dx_ptr.dtype.element_ty),
             mask=inside)


# ---------------------------------------------------------------------------------------------------------------------
# Launch records and choices
# ---------------------------------------------------------------------------------------------------------------------

# Tile configurations of the projection and dM kernels come from ``tuning.tile``: a sweep measured on this GPU and
# Triton version where ``tuned.json`` has one, else ``tuning.DEFAULT_TILES`` (why those sizes: see there). The same
# choice runs under the interpreter (no autotuning, which fails there with more than one config).
# Gathers and scatters (compress, both adjoints): 32 x 64 tiles, 16 elements per thread at 4 warps, 64 contiguous
# columns per row so each row's loads/stores are 256-byte (fp32) or 128-byte (16-bit) segments.
GATHER_TILE = (32, 64, 4)  # (BLOCK_T, BLOCK_J / BLOCK_N / BLOCK_C, num_warps)
# dx of type 6 (the adjoint rotation: a value, its partner and both tables per element) at 32 x 64 spilled 8 bytes
# on sm_90 with Triton 3.6 (128 registers) under the launch specialization of up_proj's R = 348; half the rows keep
# the 128-byte row segments and spill on no supported Triton.
ROTATED_ADJOINT_TILE = (16, 64, 4)
# dM splits over rows so that there are about two programs per SM of an H100/H200 (132 SMs) even when R is small
# (R = 256 gives only 16 output tiles of 64 x 64).
DM_TARGET_PROGRAMS = 264
DM_MIN_ROWS_PER_SPLIT = 512


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.get_float32_matmul_precision()'s values


def matmul_precision() -> str:
    """PyTorch's float32 matmul precision now: ``torch.get_float32_matmul_precision()``, or, when a program set it
    through the per-backend API (``torch.backends.cuda.matmul.fp32_precision``; that getter then raises), "high"
    for its "tf32" and "highest" otherwise, as torch.matmul on CUDA reads it."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "high" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "highest"


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """Within the block, ``torch.set_float32_matmul_precision(precision)``; the previous setting after it (for
    tools that compile or measure each mode; a program sets the mode itself)."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"precision must be one of {MATMUL_PRECISIONS}, got {precision!r}")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@dataclasses.dataclass(frozen=True)
class DotMode:
    """The ``dot`` helper's constexprs for the products with M (``DOT_DTYPE``, ``PRECISION``, ``UPCAST``), and
    ``kind``, the name ``tuning`` keys tiles by: float32 operands as 3xTF32 ("f32", precision "highest"), one TF32
    pass ("tf32", "high") or rounded to bfloat16 ("rb16", "medium"), or 16-bit x and M ("b16"). "rb16" has tiles of
    its own: its float32 operands, loaded and then rounded, hold more registers than 16-bit ones."""

    dtype: tl.dtype
    precision: str
    upcast: bool
    kind: str

    @classmethod
    def of(cls, x_dtype: torch.dtype, m_dtype: torch.dtype) -> DotMode:
        """Computed in the 16-bit dtype the caller chose for both x and M, else as PyTorch's float32 matmul
        precision says (``matmul_precision()``, read at each launch, on the host).

        - x and M both float16 or both bfloat16: tensor-core products in that dtype, float32 accumulation. The
          operands (``C(x)`` or ``h``, and M) are rounded to that dtype, as plain PyTorch in that dtype rounds them.
          The matmul precision does not apply (it is about float32 operands).
        - Any other pair (M float32 as in the original release, x float32, or mixed 16-bit dtypes) has float32
          operands, and follows ``torch.get_float32_matmul_precision()`` as torch.matmul does:

          - "highest" (PyTorch's default, and the original release's float32 products): 3xTF32 (``dot``). Plain
            TF32 rounds both operands to 11 significant bits, a 2^-11 relative error per product, 2^13 times
            float32's. ``"ieee"`` (float32 FMA) is as accurate but runs on the CUDA cores: 67 TFLOP/s on an H100
            SXM against 494 dense TF32 (spec sheet), so 3xTF32 (three TF32 products, ~165 effective) is ~2.5x
            faster. 3xTF32 (``dot``: written out for tiles of 64 rows or more, Triton's own below) splits ``a =
            big + small`` with ``big = tf32(a)`` (rounded, ``|small| <= 2^-11 |a|``) and sums ``big*big' +
            big*small' + small*big'``: the dropped ``small*small'`` is at most 2^-22 |a b|, and the tensor core
            truncates each ``small`` to TF32 (at most 2^-10 of it, 2^-21 |a|), so each product errs by at most
            ``5 * 2^-22 |a b|`` (20 float32 unit roundoffs), independent of R; the float32 sum of the R products
            (up to R * 2^-24 of the sum of their magnitudes, Higham) dominates from R ~ 20 on, as in any float32
            matmul.
          - "high": one TF32 pass, both operands rounded to TF32 (``round_tf32``): each product errs by at most
            ``(2 + 2^-11) 2^-11 |a b|``, plus the float32 sum.
          - "medium": both operands rounded to bfloat16 (to nearest even, 8 significant bits), bf16 tensor-core
            products, float32 accumulation: at most ``(2 + 2^-8) 2^-8 |a b|`` per product, plus the float32 sum.
            (PyTorch documents "medium" as bfloat16 where a fast bf16 algorithm exists; cuBLAS has none for
            float32 matmuls and runs TF32 there, this package runs the bf16 products the mode names.)

        The interpreter rounds the operands as the GPU does (``round_tf32``, ``round_to``), so it computes the
        products of "high" and "medium", and the ``big`` parts of "highest", as the GPU does; its dot is exact
        float32 otherwise (no truncation of ``small``, Triton's own 3xTF32 exact), and the float32 accumulation
        order (and the tensor core's truncating accumulation) differs.
        """
        sixteen = sixteen_bit_products(x_dtype, m_dtype)
        if sixteen is not None:
            return cls(TL_DTYPE[sixteen], "ieee", interpreting(), "b16")
        precision = matmul_precision()
        if precision == "medium":
            return cls(tl.bfloat16, "ieee", interpreting(), "rb16")
        if precision == "high":
            return cls(tl.float32, "tf32", False, "tf32")
        return cls(tl.float32, "tf32x3", False, "f32")

    def constexprs(self) -> dict:
        return {"DOT_DTYPE": self.dtype, "PRECISION": self.precision, "UPCAST": self.upcast}

    @property
    def operand_dtype(self) -> torch.dtype:
        """The dtype the products' dense left operands (``C(x)``, ``h``) are stored in: the 16-bit dtype of 16-bit
        products ("b16"), which round them to it on load anyway (``dot``), so storing them rounded (to nearest even,
        ``round_to``, as ``dot`` rounds) changes no bit of any result and halves the bytes every column tile of the
        projection, the dM kernel and autograd's saved ``C(x)`` move; float32 otherwise. Only "b16": its rounding
        depends on the dtypes alone, while the float32 modes follow the matmul precision, which may change between
        a forward and its backward."""
        return next(d for d, t in TL_DTYPE.items() if t == self.dtype) if self.kind == "b16" else torch.float32


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a product ``A M^T`` maps onto tokens: A has ``Bu`` rows per token (T tokens), R columns; column i of
    block b of token t's row is stored to out's columns ``copy_position(b, i, e)`` for ``e < copies`` (``groups``:
    the group decompress, else the tile one with ``period``), out having m columns; x (the gathers') has n."""

    T: int
    Bu: int
    R: int
    n: int
    m: int
    period: int
    copies: int
    groups: bool

    @classmethod
    def of(cls, geo: Geometry, T: int) -> Layout:
        """The layout of the forward product (and of ``h = D^T(g)``) for T tokens of ``geo``."""
        Bu = geo.used_blocks if geo.t.blockwise else 1
        period = geo.blocks * geo.R if geo.t.blockwise else geo.R
        copies = -(-geo.m // geo.R) if geo.t.decompress_groups else -(-geo.m // period)
        return cls(T, Bu, geo.R, geo.n, geo.m, period, copies, geo.t.decompress_groups)

    @property
    def n_rows(self) -> int:
        """Rows of A."""
        return self.T * self.Bu

    def scatter_args(self) -> tuple:
        """The projection kernels' ``n_rows, Bu, R, n, m, period, copies`` arguments."""
        return self.n_rows, self.Bu, self.R, self.n, self.m, self.period, self.copies


@dataclasses.dataclass(frozen=True)
class Operand:
    """The left operand A of a product and how ``load_a`` reads it: ``mode`` DENSE (A itself, float32), GATHER or
    ROPE (A's rows are x's blocks, rotated by the tables ``cos``/``sin`` for ROPE; otherwise those are any tensor,
    never read)."""

    tensor: torch.Tensor
    mode: AMode
    cos: torch.Tensor
    sin: torch.Tensor


def rope_args(cos, sin, x):
    """The tables as kernel arguments; types other than 6 pass x (never read: A_MODE is not ROPE)."""
    if cos is None:
        return x, x
    return cos.contiguous(), sin.contiguous()


def dense_operand(a: torch.Tensor, R: int) -> torch.Tensor:
    """A dense left operand (``C(x)`` or h, ``(rows, R)`` or already ``(rows, R16)``) as the kernels read it: rows
    of ``R16 = padded_width(R)`` contiguous columns, zero past R. ``compress_kernel`` and
    ``decompress_adjoint_kernel`` write that layout themselves, so this copies only a ``C(x)`` from elsewhere.

    Why (as for ``padded_m``): a load moves whole vectors only where its mask is constant over the vector and the
    row stride is known to divide it. Masked at ``cols < R`` with a row stride of R, a 16-bit ``C(x)`` or h with R =
    1966 (type 1 r=256 on up_proj) was read in 2-byte scalars issued and consumed in the same step (float32: 4-byte
    ``cp.async``); with the row stride R16 (a multiple of 16, which Triton specializes) and the mask at R16, it is
    16-byte ``cp.async`` for every R, at ``R16 / R - 1`` (under 1% at those R) more bytes."""
    R16 = padded_width(R)
    if a.shape[1] == R16 and a.stride(1) == 1 and (a.stride(0) == R16 or a.shape[0] <= 1):
        return a
    padded = a.new_zeros((a.shape[0], R16))
    padded[:, :R] = a[:, :R]
    return padded


def padded_m(M: torch.Tensor) -> torch.Tensor:
    """M ``(R, R)`` as the single-adapter projection kernel reads it: contiguous, zero-padded to ``R16 x R16`` (R
    rounded up to a multiple of 16; M itself, made contiguous, where R is one). (The mixed kernel reads its stack
    unpadded: masked at R16 it spilled 8 bytes in two decode variants on sm_80 with Triton 3.6.)

    A launch specializes an integer argument only when it is divisible by 16, and a load is vectorized only where
    its mask is constant over the vector: with R = 1448 or 348 the M tile's mask ``k < R`` and its row stride R
    made every element a 2-byte (float32: 4-byte) scalar load, issued and consumed in the same K-step. Padded, the
    row stride is R16 and the kernels mask M's tile at ``R16 = cdiv(R, 16) * 16`` (which the compiler sees as a
    multiple of 16): 16-byte ``cp.async``. The zeros make the padding exact: A's columns past R are loaded as 0, so
    no padded term is added, and output columns past R are never stored. The copy is R16^2 elements (a few MB at
    most beside the tokens' data), once per launch."""
    R = M.shape[-1]
    if R % 16 == 0:
        return M.contiguous()
    R16 = padded_width(R)
    padded = M.new_zeros((R16, R16))
    padded[:R, :R] = M
    return padded


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (a layer on cuda:1 of a model split with
    ``device_map="auto"`` while cuda:0 is current), as the CUDA binding's device guard does."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dm_splits(n_rows: int, tiles: int, segments: int = 1) -> int:
    """Splits of the dM reduction over rows: about ``DM_TARGET_PROGRAMS`` programs over the ``tiles`` output tiles
    of each of ``segments`` reductions, at least ``DM_MIN_ROWS_PER_SPLIT`` rows per split on average."""
    return max(1, min(triton.cdiv(DM_TARGET_PROGRAMS, tiles * segments),
                      triton.cdiv(n_rows, segments * DM_MIN_ROWS_PER_SPLIT)))


# ---------------------------------------------------------------------------------------------------------------------
# The passes around a launcher pair's products
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Products:
    """What a launcher pair computes with M (everything else is the passes' own):

    - ``project(a, out, layout)``: ``out = base + A M^T``, scaled, scattered to its copies (base bound in);
    - ``adjoint(h, layout)``: ``w = h M``, float32 ``(n_rows, R)``, scaled (h comes ``h_scaling`` times D^T(g));
    - ``dm(h, a, layout)``: dM from h and the operand A (x's blocks or the saved ``C(x)``), scaled;
    - ``operand_dtype``: what ``C(x)`` and h are stored in (``DotMode.operand_dtype``).
    """

    project: Callable[[Operand, torch.Tensor, Layout], None]
    adjoint: Callable[[torch.Tensor, Layout], torch.Tensor]
    dm: Callable[[torch.Tensor, Operand, Layout], torch.Tensor]
    h_scaling: float
    operand_dtype: torch.dtype


def forward_pass(x, rope, base, geo: Geometry, out, products: Products):
    """``(out, c)``: out ``(T, m)`` (allocated in base's dtype, x's without base, unless given: it may be base
    itself) written by ``products.project``; ``c = C(x)`` for types 1-4 (saved for backward) in
    ``dense_operand``'s layout, ``(T, R16)``, and ``products.operand_dtype``; no rows for types 6/7 (their A is
    gathered from x)."""
    T, R = x.shape[0], geo.R
    if out is None:
        out = torch.empty((T, geo.m), dtype=base.dtype if base is not None else x.dtype, device=x.device)
    c = torch.empty((0 if geo.t.blockwise else T, padded_width(R)), dtype=products.operand_dtype, device=x.device)
    if T == 0:
        return out, c
    layout = Layout.of(geo, T)
    a = x
    if not geo.t.blockwise:
        BT, BJ, warps = GATHER_TILE
        compress_kernel[(triton.cdiv(T, BT), triton.cdiv(c.shape[1], BJ))](
            x, c, T, geo.n, R, geo.blocks, x.stride(0), x.stride(1),
            GROUPS=geo.t.compress_groups, BLOCK_T=BT, BLOCK_J=BJ, num_warps=warps,
        )
        a = c
    products.project(Operand(a, AMode.of(geo.t), *rope_args(*rope, x)), out, layout)
    return out, c


def backward_pass(g, saved, rope, geo: Geometry, x_dtype, need_dx: bool, need_dM: bool, products: Products):
    """``(dx, dM)`` of ``sum(out * g)`` for g ``(T, m)``; ``saved`` is ``C(x)`` (types 1-4) or x (types 6/7). dx
    is ``(0, n)`` when not needed; dM is None when not needed or there are no tokens (the caller shapes it)."""
    T, R, n = g.shape[0], geo.R, geo.n
    dx = torch.empty((T if need_dx else 0, n), dtype=x_dtype, device=g.device)
    if T == 0 or not (need_dx or need_dM):
        return dx, None
    layout = Layout.of(geo, T)
    h = torch.empty((layout.n_rows, padded_width(R)), dtype=products.operand_dtype, device=g.device)
    BT, BN, warps = GATHER_TILE
    decompress_adjoint_kernel[(triton.cdiv(layout.n_rows, BT), triton.cdiv(h.shape[1], BN))](
        g, h, layout.n_rows, layout.Bu, R, layout.m, layout.period, layout.copies, g.stride(0), g.stride(1),
        products.h_scaling, GROUPS=layout.groups, BLOCK_T=BT, BLOCK_N=BN, num_warps=warps,
    )
    cos, sin = rope_args(*rope, h)
    if need_dx:
        w = products.adjoint(h, layout)
        span = (geo.used_blocks if geo.t.blockwise else geo.blocks) * R
        BT, BC, warps = ROTATED_ADJOINT_TILE if geo.t == MoRAType.ROPE else GATHER_TILE
        compress_adjoint_kernel[(triton.cdiv(T, BT), triton.cdiv(n, BC))](
            w, cos, sin, dx, T, layout.Bu, R, n, span, -(-span // n), dx.stride(0), dx.stride(1),
            MODE=int(AdjointMode.of(geo.t)), BLOCK_T=BT, BLOCK_C=BC, num_warps=warps,
        )
    if not geo.t.blockwise:
        saved = dense_operand(saved, R)
    dM = products.dm(h, Operand(saved, AMode.of(geo.t), cos, sin), layout) if need_dM else None
    return dx, dM
