"""The one op layer every fused backend runs behind: ``torch.library`` custom ops, their fake kernels and one autograd
formula, registered once for the Triton and the CUDA backend alike.

Each fused backend module (``triton_mora``, ``cuda_mora``) supplies the same 2-D launchers and nothing else:

- ``forward(x, M, cos, sin, base, geo, scaling, out=None) -> (out, c)``: x ``(T, n)``, base ``(T, m)`` or None,
  ``out = base + scaling * D(M C(x))`` ``(T, m)`` in base's dtype (x's without base), written into ``out`` when given
  (``out`` may be base itself); ``c = C(x)`` float32 ``(T, R)`` for types 1-4 (what backward needs), ``(0, R)`` for
  types 6/7, which recompute their blocks from x;
- ``backward(g, saved, M, cos, sin, geo, scaling, x_dtype, need_dx, need_dM) -> (dx, dM)``: g ``(T, m)``, saved =
  ``c`` (types 1-4) or x (types 6/7); a gradient not needed comes back with 0 rows;
- ``status(device) -> (usable, reason)``.

Decided here, once, for every backend: leading dims are flattened; type 6's rope tables are built when not given;
in-place accumulation writes through a view of base; autograd saves only ``C(x)`` for types 1-4 and x for 6/7 (never
both); the device of the launch is the tensors' (each launcher guards it). ``ops.apply`` decides before this which
backend runs and sends float64 to the reference (no fused backend computes in float64).
"""

from __future__ import annotations

import torch

from .core import Geometry, MoRAType, check_index_values, rope_tables


# Each backend module is imported on first use, so that importing the package imports no backend (nor triton), and
# by an import statement: torch.compile traces one (importlib it does not), so a first call inside a compiled graph
# imports the backend without a graph break.
def _triton_mora():
    from . import triton_mora

    return triton_mora


def _cuda_mora():
    from . import cuda_mora

    return cuda_mora


def _triton_mixed():
    from . import triton_mixed

    return triton_mixed


BACKEND_MODULES = {"triton": _triton_mora, "cuda": _cuda_mora}


def launchers(backend: str):
    """The backend module holding ``forward``/``backward``/``status`` (imported on first use)."""
    return BACKEND_MODULES[backend]()


def _geo(in_features: int, out_features: int, R: int, mora_type: int) -> Geometry:
    return Geometry(n=in_features, m=out_features, R=R, t=MoRAType(mora_type))


