"""Pure-PyTorch reference of MoRA: the oracle every kernel is judged against, and the CPU backend.

Each type is ``out = D(M C(x))`` (types 1-4) or, for types 6/7, ``M`` applied to every (rotated) block of the
cyclically padded input. Every map is a gather or a sum over an index map, so each adjoint (used by the explicit
backward) is the matching scatter-add. Computation is in float64 when any operand is float64, else float32.

``forward`` is differentiable by autograd; ``backward`` computes the same gradients from the closed forms
of docs/design.md#backward (the ones the fused kernels implement) and the tests check one against the other.
"""

from __future__ import annotations

import torch

from .core import Geometry, MoRAType, check_index_values, compute_dtype, group_index, rope_tables


def padded_index(geo: Geometry, device=None) -> torch.Tensor:
    """Source in x of each of the used padded positions: ``xp[i] = x[i mod n]`` (cyclic, never zeros)."""
    return torch.arange(geo.used_blocks * geo.R, device=device) % geo.n


def decompress_index(geo: Geometry, device=None) -> torch.Tensor:
    """Position in y (types 1-4) or in flattened u (types 6/7) that each of the m outputs copies."""
    k = torch.arange(geo.m, device=device)
    if geo.t.blockwise:
        return k % (geo.blocks * geo.R)
    if geo.t.decompress_groups:
        return group_index(geo.m, geo.R, device)
    return k % geo.R


def rotate_half(v: torch.Tensor) -> torch.Tensor:
    """``concat(-v[R/2:], v[:R/2])`` over the last dim."""
    first, second = v.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotate_half_adjoint(v: torch.Tensor) -> torch.Tensor:
    """Transpose of ``rotate_half``: ``concat(v[R/2:], -v[:R/2])``."""
    first, second = v.chunk(2, dim=-1)
    return torch.cat((second, -first), dim=-1)


def _rope(geo: Geometry, rope, device):
    if rope is None:
        rope = rope_tables(geo.R, geo.used_blocks, device)
    cos, sin = rope
    return cos[: geo.used_blocks], sin[: geo.used_blocks]


def compress(x: torch.Tensor, geo: Geometry, rope=None) -> torch.Tensor:
    """C(x): shape ``(..., R)`` for types 1-4, ``(..., used_blocks, R)`` (rotated blocks z) for types 6/7."""
    if geo.t.compress_groups:
        return x.new_zeros(*x.shape[:-1], geo.R).index_add(-1, group_index(geo.n, geo.R, x.device), x)
    blocks = x[..., padded_index(geo, x.device)].unflatten(-1, (geo.used_blocks, geo.R))
    if not geo.t.blockwise:
        return blocks.sum(-2)
    if geo.t == MoRAType.DECOUPLED:
        return blocks
    cos, sin = _rope(geo, rope, x.device)
    return blocks * cos.to(x.dtype) + rotate_half(blocks) * sin.to(x.dtype)


