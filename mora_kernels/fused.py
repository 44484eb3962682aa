"""The one op layer every fused backend runs behind: ``torch.library`` custom ops, their fake kernels and one autograd
formula, registered once for the Triton and the CUDA backend alike.

Each fused backend's module (``triton_mora``, ``cuda_mora``; ``backends.py`` holds one record per backend) supplies
the same 2-D launchers and nothing else:

- ``forward(x, M, rope, base, geo, scaling, out=None) -> (out, c)``: x ``(T, n)``, ``rope = (cos, sin)`` (type 6's
  tables; ``(None, None)`` otherwise), base ``(T, m)`` or None,
  ``out = base + scaling * D(M C(x))`` ``(T, m)`` in base's dtype (x's without base), written into ``out`` when given
  (``out`` may be base itself); ``c = C(x)`` for types 1-4 (what backward needs: ``(T, R)`` float32, or the
  layout the backend's record names, ``Backend.compressed_layout``), 0 rows for types 6/7, which recompute their
  blocks from x;
- ``backward(g, saved, M, rope, geo, scaling, x_dtype, needs) -> (dx, dM)``: g ``(T, m)``, saved = ``c`` (types
  1-4) or x (types 6/7), ``needs = (need_dx, need_dM)``; a gradient not needed comes back with 0 rows;
- ``status(device) -> (usable, reason)``.

Decided here, once, for every backend: leading dims are flattened; type 6's rope tables are built when not given;
in-place accumulation writes through a view of base; autograd saves only ``C(x)`` for types 1-4 and x for 6/7 (never
both); the device of the launch is the tensors' (each launcher guards it). ``ops.apply`` decides before this which
backend runs and sends float64 to the reference (no fused backend computes in float64). Each op takes the backend's
name and runs its record's launchers.

The single-adapter ops (``forward``, ``backward``, ``forward_into``) and the mixed-adapter ones (``mixed_*``) are
two families of one shape, registered by one helper (``_register_family``): their arguments are the common ones
(x, M, the rope tables, base, the sizes and type, then for backward the gradients asked for) followed by the
family's own (single: ``scaling``; mixed: ``index``, ``scale``, and ``check`` for forward) and the backend's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from . import backends
from .core import Geometry, MoRAType, check_index_values, rope_tables


def _geo(in_features: int, out_features: int, R: int, mora_type: int) -> Geometry:
    return Geometry(n=in_features, m=out_features, R=R, t=MoRAType(mora_type))


# ---------------------------------------------------------------------------------------------------------------------
# The two op families' eager implementations. Single adapter: M ``(R, R)``, one float ``scaling``. Mixed-adapter
# batches (``mora_mixed``): K adapters stacked ``(K, R, R)``, one per token by an int64 ``index`` (-1: none), factors
# ``scale (K,)`` float32, and ``check``: validate the index's values inside the op (one device sync), so a compiled
# graph checks them too; callers that built the index themselves (the layer) skip it. Only backends whose record has
# a ``mixed`` module run the mixed family: ``mixed_forward(x, M, (index, scale), (cos, sin), base, geo, out=None) ->
# (out, c)`` and ``mixed_backward(g, saved, M, (index, scale), (cos, sin), geo, x_dtype, (need_dx, need_dM)) ->
# (dx, dM)``, dM ``(K, R, R)``.
# ---------------------------------------------------------------------------------------------------------------------


def _forward(
    x: torch.Tensor, M: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, base: torch.Tensor | None,
    out_features: int, mora_type: int, scaling: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    geo = _geo(x.shape[1], out_features, M.shape[-1], mora_type)
    return backends.FUSED[backend].launchers().forward(x, M, (cos, sin), base, geo, scaling)


def _backward(
    g: torch.Tensor, saved: torch.Tensor, M: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
    in_features: int, mora_type: int, x_dtype: torch.dtype, need_dx: bool, need_dM: bool, scaling: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    geo = _geo(in_features, g.shape[1], M.shape[-1], mora_type)
    launchers = backends.FUSED[backend].launchers()
    return launchers.backward(g, saved, M, (cos, sin), geo, scaling, x_dtype, (need_dx, need_dM))


def _forward_into(
    x: torch.Tensor, M: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, base: torch.Tensor,
    out_features: int, mora_type: int, scaling: float, backend: str,
) -> None:
    """``base += scaling * D(M C(x))`` in place (inference: no autograd formula, nothing saved)."""
    geo = _geo(x.shape[1], out_features, M.shape[-1], mora_type)
    backends.FUSED[backend].launchers().forward(x, M, (cos, sin), base, geo, scaling, out=base)


def _mixed_forward(
    x: torch.Tensor, M: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, base: torch.Tensor | None,
    out_features: int, mora_type: int, index: torch.Tensor, scale: torch.Tensor, check: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if check:
        check_index_values(index, M.shape[0])
    geo = _geo(x.shape[1], out_features, M.shape[-1], mora_type)
    return backends.FUSED[backend].mixed().mixed_forward(x, M, (index, scale), (cos, sin), base, geo)


def _mixed_backward(
    g: torch.Tensor, saved: torch.Tensor, M: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
    in_features: int, mora_type: int, x_dtype: torch.dtype, need_dx: bool, need_dM: bool, index: torch.Tensor,
    scale: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    geo = _geo(in_features, g.shape[1], M.shape[-1], mora_type)
    return backends.FUSED[backend].mixed().mixed_backward(g, saved, M, (index, scale), (cos, sin), geo, x_dtype,
                                                          (need_dx, need_dM))


def _mixed_forward_into(
    x: torch.Tensor, M: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, base: torch.Tensor,
    out_features: int, mora_type: int, index: torch.Tensor, scale: torch.Tensor, check: bool, backend: str,
) -> None:
    """``base[t] += scale[a_t] D(M_{a_t} C(x[t]))`` in place (inference: no autograd formula, nothing saved)."""
    if check:
        check_index_values(index, M.shape[0])
    geo = _geo(x.shape[1], out_features, M.shape[-1], mora_type)
    backends.FUSED[backend].mixed().mixed_forward(x, M, (index, scale), (cos, sin), base, geo, out=base)


# ---------------------------------------------------------------------------------------------------------------------
# Registration: one helper for both families
# ---------------------------------------------------------------------------------------------------------------------

_COMMON = 7  # x, M, cos, sin, base, out_features, mora_type: the forward ops' leading arguments
_BACKWARD_COMMON = 10  # g, saved, M, cos, sin, in_features, mora_type, x_dtype, need_dx, need_dM


@dataclasses.dataclass(frozen=True)
class _Family:
    """One op family: its name prefix, its eager implementations, and which of the forward's own arguments (after
    the common ones, before the backend's name) its backward takes, in order (``backward_args``)."""

    prefix: str
    forward: Callable
    backward: Callable
    forward_into: Callable
    backward_args: tuple[int, ...]