@torch.library.custom_op("mora_kernels::forward", mutates_args=())
def forward_op(
    x: torch.Tensor, M: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, base: torch.Tensor | None,
    out_features: int, mora_type: int, scaling: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    geo = _geo(x.shape[1], out_features, M.shape[0], mora_type)
    return launchers(backend).forward(x, M, cos, sin, base, geo, scaling)


@forward_op.register_fake
def _(x, M, cos, sin, base, out_features, mora_type, scaling, backend):
    out = x.new_empty((x.shape[0], out_features), dtype=base.dtype if base is not None else x.dtype)
    saved_rows = 0 if MoRAType(mora_type).blockwise else x.shape[0]
    return out, x.new_empty((saved_rows, M.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mora_kernels::backward", mutates_args=())
def backward_op(
    g: torch.Tensor, saved: torch.Tensor, M: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
    in_features: int, mora_type: int, scaling: float, x_dtype: torch.dtype, need_dx: bool, need_dM: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    geo = _geo(in_features, g.shape[1], M.shape[0], mora_type)
    return launchers(backend).backward(g, saved, M, cos, sin, geo, scaling, x_dtype, need_dx, need_dM)


@backward_op.register_fake
def _(g, saved, M, cos, sin, in_features, mora_type, scaling, x_dtype, need_dx, need_dM, backend):
    R = M.shape[0]
    dx = g.new_empty((g.shape[0] if need_dx else 0, in_features), dtype=x_dtype)
    return dx, M.new_empty((R if need_dM else 0, R))


@torch.library.custom_op("mora_kernels::forward_into", mutates_args=("base",))
def forward_into_op(
    x: torch.Tensor, M: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, base: torch.Tensor,
    out_features: int, mora_type: int, scaling: float, backend: str,
) -> None:
    """``base += scaling * D(M C(x))`` in place (inference: no autograd formula, nothing saved)."""
    geo = _geo(x.shape[1], out_features, M.shape[0], mora_type)
    launchers(backend).forward(x, M, cos, sin, base, geo, scaling, out=base)


@forward_into_op.register_fake
def _(x, M, cos, sin, base, out_features, mora_type, scaling, backend):
    return None


def _setup_context(ctx, inputs, output):
    x, M, cos, sin, base, out_features, mora_type, scaling, backend = inputs
    # Types 1-4 need only C(x) (R values per token), types 6/7 recompute the rotated blocks from x.
    saved = x if MoRAType(mora_type).blockwise else output[1]
    ctx.save_for_backward(saved, M, cos, sin)
    ctx.meta = (x.shape[1], mora_type, scaling, x.dtype, backend)


def _backward(ctx, grad_out, _grad_saved):
    saved, M, cos, sin = ctx.saved_tensors
    in_features, mora_type, scaling, x_dtype, backend = ctx.meta
    need_dx, need_dM = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dM = backward_op(grad_out, saved, M, cos, sin, in_features, mora_type, scaling, x_dtype, need_dx, need_dM,
                         backend)
    grad_base = grad_out if ctx.needs_input_grad[4] else None
    return (dx if need_dx else None), (dM if need_dM else None), None, None, grad_base, None, None, None, None


forward_op.register_autograd(_backward, setup_context=_setup_context)


def _two_d(x, geo: Geometry, rope, base, inplace: bool):
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
    elif base is not None:
        base2 = base.reshape(-1, geo.m)
    return x.reshape(-1, geo.n), cos, sin, base2


def apply(x, M, geo: Geometry, rope=None, scaling: float = 1.0, base=None, inplace: bool = False,
          backend: str = "triton"):
    """``base + scaling * D(M C(x))`` with x ``(..., n)``, base ``(..., m)`` or None, by ``backend``'s launchers;
    differentiable in x, M and base. Returns base's dtype when base is given, else x's; with ``inplace`` the sum is
    written into base, which is returned."""
    x2, cos, sin, base2 = _two_d(x, geo, rope, base, inplace)
    if inplace:
        forward_into_op(x2, M, cos, sin, base2, geo.m, int(geo.t), float(scaling), backend)
        return base
    out, _ = forward_op(x2, M, cos, sin, base2, geo.m, int(geo.t), float(scaling), backend)
    return out.reshape(*x.shape[:-1], geo.m)


# ---------------------------------------------------------------------------------------------------------------------
# Mixed-adapter batches (``mora_mixed``): K adapters stacked ``(K, R, R)``, one per token by an int64 ``index`` (-1:
# none), factors ``scale (K,)`` float32. The same contract, one more launcher pair: a backend module for it supplies
# ``mixed_forward(x, M, index, scale, cos, sin, base, geo, out=None) -> (out, c)`` and ``mixed_backward(g, saved, M,
# index, scale, cos, sin, geo, x_dtype, need_dx, need_dM) -> (dx, dM)`` with dM ``(K, R, R)``. Only Triton has one.
# ``check`` validates the index's values inside the op (one device sync), so a compiled graph checks them too;
# callers that built the index themselves (the layer) skip it.
# ---------------------------------------------------------------------------------------------------------------------

MIXED_MODULES = {"triton": _triton_mixed}


def mixed_launchers(backend: str):
    return MIXED_MODULES[backend]()


@torch.library.custom_op("mora_kernels::mixed_forward", mutates_args=())
def mixed_forward_op(
    x: torch.Tensor, M: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, cos: torch.Tensor | None,
    sin: torch.Tensor | None, base: torch.Tensor | None, out_features: int, mora_type: int, check: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if check:
        check_index_values(index, M.shape[0])
    geo = _geo(x.shape[1], out_features, M.shape[1], mora_type)
    return mixed_launchers(backend).mixed_forward(x, M, index, scale, cos, sin, base, geo)


@mixed_forward_op.register_fake
def _(x, M, index, scale, cos, sin, base, out_features, mora_type, check, backend):
    out = x.new_empty((x.shape[0], out_features), dtype=base.dtype if base is not None else x.dtype)
    saved_rows = 0 if MoRAType(mora_type).blockwise else x.shape[0]
    return out, x.new_empty((saved_rows, M.shape[1]), dtype=torch.float32)


@torch.library.custom_op("mora_kernels::mixed_backward", mutates_args=())
def mixed_backward_op(
    g: torch.Tensor, saved: torch.Tensor, M: torch.Tensor, index: torch.Tensor, scale: torch.Tensor,
    cos: torch.Tensor | None, sin: torch.Tensor | None, in_features: int, mora_type: int, x_dtype: torch.dtype,
    need_dx: bool, need_dM: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    geo = _geo(in_features, g.shape[1], M.shape[1], mora_type)
    return mixed_launchers(backend).mixed_backward(g, saved, M, index, scale, cos, sin, geo, x_dtype, need_dx,
                                                   need_dM)


@mixed_backward_op.register_fake
def _(g, saved, M, index, scale, cos, sin, in_features, mora_type, x_dtype, need_dx, need_dM, backend):
    dx = g.new_empty((g.shape[0] if need_dx else 0, in_features), dtype=x_dtype)
    return dx, M.new_empty((M.shape[0] if need_dM else 0, *M.shape[1:]))


@torch.library.custom_op("mora_kernels::mixed_forward_into", mutates_args=("base",))
def mixed_forward_into_op(
    x: torch.Tensor, M: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, cos: torch.Tensor | None,
    sin: torch.Tensor | None, base: torch.Tensor, out_features: int, mora_type: int, check: bool, backend: str,
) -> None:
    """``base[t] += scale[a_t] D(M_{a_t} C(x[t]))`` in place (inference: no autograd formula, nothing saved)."""
    if check:
        check_index_values(index, M.shape[0])
    geo = _geo(x.shape[1], out_features, M.shape[1], mora_type)
    mixed_launchers(backend).mixed_forward(x, M, index, scale, cos, sin, base, geo, out=base)


@mixed_forward_into_op.register_fake
def _(x, M, index, scale, cos, sin, base, out_features, mora_type, check, backend):
    return None


def _mixed_setup_context(ctx, inputs, output):
    x, M, index, scale, cos, sin, base, out_features, mora_type, check, backend = inputs
    saved = x if MoRAType(mora_type).blockwise else output[1]  # as the single-adapter op
    ctx.save_for_backward(saved, M, index, scale, cos, sin)
    ctx.meta = (x.shape[1], mora_type, x.dtype, backend)


def _mixed_backward(ctx, grad_out, _grad_saved):
    saved, M, index, scale, cos, sin = ctx.saved_tensors
    in_features, mora_type, x_dtype, backend = ctx.meta
    need_dx, need_dM = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dM = mixed_backward_op(grad_out, saved, M, index, scale, cos, sin, in_features, mora_type, x_dtype, need_dx,
                               need_dM, backend)
    grad_base = grad_out if ctx.needs_input_grad[6] else None
    return (dx if need_dx else None), (dM if need_dM else None), None, None, None, None, grad_base, None, None, None, \
        None


mixed_forward_op.register_autograd(_mixed_backward, setup_context=_mixed_setup_context)


def apply_mixed(x, M, index, geo: Geometry, rope=None, scaling=1.0, base=None, inplace: bool = False,
                backend: str = "triton", check_index: bool = True):
    """``base + scaling[a] D(M_a C(x))`` per token with x ``(..., n)``, M ``(K, R, R)``, index ``x.shape[:-1]``,
    scaling a float or a ``(K,)`` tensor, by ``backend``'s mixed launchers; differentiable in x, M and base."""
    x2, cos, sin, base2 = _two_d(x, geo, rope, base, inplace)
    index = index.reshape(-1).to(torch.int64)
    if isinstance(scaling, torch.Tensor):
        scale = scaling.to(device=x.device, dtype=torch.float32).contiguous()
    else:
        scale = torch.full((M.shape[0],), float(scaling), dtype=torch.float32, device=x.device)
    if inplace:
        mixed_forward_into_op(x2, M, index, scale, cos, sin, base2, geo.m, int(geo.t), check_index, backend)
        return base
    out, _ = mixed_forward_op(x2, M, index, scale, cos, sin, base2, geo.m, int(geo.t), check_index, backend)
    return out.reshape(*x.shape[:-1], geo.m)
