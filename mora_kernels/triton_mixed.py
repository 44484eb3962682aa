"""Mixed-adapter batches on the Triton backend: K MoRA adapters ``M (K, R, R)`` of one geometry served from one
batch, each token with its own adapter (``adapter_index``, -1 for none), in a fixed number of launches whatever K is.

Tokens are grouped by adapter without moving them: a stable sort of the index gives ``order`` (tokens by adapter,
ascending token order inside each adapter) and the segment bounds ``seg`` (``seg[s]..seg[s+1]`` are the tokens of
adapter ``s - 1``; segment 0 holds the tokens without an adapter). Each segment is cut into row tiles of A (the
left operand of ``triton_mora``: ``C(x)`` for types 1-4, the (rotated) blocks of x for types 6/7), and a tile map
(``tile_seg``, ``tile_start``) tells each program which segment and which tile of it it owns. All of this is a
constant number of small torch ops on K + 3 and on tile-count entries: nothing loops over adapters on the host.

- ``_mixed_project_kernel``: a tile of ``A M_k^T`` for the adapter k of its segment (M_k's tiles loaded by the
  program itself), scaled by ``scaling[k]`` and stored to every copy (``triton_floor.store_copies``) with the base
  added; a tile without an adapter skips the product and stores the base (or zeros). Backward reuses it for
  ``w = h M_k``.
- ``_mixed_dm_kernel``: ``dM_k = scaling[k] sum over the rows of segment k of h^T A`` for every k in one launch
  (grid: adapters x splits of a segment, tiles of dM), rows reduced in ascending order and split partials summed in
  a fixed order: deterministic, no atomics. An adapter without rows gets zeros.
- ``C(x)``, ``h = D^T(g)`` and ``dx = C^T(w)`` do not depend on M: ``triton_floor``'s passes compute them, as for
  one adapter.

Tilings (``tuning.tile``, the single-adapter projection's, tuned or default): decode (few rows of A per adapter,
e.g. one token per sequence and many adapters) takes the "few" rows tile (32 x 32 x 32 by default, 16 x 32 x 16
under 3xTF32; a one-token segment of types 1-4 fills one row of it, but the tile's cost is reading its adapter's M,
R^2 elements, which dominates: ~16 FLOP per byte of a float32 M, under the 3xTF32 ridge; types 6/7 fill it with
the token's blocks); prefill (long segments) takes the "many" rows tile (64 x 64, each loaded tile of M_k reused
over 64 rows; half as wide for the gathered blocks of types 6/7 with 3xTF32, see ``_tile``). The choice uses the
mean rows of A per adapter, ``rows / min(K, tokens)``, known on the host without a sync.

The launchers ``mixed_forward`` / ``mixed_backward`` run behind ``fused.py``'s mixed ops and autograd formula, as
``triton_mora``'s ``forward`` / ``backward`` behind its single-adapter ones. Launches per call, for any K: forward
12 small index ops (sort, searchsorted, cumsum, ... on T, K + 3 and tile-count entries) + (types 1-4) compress +
the projection; backward the same index ops + decompress adjoint + projection + compress adjoint + dM (+ one sum of
split partials, when a segment is split).
"""

from __future__ import annotations

import dataclasses

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
    dm_splits,
    dot,
    forward_pass,
    load_a,
    on_device,
    store_copies,
)

# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _segment_rows(order_ptr, seg_ptr, seg, local, n_rows, Bu, BLOCK: tl.constexpr):
    """Rows of A of tile ``local`` of segment ``seg`` (int64, ``n_rows`` where the tile runs past the segment, so
    that ``load_a`` and the stores mask them), and which of them are real.

    Segment rows are counted in sorted order: sorted row ``p`` is block ``p mod Bu`` of token ``order[p div Bu]``.
    """
    first = tl.load(seg_ptr + seg).to(tl.int64) * Bu
    last = tl.load(seg_ptr + seg + 1).to(tl.int64) * Bu
    p = first + local.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = p < last
    token = tl.load(order_ptr + p // Bu, mask=valid, other=0).to(tl.int64)
    rows = tl.where(valid, token * Bu + p % Bu, n_rows)
    return rows, valid


@triton.jit
def _mixed_project_kernel(
    a_ptr, m_ptr, scale_ptr, order_ptr, seg_ptr, tile_seg_ptr, tile_start_ptr, cos_ptr, sin_ptr, base_ptr, out_ptr,
    K, n_rows, Bu, R, n, m, period, copies,
    stride_ar, stride_ac, stride_mk, stride_mi, stride_mj, stride_br, stride_bc, stride_or, stride_oc,
    A_MODE: tl.constexpr, GROUPS: tl.constexpr, HAS_BASE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[t, k] = base[t, k] + scaling[a] (A M_a^T)[t Bu + b, i]`` for every copy k of (b, i), a = token t's
    adapter; tokens without an adapter get ``base[t, k]`` (or 0).

    Program: one row tile of one segment (``tile_seg`` / ``tile_start``) x one BLOCK_N tile of M's rows, column
    tiles fastest as in ``triton_mora._project_kernel`` (the programs that read the same rows of A run back to back).
    Tiles past the last segment's are empty (segment K + 1 has no tokens) and store nothing.
    """
    col_tiles = tl.cdiv(R, BLOCK_N)
    pid = tl.program_id(0)
    tile = pid // col_tiles
    seg = tl.load(tile_seg_ptr + tile)
    rows, valid = _segment_rows(order_ptr, seg_ptr, seg, tile - tl.load(tile_start_ptr + seg), n_rows, Bu, BLOCK_T)
    # Segment 0 (no adapter) and K + 1 (past the last tile): no product, the scalar loop bound skips it.
    has_adapter = (seg >= 1) & (seg <= K)
    adapter = tl.where(has_adapter, seg - 1, 0)
    i = (pid % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    reduce_over = tl.where(has_adapter, R, 0)
    m_tile = m_ptr + adapter.to(tl.int64) * stride_mk
    for k0 in range(0, reduce_over, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = load_a(a_ptr, stride_ar, stride_ac, cos_ptr, sin_ptr, rows[:, None], kk[None, :], n_rows, Bu, R, n,
                   A_MODE)
        mt = tl.load(m_tile + i[None, :] * stride_mi + kk[:, None] * stride_mj,
                     mask=(i[None, :] < R) & (kk[:, None] < R), other=0.0)
        acc = dot(a, mt, acc, DOT_DTYPE, PRECISION, UPCAST)
    store_copies(acc * tl.load(scale_ptr + adapter), rows, i, valid, base_ptr, out_ptr, Bu, R, m, period, copies,
                 stride_br, stride_bc, stride_or, stride_oc, GROUPS, HAS_BASE)


@triton.jit
def _mixed_dm_kernel(
    h_ptr, a_ptr, scale_ptr, order_ptr, seg_ptr, cos_ptr, sin_ptr, part_ptr,
    K, n_rows, Bu, R, n, splits, stride_ar, stride_ac,
    A_MODE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``part[s, a] = scaling[a] sum over the rows r of split s of adapter a's segment of h[r]^T A[r]``: float32
    ``(splits, K, R, R)`` partials of every dM_a (the launcher sums them over s in order).

    Grid: (K * splits, tiles of i, tiles of j): the first axis, the only one with no 65535 limit, takes K. Each
    program reduces its rows in ascending sorted order (tokens in ascending order), so dM is bitwise reproducible
    run to run; an adapter without rows stores zeros.
    """
    z = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    adapter = z % K
    split = z // K
    first = tl.load(seg_ptr + adapter + 1).to(tl.int64) * Bu
    last = tl.load(seg_ptr + adapter + 2).to(tl.int64) * Bu
    per_split = tl.cdiv(tl.cdiv(last - first, splits), BLOCK_K) * BLOCK_K
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, last)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    R16 = tl.cdiv(R, 16) * 16  # h's rows (triton_floor.dense_operand): read to R16, whole vectors
    for p0 in range(lo, hi, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K).to(tl.int64)
        valid = p < hi
        token = tl.load(order_ptr + p // Bu, mask=valid, other=0).to(tl.int64)
        rows = tl.where(valid, token * Bu + p % Bu, n_rows)
        ht = tl.load(h_ptr + rows[None, :] * R16 + i[:, None], mask=valid[None, :] & (i[:, None] < R16), other=0.0)
        a = load_a(a_ptr, stride_ar, stride_ac, cos_ptr, sin_ptr, rows[:, None], j[None, :], n_rows, Bu, R, n,
                   A_MODE)
        acc = dot(ht, a, acc, DOT_DTYPE, PRECISION, UPCAST)
    acc = acc * tl.load(scale_ptr + adapter)
    tl.store(part_ptr + (split.to(tl.int64) * K + adapter) * R * R + (i[:, None] * R + j[None, :]), acc,
             mask=(i[:, None] < R) & (j[None, :] < R))


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segments:
    """The batch grouped by adapter, without moving tokens: ``order`` (tokens sorted by adapter, stable), ``seg``
    (the K + 3 segment bounds: segment 0 holds index -1, segment K + 1 is empty, the one tiles past the last take)
    and the per-adapter factors ``scale`` (float32, K)."""

    order: torch.Tensor
    seg: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def of(cls, index: torch.Tensor, scale: torch.Tensor) -> Segments:
        sorted_index, order = torch.sort(index, stable=True)
        K = scale.shape[0]
        seg = torch.searchsorted(sorted_index, torch.arange(-1, K + 2, device=index.device, dtype=index.dtype))
        return cls(order, seg, scale)


def _rows_kind(n_rows: int, K: int, tokens: int) -> str:
    """``tuning``'s "few" (decode) or "many" (prefill) rows, from the mean rows of A per adapter present at most:
    the single-adapter launcher's rule applied to one segment."""
    return "few" if n_rows < tuning.FEW_ROWS * min(K, tokens) else "many"


# Decode tile with float32 operands (see _tile). Over the gathered / rotated blocks 32x32x32 spilled 8-40 bytes on
# sm_90 (Triton 3.6, 3.9), 32x16x32 8 bytes (3.8, mixed dtypes), 32x32x32 at 8 warps 8-32 bytes (3.6), 32x16x16 8
# bytes (3.6). Over C(x) under 3xTF32 the shared 32x32x32 spilled 8 bytes on sm_90 (3.8, 168 registers) once n, m
# and M's strides were multiples of 16, as at Llama's shapes (the compile report's launch specialization; the compile
# check's generic integers did not show it), and 32x32x16 16 bytes on sm_80 (3.9, groups, 16-bit M; 2 or 3 stages).
# 16x32x16 at 4 warps spills on no supported Triton, for every operand kind and dtype combination.
DECODE_TILE_F32 = tuning.Tile(16, 32, 16, 4, 3)


def _tile(device, a_mode: AMode, dots: DotMode, rows_kind: str) -> tuning.Tile:
    """The single-adapter projection's tile (tuned or default): the same product, one adapter per row tile."""
    BT, BN, BK, warps, stages = tuning.tile(device, "project", a_mode.kind, dots.kind, rows_kind,
                                            operand_defaults=False)
    if a_mode != AMode.DENSE and rows_kind == "few" and dots.kind == "tf32":
        # One TF32 pass over the gathered / rotated blocks: "high"'s 32x32x16 decode tile spilled 8 bytes on sm_80
        # (Triton 3.9, rotated, with base), DECODE_TILE_F32 8 bytes on sm_90 (3.8, gathered); the latter at 2
        # stages does not.
        return DECODE_TILE_F32._replace(num_stages=2)
    if rows_kind == "few" and dots.precision == "tf32x3":
        return DECODE_TILE_F32
    if a_mode == AMode.DENSE and rows_kind == "many" and dots.kind == "b16":
        # 16-bit C(x) or h (triton_floor.dense_operand): at 3 stages the adjoint w = h M_a spilled 8 bytes on sm_80
        # with Triton 3.6 (128 registers) under the launch specialization of q_proj's and up_proj's type 1 (the
        # report's); 2 stages spill nowhere. The static model: the same time for type 1 (latency-bound), type 6's
        # adjoint on q_proj 874 -> 918 us (prefill backward), 13 -> 18 (64-token decode backward).
        return tuning.Tile(BT, BN, BK, warps, 2)
    if a_mode != AMode.DENSE and dots.precision == "tf32x3":
        # This kernel keeps its rows' indices (loaded from ``order``, not derived from the program id) live across
        # the reduction: with the gathered (type 7) or rotated (type 6) blocks of x and 3xTF32 operands, the default
        # 64x64x16 prefill tile spilled 8-48 bytes on sm_80 at 255 registers (Triton 3.6 and 3.9): half as many
        # columns spill on no supported Triton (compile report).
        return tuning.Tile(BT, max(16, BN // 2), BK, warps, stages)
    return tuning.Tile(BT, BN, BK, warps, stages)


def _project(a: Operand, M, out, layout: Layout, dots: DotMode, segments: Segments, base=None, transpose_m=False):
    """``out = base + scale[a] A M_a^T`` (or ``A M_a`` with ``transpose_m``) per segment (base: optional); see
    _mixed_project_kernel."""
    K, R, n_rows = M.shape[0], layout.R, layout.n_rows
    BT, BN, BK, warps, stages = _tile(out.device, a.mode, dots, _rows_kind(n_rows, K, layout.T))
    seg = segments.seg
    # Tiles of each segment, and an upper bound on their total known without a sync: every tile but the last of a
    # segment is full, and there are at most n_rows tiles.
    tiles = torch.div(torch.diff(seg) * layout.Bu + BT - 1, BT, rounding_mode="floor")
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = min(triton.cdiv(n_rows, BT) + K + 1, n_rows)
    # Tiles past the total belong to the empty segment K + 1.
    tile_seg = torch.searchsorted(tile_end, torch.arange(n_tiles, device=seg.device, dtype=tile_end.dtype),
                                  right=True).clamp_(max=K + 1)
    tile_start = tile_end - tiles
    M = M.contiguous()  # (K, R, R): int64 offset of the adapter, int32 inside one M (R below 46340)
    m_strides = (1, R) if transpose_m else (R, 1)
    _mixed_project_kernel[(n_tiles * triton.cdiv(R, BN),)](
        a.tensor, M, segments.scale, segments.order, seg, tile_seg, tile_start, a.cos, a.sin,
        base if base is not None else out, out,
        K, *layout.scatter_args(),
        a.tensor.stride(0), a.tensor.stride(1), R * R, *m_strides,
        *(base.stride() if base is not None else (0, 0)), out.stride(0), out.stride(1),
        A_MODE=int(a.mode), GROUPS=layout.groups, HAS_BASE=base is not None, **dots.constexprs(),
        BLOCK_T=BT, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages,
    )


def _adjoint(h, M, layout: Layout, dots: DotMode, segments: Segments):
    """``w = scale_a h M_a`` per row of A (h unscaled), stored once per row: w seen as ``(T, Bu R)``, row
    ``t Bu + b`` is out[t, b R + i]."""
    w = torch.empty((layout.n_rows, layout.R), dtype=torch.float32, device=h.device)
    rows_of_h = dataclasses.replace(layout, m=layout.Bu * layout.R, period=layout.Bu * layout.R, copies=1,
                                    groups=False)
    _project(Operand(h, AMode.DENSE, h, h), M, w.view(layout.T, -1), rows_of_h, dots, segments, transpose_m=True)
    return w


def _dm(h, a: Operand, M, layout: Layout, dots: DotMode, segments: Segments):
    """``dM_a = scale_a h^T A`` over adapter a's rows, every adapter in one launch; see _mixed_dm_kernel."""
    K, R, n_rows = M.shape[0], layout.R, layout.n_rows
    BI, BJ, BK, warps, stages = tuning.tile(h.device, "dm", a.mode.kind, dots.kind, operand_defaults=False)
    if a.mode != AMode.DENSE and dots.kind in ("b16", "rb16") and a.tensor.dtype != torch.float32:
        # The segment bookkeeping beside the gathered blocks of 16-bit x: the default 64x64x16 spilled 8 bytes on
        # sm_80 with Triton 3.6; half as many columns spill on no supported Triton. Float32 x rounded to bfloat16
        # ("medium") keeps the default: there the narrower tile is the one that spilled, 8 bytes on sm_80 (3.6).
        BJ = max(16, BJ // 2)
    # Split segments only when K alone leaves the GPU idle (few adapters, long segments): the single-adapter dM's
    # targets.
    splits = dm_splits(n_rows, triton.cdiv(R, BI) * triton.cdiv(R, BJ), segments=K)
    part = torch.empty((splits, K, R, R), dtype=torch.float32, device=h.device)
    _mixed_dm_kernel[(K * splits, triton.cdiv(R, BI), triton.cdiv(R, BJ))](
        h, a.tensor, segments.scale, segments.order, segments.seg, a.cos, a.sin, part, K, n_rows, layout.Bu, R,
        layout.n, splits, a.tensor.stride(0), a.tensor.stride(1), A_MODE=int(a.mode), **dots.constexprs(),
        BLOCK_I=BI, BLOCK_J=BJ, BLOCK_K=BK, num_warps=warps, num_stages=stages,
    )
    return (part[0] if splits == 1 else part.sum(0)).to(M.dtype)


def _products(M, dots: DotMode, segments: Segments, base=None) -> Products:
    # h = D^T(g) unscaled: each adapter's factor is applied after its product (w and dM), per row.
    return Products(
        project=lambda a, out, layout: _project(a, M, out, layout, dots, segments, base),
        adjoint=lambda h, layout: _adjoint(h, M, layout, dots, segments),
        dm=lambda h, a, layout: _dm(h, a, M, layout, dots, segments),
        h_scaling=1.0,
        operand_dtype=dots.operand_dtype,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Backend interface (fused.py registers the mixed ops and their autograd)
# ---------------------------------------------------------------------------------------------------------------------


def mixed_forward(x, M, adapters, rope, base, geo: Geometry, out=None):
    """``(out, c)``: ``out[t] = base[t] + scale[a_t] D(M_{a_t} C(x[t]))`` (``base[t]`` or 0 where ``a_t = -1``) of
    shape ``(T, m)`` from x ``(T, n)``, M ``(K, R, R)``, ``adapters = (index, scale)``: int64 ``index (T,)`` and
    float32 ``scale (K,)``; ``rope`` as ``triton_mora.forward``'s; ``c = C(x)`` ``(T, R)`` for types 1-4 (saved for
    backward; its dtype as ``triton_mora.forward``'s), an empty tensor for types 6/7. ``out`` may be ``base`` itself
    (each element is read and written by the same program)."""
    with on_device(x.device):
        products = _products(M, DotMode.of(x.dtype, M.dtype), Segments.of(*adapters), base)
        return forward_pass(x, rope, base, geo, out, products)


def mixed_backward(g, saved, M, adapters, rope, geo: Geometry, x_dtype, needs: tuple[bool, bool]):
    """``(dx, dM)`` of ``sum(out * g)``, dM ``(K, R, R)`` for every adapter at once; ``saved`` is ``C(x)`` (types
    1-4) or x (types 6/7); ``needs``: whether dx and dM are wanted. A gradient that is not needed comes back with
    0 rows."""
    need_dx, need_dM = needs
    with on_device(g.device):
        products = _products(M, DotMode.of(x_dtype, M.dtype), Segments.of(*adapters))
        dx, dM = backward_pass(g, saved, rope, geo, x_dtype, need_dx, need_dM, products)
    if dM is None:
        dM = torch.zeros((M.shape[0] if need_dM else 0, geo.R, geo.R), dtype=M.dtype, device=g.device)
    return dx, dM