def decompress(y: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """D(y): ``(..., m)`` from ``(..., R)`` (types 1-4) or from ``(..., used_blocks, R)`` (types 6/7)."""
    if geo.t.blockwise:
        y = y.flatten(-2)
    return y[..., decompress_index(geo, y.device)]


def forward(x, M, geo: Geometry, rope=None, scaling: float = 1.0, base=None, inplace: bool = False) -> torch.Tensor:
    """``base + scaling * D(M C(x))`` in x's dtype (base's dtype when given); differentiable.

    ``inplace`` writes the sum into ``base`` (rounded once, as out of place) and returns it. A float64 ``base``
    makes the sum float64 too, so that it is not rounded through float32 (a zero update returns base exactly).
    """
    dtype = compute_dtype(x.dtype, M.dtype, base.dtype if base is not None else x.dtype)
    out = decompress(compress(x.to(dtype), geo, rope) @ M.to(dtype).T, geo)
    if scaling != 1.0:
        out = out * scaling
    if base is None:
        return out.to(x.dtype)
    total = base.to(dtype) + out
    return base.copy_(total) if inplace else total.to(base.dtype)


def decompress_adjoint(g: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """D^T(g): ``h[j] = sum of g[k] over the outputs k that copy position j``."""
    width = geo.used_blocks * geo.R if geo.t.blockwise else geo.R
    h = g.new_zeros(*g.shape[:-1], width).index_add(-1, decompress_index(geo, g.device), g)
    return h.unflatten(-1, (geo.used_blocks, geo.R)) if geo.t.blockwise else h


def compress_adjoint(w: torch.Tensor, geo: Geometry, rope=None) -> torch.Tensor:
    """C^T(w): the gradient of ``sum(C(x) * w)`` with respect to x."""
    lead = w.shape[:-2] if geo.t.blockwise else w.shape[:-1]
    if geo.t.compress_groups:
        return w[..., group_index(geo.n, geo.R, w.device)]
    if geo.t == MoRAType.ROPE:
        cos, sin = _rope(geo, rope, w.device)
        w = w * cos.to(w.dtype) + rotate_half_adjoint(w * sin.to(w.dtype))
    if geo.t.blockwise:
        w = w.flatten(-2)
    else:
        w = w.repeat(*([1] * len(lead)), geo.blocks)
    return w.new_zeros(*lead, geo.n).index_add(-1, padded_index(geo, w.device), w)


def backward(g, x, M, geo: Geometry, rope=None, scaling: float = 1.0):
    """Gradients of ``sum(forward(x) * g)``: ``(dx, dM)`` in the dtypes of x and M.

    ``h = D^T(g)``, ``dM = sum over rows of h C(x)^T``, ``dx = C^T(M^T h)`` (docs/design.md#backward).
    """
    dtype = compute_dtype(x.dtype, M.dtype, g.dtype)
    h = decompress_adjoint(g.to(dtype), geo)
    if scaling != 1.0:
        h = h * scaling
    c = compress(x.to(dtype), geo, rope)
    dM = h.reshape(-1, geo.R).T @ c.reshape(-1, geo.R)
    dx = compress_adjoint(h @ M.to(dtype), geo, rope)
    return dx.to(x.dtype), dM.to(M.dtype)


def delta_weight(M: torch.Tensor, geo: Geometry, rope=None) -> torch.Tensor:
    """dW of shape ``(m, n)`` with ``forward(x) == x @ dW.T``, in closed form, vectorized, in M's compute dtype.

    ``M`` may carry leading dims (``(E, R, R)``: one M per expert of a mixture-of-experts weight); dW then has them
    too, ``(E, m, n)``, each ``dW(M[e])``, computed in one pass.

    Types 1-4: row k of dW is row ``dec(k)`` of M spread over x's columns by the compress map.
    Types 6/7: row k belongs to block ``b`` and holds row ``k mod R`` of ``M diag(cos_b) + Mrot diag(sin_b)``
    (docs/design.md#merge), placed at columns ``(b R + j) mod n``.
    """
    dtype = compute_dtype(M.dtype)
    M = M.to(dtype)
    rows = decompress_index(geo, M.device)
    if not geo.t.blockwise:
        # Spread M's columns over x's columns first (R x n), then copy whole rows (contiguous, memory-bound).
        if geo.t.compress_groups:
            spread = M[..., group_index(geo.n, geo.R, M.device)]
        elif geo.pad <= geo.n:  # padded column n + c wraps onto column c < P: one gather and one add
            spread = M[..., torch.arange(geo.n, device=M.device) % geo.R]
            spread[..., : geo.pad] += M[..., torch.arange(geo.n, geo.n + geo.pad, device=M.device) % geo.R]
        else:  # P > n (tiny n): M @ C with C[j, c] = #{i < B R : i mod R = j, i mod n = c}
            i = torch.arange(geo.blocks * geo.R, device=M.device)
            count = M.new_zeros(geo.R, geo.n).index_put_((i % geo.R, i % geo.n), M.new_ones(()), accumulate=True)
            spread = M @ count
        return spread[..., rows, :]
    block = rows // geo.R
    local = rows % geo.R
    if geo.t == MoRAType.ROPE:
        cos, sin = _rope(geo, rope, M.device)
        M_rot = torch.cat((M[..., geo.R // 2 :], -M[..., : geo.R // 2]), dim=-1)
        M_rows = M[..., local, :] * cos[block].to(dtype) + M_rot[..., local, :] * sin[block].to(dtype)
    else:
        M_rows = M[..., local, :]
    cols = (block[:, None] * geo.R + torch.arange(geo.R, device=M.device)) % geo.n
    batch = M.shape[:-2]
    return M_rows.new_zeros(*batch, geo.m, geo.n).scatter_add(-1, cols.expand(*batch, geo.m, geo.R), M_rows)


def forward_mixed(x, M, index, geo: Geometry, rope=None, scaling=1.0, base=None, inplace: bool = False,
                  check_index: bool = True) -> torch.Tensor:
    """Mixed-adapter batch: token t gets ``scaling[a] D(M[a] C(x[t]))``, ``a = index[t]`` (-1: nothing), added to
    base; a loop over the adapters, each as ``forward`` computes it. Differentiable in x, M and base."""
    K = M.shape[0]
    if check_index:
        check_index_values(index, K)
    if index.device.type == "meta":  # no values to select by: adapter 0's op gives the shapes, dtypes and graph
        return forward(x, M[0], geo, rope, scaling if not isinstance(scaling, torch.Tensor) else 1.0, base, inplace)
    dtype = compute_dtype(x.dtype, M.dtype, base.dtype if base is not None else x.dtype)  # as in ``forward``
    rows = x.reshape(-1, geo.n).to(dtype)
    index = index.reshape(-1)
    # One copy of base (never base itself, which .to() returns when its dtype is already dtype), added into in place
    # adapter by adapter: autograd differentiates the in-place adds, and nothing copies the output per adapter.
    total = rows.new_zeros(rows.shape[0], geo.m) if base is None else base.reshape(-1, geo.m).to(dtype, copy=True)
    # The adapters present, and adapter 0 in any case: with no rows (all -1) its empty update still ties out to x
    # and M, so autograd gives them zero gradients as the Triton op does instead of none.
    for a in sorted(set(torch.unique(index).tolist()) - {-1} | {0}):
        sel = (index == a).nonzero().squeeze(1)
        factor = scaling[a] if isinstance(scaling, torch.Tensor) else scaling
        update = decompress(compress(rows[sel], geo, rope) @ M[a].to(dtype).T, geo)
        if isinstance(factor, torch.Tensor) or factor != 1.0:
            update = update * factor
        total.index_add_(0, sel, update)
    total = total.reshape(*x.shape[:-1], geo.m)
    if base is None:
        return total.to(x.dtype)
    return base.copy_(total) if inplace else total.to(base.dtype)
