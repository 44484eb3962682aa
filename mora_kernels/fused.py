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

import importlib

import torch

from .core import Geometry, MoRAType, rope_tables

_MODULES = {"triton": "mora_kernels.triton_mora", "cuda": "mora_kernels.cuda_mora"}


def launchers(backend: str):
    """The backend module holding ``forward``/``backward``/``status`` (imported on first use)."""
    return importlib.import_module(_MODULES[backend])


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


def apply(x, M, geo: Geometry, rope=None, scaling: float = 1.0, base=None, inplace: bool = False,
          backend: str = "triton"):
    """``base + scaling * D(M C(x))`` with x ``(..., n)``, base ``(..., m)`` or None, by ``backend``'s launchers;
    differentiable in x, M and base. Returns base's dtype when base is given, else x's; with ``inplace`` the sum is
    written into base, which is returned."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, geo.n)
    cos = sin = None
    if geo.t == MoRAType.ROPE:
        cos, sin = rope if rope is not None else rope_tables(geo.R, geo.used_blocks, x.device)
        cos, sin = cos.contiguous(), sin.contiguous()
    if inplace:
        try:
            base_rows = base.view(-1, geo.m)  # a view, so the kernels write into base's own storage
        except RuntimeError:
            raise ValueError("inplace=True needs a base whose leading dims flatten without a copy") from None
        forward_into_op(x2, M, cos, sin, base_rows, geo.m, int(geo.t), float(scaling), backend)
        return base
    base2 = base.reshape(-1, geo.m) if base is not None else None
    out, _ = forward_op(x2, M, cos, sin, base2, geo.m, int(geo.t), float(scaling), backend)
    return out.reshape(*lead, geo.m)