def _register_family(family: _Family):
    """Register ``mora_kernels::<prefix>forward``, ``<prefix>backward`` and ``<prefix>forward_into`` (schemas from
    the implementations' annotations), their fake kernels and the autograd formula of the forward op: dx and dM by
    the backward op, dbase = the output's gradient. Autograd saves only ``C(x)`` for types 1-4 (R values per token)
    and x for types 6/7 (which recompute their blocks), never both."""
    forward_op = torch.library.custom_op(f"mora_kernels::{family.prefix}forward", family.forward, mutates_args=())
    backward_op = torch.library.custom_op(f"mora_kernels::{family.prefix}backward", family.backward,
                                          mutates_args=())
    forward_into_op = torch.library.custom_op(f"mora_kernels::{family.prefix}forward_into", family.forward_into,
                                              mutates_args=("base",))

    @forward_op.register_fake
    def _(x, M, cos, sin, base, out_features, mora_type, *_own):
        out = x.new_empty((x.shape[0], out_features), dtype=base.dtype if base is not None else x.dtype)
        saved_rows = 0 if MoRAType(mora_type).blockwise else x.shape[0]
        columns, c_dtype = backends.FUSED[_own[-1]].compressed_layout(M.shape[-1], x.dtype, M.dtype)
        return out, x.new_empty((saved_rows, columns), dtype=c_dtype)

    @backward_op.register_fake
    def _(g, saved, M, cos, sin, in_features, mora_type, x_dtype, need_dx, need_dM, *_own):
        dx = g.new_empty((g.shape[0] if need_dx else 0, in_features), dtype=x_dtype)
        return dx, M.new_empty((M.shape[0] if need_dM else 0, *M.shape[1:]))

    forward_into_op.register_fake(lambda *args: None)

    def setup_context(ctx, inputs, output):
        x, M, cos, sin = inputs[:4]
        mora_type = inputs[_COMMON - 1]
        own = [inputs[_COMMON + i] for i in family.backward_args]
        saved = x if MoRAType(mora_type).blockwise else output[1]
        # Tensors go through save_for_backward (version-checked); the rest rides along as it is.
        ctx.save_for_backward(saved, M, cos, sin, *(v for v in own if isinstance(v, torch.Tensor)))
        ctx.own = [None if isinstance(v, torch.Tensor) else v for v in own]
        ctx.meta = (x.shape[1], mora_type, x.dtype, inputs[-1])

    def backward(ctx, grad_out, _grad_saved):
        saved, M, cos, sin, *tensors = ctx.saved_tensors
        tensors = iter(tensors)
        own = [next(tensors) if v is None else v for v in ctx.own]
        in_features, mora_type, x_dtype, backend = ctx.meta
        need_dx, need_dM = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dM = backward_op(grad_out, saved, M, cos, sin, in_features, mora_type, x_dtype, need_dx, need_dM, *own,
                             backend)
        grads = [None] * len(ctx.needs_input_grad)
        grads[0], grads[1] = (dx if need_dx else None), (dM if need_dM else None)
        grads[4] = grad_out if ctx.needs_input_grad[4] else None  # out = base + update
        return tuple(grads)

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op, backward_op, forward_into_op


forward_op, backward_op, forward_into_op = _register_family(
    _Family("", _forward, _backward, _forward_into, backward_args=(0,)))  # scaling
mixed_forward_op, mixed_backward_op, mixed_forward_into_op = _register_family(
    _Family("mixed_", _mixed_forward, _mixed_backward, _mixed_forward_into, backward_args=(0, 1)))  # index, scale


# ---------------------------------------------------------------------------------------------------------------------
# Entry points (ops.py validated the inputs and chose the backend)
# ---------------------------------------------------------------------------------------------------------------------


def _two_d(x, geo: Geometry, rope, base, inplace: bool, backend: backends.Backend):
    """``(x2, cos, sin, base2)``: x and base with their leading dims flattened (base2 a view of base's own storage
    when ``inplace``, so the kernels write into it), and type 6's rope tables (built when not given)."""
    cos = sin = None
    if geo.t == MoRAType.ROPE:
        cos, sin = rope if rope is not None else rope_tables(geo.R, geo.used_blocks, x.device)
        cos, sin = cos.contiguous(), sin.contiguous()
    base2 = None
    if inplace:
        try:
            base2 = base.view(-1, geo.m)
        except RuntimeError:
            raise ValueError("inplace=True needs a base whose leading dims flatten without a copy") from None
        if backend.contiguous and not base2.is_contiguous():
            raise ValueError(f"backend={backend.name!r} writes in place only into a contiguous base")
    elif base is not None:
        base2 = base.reshape(-1, geo.m)
    return x.reshape(-1, geo.n), cos, sin, base2


def apply(x, M, geo: Geometry, rope=None, scaling: float = 1.0, base=None, inplace: bool = False,
          backend: str = "triton"):
    """``base + scaling * D(M C(x))`` with x ``(..., n)``, base ``(..., m)`` or None, by ``backend``'s launchers;
    differentiable in x, M and base. Returns base's dtype when base is given, else x's; with ``inplace`` the sum is
    written into base, which is returned."""
    x2, cos, sin, base2 = _two_d(x, geo, rope, base, inplace, backends.FUSED[backend])
    if inplace:
        forward_into_op(x2, M, cos, sin, base2, geo.m, int(geo.t), float(scaling), backend)
        return base
    out, _ = forward_op(x2, M, cos, sin, base2, geo.m, int(geo.t), float(scaling), backend)
    return out.reshape(*x.shape[:-1], geo.m)


def apply_mixed(x, M, index, geo: Geometry, rope=None, scaling=1.0, base=None, inplace: bool = False,
                backend: str = "triton", check_index: bool = True):
    """``base + scaling[a] D(M_a C(x))`` per token with x ``(..., n)``, M ``(K, R, R)``, index ``x.shape[:-1]``,
    scaling a float or a ``(K,)`` tensor, by ``backend``'s mixed launchers; differentiable in x, M and base."""
    x2, cos, sin, base2 = _two_d(x, geo, rope, base, inplace, backends.FUSED[backend])
    index = index.reshape(-1).to(torch.int64)
    if isinstance(scaling, torch.Tensor):
        scale = scaling.to(device=x.device, dtype=torch.float32).contiguous()
    else:
        scale = torch.full((M.shape[0],), float(scaling), dtype=torch.float32, device=x.device)
    if inplace:
        mixed_forward_into_op(x2, M, cos, sin, base2, geo.m, int(geo.t), index, scale, check_index, backend)
        return base
    out, _ = mixed_forward_op(x2, M, cos, sin, base2, geo.m, int(geo.t), index, scale, check_index, backend)
    return out.reshape(*x.shape[:-1], geo.m)
