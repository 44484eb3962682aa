"""``MoRALinear``: a frozen ``nn.Linear`` plus one or more trainable MoRA updates.

Each adapter is a ``MoRAMatrix`` (its square matrix, geometry and rotary tables). ``MoRALinear`` and the PEFT layer
(``mora_kernels.peft_integration``) keep their adapters in different containers but share the adapter logic of
``AdapterMixin``: forward over the active adapters, a batch whose rows use different adapters, merge and unmerge,
and the ReMoRA restart. ``MoRAParameter`` adapts a parameter that its module reads itself (mixture-of-experts
weights, one M per expert) through a weight parametrization (``parameter_update``, which the PEFT path's
``ParamWrapper`` uses too); it keeps its adapters as ``MoRALinear`` does (``AdapterSet``). Which modules of a model
become MoRA layers (``replace_linears``, ``apply_mora``) is ``mora_kernels.adapters``.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import experts as fused_experts
from . import ops, reference
from .bases import check_base_layer, keep_trainable, warn_quantized_merge
from .core import (
    FLOAT_DTYPES,
    Geometry,
    MoRAType,
    check_dropout,
    check_float_dtype,
    check_float_tensor,
    check_int,
    check_scaling,
    compute_dtype,
    mora_type_of,
    r_hat,
    rope_tables,
)

BASE_ROW = "__base__"  # in a per-row adapter list: this row uses no adapter (PEFT's name for it)


class RowSelection:
    """One adapter name per row for the MoRA layers of one model, set by ``adapters.adapter_per_row`` for the
    calling thread (or asyncio task) only: a context variable, never state on the model, so concurrent forwards with
    different selections do not see each other's. ``held`` records which adapters each layer had when the block
    began: a layer that did not hold a row's adapter computes its base output for that row; one whose adapter was
    deleted during the block raises instead of serving base outputs silently."""

    def __init__(self, names: Sequence[str], layers: Iterable[tuple[str, nn.Module]]):
        self.names = list(names)
        self.held = {id(layer): (name, layer, set(layer.mora_adapter_names())) for name, layer in layers}

    def for_layer(self, layer) -> list[str] | None:
        """The per-row names for ``layer`` (``BASE_ROW`` where it holds no such adapter), or None for a layer of
        another model."""
        entry = self.held.get(id(layer))
        if entry is None:
            return None
        layer_name, _, held = entry
        now = set(layer.mora_adapter_names())
        deleted = sorted({name for name in self.names if name in held and name not in now})
        if deleted:
            raise RuntimeError(f"adapter_per_row: adapter(s) {deleted} were deleted from layer {layer_name!r} inside "
                               "the block; its rows cannot be served")
        return [name if name in now else BASE_ROW for name in self.names]


ROW_SELECTION: contextvars.ContextVar[RowSelection | None] = contextvars.ContextVar("mora_row_selection", default=None)
# How many adapter_per_row blocks are open in any thread, and whether any is: while none is, a forward does not read
# the context variable (nor does torch.compile trace it). Forwards read only the flag, so a compiled graph guards on
# two values, not on every count.
_open_selections = [0]
_any_selection = [False]
_selection_lock = threading.Lock()


def _count_selections(step: int) -> None:
    with _selection_lock:
        _open_selections[0] += step
        _any_selection[0] = _open_selections[0] > 0


@contextlib.contextmanager
def row_selection(selection: RowSelection):
    """Make ``selection`` the per-row adapters of the calling context for the block."""
    _count_selections(1)
    token = ROW_SELECTION.set(selection)
    try:
        yield
    finally:
        ROW_SELECTION.reset(token)
        _count_selections(-1)


def selected_rows(layer) -> list[str] | None:
    """The per-row adapter names the calling context selected for ``layer`` (``adapter_per_row``), or None."""
    if not _any_selection[0]:
        return None
    selection = ROW_SELECTION.get()
    return None if selection is None else selection.for_layer(layer)


def check_adapter_name(name, argument: str = "adapter_name") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argument}: an adapter name must be a str, got {name!r}")
    if not name or "." in name or name == BASE_ROW:
        raise ValueError(f"{argument}: an adapter name must be non-empty, without '.' and not {BASE_ROW!r}, "
                         f"got {name!r}")
    if hasattr(_ADAPTER_CONTAINER, name):  # nn.ModuleDict refuses keys that shadow its attributes
        raise ValueError(f"{argument}: {name!r} cannot name an adapter: adapters are kept in an nn.ModuleDict, of "
                         "which it is an attribute (a method such as 'train' or 'keys'); choose another name")
    return name


_ADAPTER_CONTAINER = nn.ModuleDict()


def adapter_names_of(names, argument: str) -> list[str]:
    """``names`` (one adapter name or a list or tuple of them) as a list, or a TypeError naming ``argument``."""
    if isinstance(names, str):
        return [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"{argument} must be an adapter name (str) or a list of names, got {names!r}")
    return list(names)


def check_loaded_matrix(key: str, tensor, in_features: int, out_features: int, r: int, mora_type,
                        experts: int | None = None) -> None:
    """Refuse a tensor that cannot be M of an adapter (in, out, r, type): not floating point (an integer tensor
    would be cast silently), or not ``(R, R)`` (``(experts, R, R)`` for experts) with ``R = r_hat(...)``; the
    message names ``key``."""
    check_float_tensor(tensor, key)
    R = r_hat(in_features, out_features, r, mora_type)
    shape = (R, R) if experts is None else (experts, R, R)
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"{key}: expected shape {shape} because r_hat(in_features={in_features}, out_features={out_features}, "
            f"r={r}, mora_type={int(mora_type_of(mora_type))}) = {R}"
            f"{'' if experts is None else f' for each of {experts} experts'}; got {tuple(tensor.shape)}. Was it "
            "saved with another r or mora_type?"
        )


class MoRAMatrix(nn.Module):
    """One adapter of one layer: the trainable ``weight`` (M, ``(R, R)``), its ``Geometry`` and rotary tables.

    ``experts``: one M per expert of a mixture-of-experts weight stored as one 3-D parameter, ``weight`` of shape
    ``(experts, R, R)`` (``target_parameters``, ``MoRAParameter`` or the PEFT path's ``ParamWrapper``); expert e's
    update is ``dW(M[e])``. Such a stack has ``delta_weight`` only (the weight is parametrized, there is no
    per-input forward).
    """

    def __init__(self, in_features: int, out_features: int, r: int, mora_type, dtype=torch.float32, device=None,
                 experts: int | None = None):
        super().__init__()
        check_float_dtype(dtype, "dtype")
        t = mora_type_of(mora_type)
        self.r = r
        self.experts = None if experts is None else check_int(experts, "experts")
        # ReMoRA restarts that folded earlier updates of this adapter into the base weight: a checkpoint of M
        # alone then no longer reproduces the model (see mora_kernels.save_adapter).
        self.restarts = 0
        self.geo = Geometry(in_features, out_features, r_hat(in_features, out_features, r, t), t)
        shape = (self.geo.R, self.geo.R) if experts is None else (self.experts, self.geo.R, self.geo.R)
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        # Derived tables, never saved: recomputed in float32 for the right R on every move (see _apply).
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self._refresh_rope()

    @property
    def mora_type(self) -> MoRAType:
        return self.geo.t

    @property
    def rope(self):
        return (self.rope_cos, self.rope_sin) if self.geo.t == MoRAType.ROPE else None

    def _refresh_rope(self) -> None:
        if self.geo.t == MoRAType.ROPE:
            with torch.inference_mode(False):  # a move under inference_mode must not leave tables unusable to train
                self.rope_cos, self.rope_sin = rope_tables(self.geo.R, self.geo.used_blocks, self.weight.device)
        else:
            self.rope_cos = self.rope_sin = None

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would cast the tables; recompute them in float32 on the new device instead
        # (docs/design.md, D3: tables frozen on one device or computed in bf16). They are dropped first: tables
        # built on "meta" (PEFT's low_cpu_mem_usage) cannot be copied to a real device.
        self.rope_cos = self.rope_sin = None
        result = super()._apply(fn, recurse)
        self._refresh_rope()
        return result

    def set_type(self, mora_type) -> None:
        """Switch to another type with the same square size (ReMoRA: types 1-4 share ``R`` for a given r)."""
        t = mora_type_of(mora_type)
        R = r_hat(self.geo.n, self.geo.m, self.r, t)
        if R != self.geo.R:
            raise ValueError(
                f"mora_type={int(t)} needs R={R} but this adapter has R={self.geo.R}; only types with the same "
                "square size can be swapped in place"
            )
        self.geo = Geometry(self.geo.n, self.geo.m, R, t)
        self._refresh_rope()

    def forward(self, x, scaling: float, base=None, backend: str = "auto", inplace: bool = False) -> torch.Tensor:
        if self.experts is not None:
            raise TypeError("MoRAMatrix: a stack of expert matrices has no forward; use delta_weight")
        return ops.apply(x, self.weight, self.geo, self.rope, scaling, base, backend, inplace)

    def delta_weight(self, scaling: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scaling * dW`` of shape ``(out_features, in_features)`` (``(experts, out_features, in_features)`` for a
        stack) in float32, or float64 if M or ``dtype`` is.

        Pass the base weight's dtype as ``dtype`` so that a float64 base merges exactly as its forward computes.
        """
        M = self.weight.to(compute_dtype(self.weight.dtype, dtype or self.weight.dtype))
        return reference.delta_weight(M, self.geo, self.rope) * scaling  # a stack: every expert in one pass

    def check_loaded(self, key: str, tensor) -> None:
        check_loaded_matrix(key, tensor, self.geo.n, self.geo.m, self.r, self.geo.t, self.experts)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict:
            self.check_loaded(key, state_dict[key])
        dtype = self.weight.dtype
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # load_state_dict(assign=True) (PEFT's low_cpu_mem_usage) puts the checkpoint's tensor in place of a weight
        # made on "meta": M keeps the dtype it was made with, as a copying load, and the tables follow its device.
        if self.weight.dtype != dtype:
            self.weight = nn.Parameter(self.weight.detach().to(dtype), requires_grad=self.weight.requires_grad)
        self._refresh_rope()

    def extra_repr(self) -> str:
        experts = "" if self.experts is None else f", experts={self.experts}"
        return f"r={self.r}, R={self.geo.R}, mora_type={int(self.geo.t)}{experts}"


class Magnitude(nn.Module):
    """DoRA's magnitude vector of one adapter (weight-decomposed MoRA, docs/design.md#dora): ``weight``
    ``(out_features,)``, the row norms of the adapted weight. It starts at the row norms of ``W + s dW(M)`` (of W
    at M = 0), so the layer starts at exactly what it computes without it."""

    def __init__(self, norms: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(norms)


def dora_magnitude(base: nn.Module, adapter: MoRAMatrix, scaling: float) -> Magnitude:
    """A new adapter's magnitude vector: the row norms of ``W + scaling dW(M)``, in M's dtype (float32 at least)."""
    weight = check_base_layer(base).read(base)
    with torch.no_grad():
        delta = adapter.delta_weight(scaling, weight.dtype)
        norms = torch.linalg.vector_norm(weight.to(delta.dtype) + delta, dim=1)
    return Magnitude(norms.to(adapter.weight.dtype))


class _MergedGuard(torch.autograd.Function):
    """Identity on a merged layer's output whose backward refuses to give the merged matrices a gradient: their
    update lives in the base weight, so M would get none and a training step would silently change nothing."""

    @staticmethod
    def forward(ctx, result, names, *weights):
        ctx.names = names
        return result.clone()  # not a view: later layers may write their output in place

    @staticmethod
    def backward(ctx, grad):
        if any(ctx.needs_input_grad[2:]):
            raise ValueError(
                f"backward through a merged MoRA layer: adapter(s) {list(ctx.names)} are merged into the base weight, "
                "so their M gets no gradient; unmerge() before training (or freeze M with requires_grad_(False))"
            )
        return (grad, None, *(None for _ in ctx.needs_input_grad[2:]))


class DoRA:
    """The DoRA terms of one forward (docs/design.md#dora): per DoRA adapter a, ``f_a = m_a / ||W + s_a dW_a||``
    row-wise with the norm detached (DoRA's section 4.3, as PEFT), and the layer's output becomes
    ``base(x) + (f_a - 1) x W^T + f_a s_a D(M_a C(x))``, i.e. ``x (f_a (W + s_a dW_a))^T + bias``. ``W`` is the base's
    dense ``(out, in)`` weight (dequantized for a quantized base), read once per forward."""

    def __init__(self, layer, factors: dict, base_out, weight):
        self.layer, self.factors, self.base_out, self.weight = layer, factors, base_out, weight

    @classmethod
    def of(cls, layer, names: Sequence[str], x: torch.Tensor, result: torch.Tensor) -> DoRA:
        """The terms for the DoRA adapters among ``names``; ``result`` is the base layer's output (with bias)."""
        names = [name for name in names if layer.mora_magnitude(name) is not None]
        if not names:
            return cls(layer, {}, None, None)
        base = layer.base_layer
        weight = check_base_layer(base).read(base)
        if layer.merged_adapters:  # W holds other adapters: f and x W^T are of the weight without them
            weight = layer._unmerged_weight(weight)
            base_out = nn.functional.linear(x, weight.to(x.dtype))
        else:
            bias = getattr(base, "bias", None)
            # a copy: the other adapters may add into result in place
            base_out = result.clone() if bias is None else result - bias.to(result.dtype)
        return cls(layer, {name: layer.dora_factor(name, weight) for name in names}, base_out, weight)

    def base_part(self, x: torch.Tensor, x_used: torch.Tensor) -> torch.Tensor:
        """``x_used W^T``: the base output without bias, recomputed when dropout changed the adapter's input."""
        return self.base_out if x_used is x else nn.functional.linear(x_used, self.weight.to(x_used.dtype))

    def add(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        x_used = layer.mora_dropout(name)(x)
        update = layer.mora_adapter(name)(x_used, layer.mora_scaling(name), None, layer.backend, False)
        f = self.factors[name].to(result.dtype)
        return result + (f - 1) * self.base_part(x, x_used) + f * update

    def add_rows(self, names: Sequence[str], row_index, x, x_used, update, result) -> torch.Tensor:
        """A mixed batch's group: row i used adapter ``names[row_index[i]]`` (-1: none) and got ``update``."""
        ones = torch.ones(self.base_out.shape[-1], dtype=self.base_out.dtype, device=self.base_out.device)
        table = torch.stack([ones, *(self.factors.get(n, ones).to(ones.dtype) for n in names)])
        f = table[row_index + 1].view(row_index.shape[0], *([1] * (x.dim() - 2)), -1)
        return result + (f - 1) * self.base_part(x, x_used) + f * update


class AdapterMixin:
    """Adapter logic shared by ``MoRALinear``, the PEFT layer and (merge, unmerge, the merged guard)
    ``MoRAParameter``.

    The class provides ``base_layer`` (the frozen Linear), ``backend``, ``merged_adapters`` (list),
    ``active_adapters`` (list), ``disable_adapters`` (bool) and ``mora_adapter(name)``, ``mora_scaling(name)``,
    ``mora_dropout(name)``, ``mora_magnitude(name)`` (DoRA's vector, or None), ``mora_adapter_names()``.

    Adapters may sit on different layers ("a" on q_proj, "b" on v_proj): a layer applies, merges and restarts only
    the active adapters it holds (PEFT's rule), so after activating "b" a q_proj without "b" computes its base.
    """

    def active_mora_adapters(self) -> list[str]:
        """The active adapters that this layer holds, in order."""
        held = self.mora_adapter_names()
        return [name for name in self.active_adapters if name in held]

    def _adapted(self, x: torch.Tensor, result: torch.Tensor, adapter_names: Sequence[str] | None) -> torch.Tensor:
        """``result`` (the base output) plus each active, unmerged adapter; or one adapter per row of the batch."""
        if self.disable_adapters:
            return result
        result = self._guard_merged(result)
        if adapter_names is not None:
            return self._mixed_batch(x, result, adapter_names)
        unmerged = [name for name in self.active_mora_adapters() if name not in self.merged_adapters]
        dora = DoRA.of(self, unmerged, x, result)
        for name in unmerged:
            adapter = self.mora_adapter(name)
            if name in dora.factors:
                result = dora.add(name, x, result)
                continue
            # result is ours (the base layer's or the previous adapter's output): when autograd records
            # nothing (inference), add the update into it in place.
            inplace = not ops.needs_autograd(x, adapter.weight, result)
            result = adapter(self.mora_dropout(name)(x), self.mora_scaling(name), result, self.backend, inplace)
        return result

    def _guard_merged(self, result: torch.Tensor) -> torch.Tensor:
        """``result``, through ``_MergedGuard`` when a merged adapter's M (or DoRA vector) would take a gradient."""
        merged = [self.mora_adapter(name).weight for name in self.merged_adapters]
        merged += [m for m in map(self.mora_magnitude, self.merged_adapters) if m is not None]
        if torch.is_grad_enabled() and any(weight.requires_grad for weight in merged):
            result = _MergedGuard.apply(result, tuple(self.merged_adapters), *merged)
        return result

    @property
    def merged_weight(self) -> torch.Tensor:
        """The tensor a merge writes: the base layer's weight (``MoRAParameter``: the adapted parameter)."""
        return self.base_layer.weight

    def _mixed_batch(self, x, result, adapter_names):
        """One adapter per row of x's first dim: one ``mora_mixed`` per group of adapters sharing type, R and
        dtype (usually one group), whatever the number of adapters."""
        if x.dim() < 2 or len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names must name one adapter (or {BASE_ROW!r}) per row of x's first dim "
                f"({x.shape[0] if x.dim() else 0}), got {len(adapter_names)} names"
            )
        if self.merged_adapters:
            raise ValueError("adapter_names: a batch with an adapter per row needs every adapter unmerged first")
        known = self.mora_adapter_names()
        for name in dict.fromkeys(adapter_names):
            if name != BASE_ROW and name not in known:
                raise ValueError(f"adapter_names: unknown adapter {name!r}; this layer has {sorted(known)}")
        used = [name for name in dict.fromkeys(adapter_names) if name != BASE_ROW]
        dora = DoRA.of(self, used, x, result) if any(self.mora_magnitude(n) is not None for n in used) else None
        for names in self._mixed_groups(adapter_names):
            adapters = [self.mora_adapter(name) for name in names]
            weights = [adapter.weight for adapter in adapters]
            slot = {name: k for k, name in enumerate(names)}
            row_index = torch.tensor([slot.get(name, -1) for name in adapter_names], device=x.device)
            index = row_index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
            scalings = [self.mora_scaling(name) for name in names]
            # float64 factors: a float64 batch keeps them exact (the fused backends take them in float32)
            scaling = scalings[0] if len(set(scalings)) == 1 else torch.tensor(scalings, dtype=torch.float64,
                                                                                device=x.device)
            x_in = _row_dropout(x, [self.mora_dropout(name) for name in names], row_index)
            # result is ours (the base layer's or the previous group's output): add into it when nothing is recorded.
            inplace = not ops.needs_autograd(x, result, *weights)
            # Stacked anew on every call, never kept: no stamp (address, version counter) sees every write to M
            # (fused optimizers, .data, re-allocation at the same address). K R^2 elements copied per layer, against
            # the n m of the base weight the same call reads: about 2 K r / n of it (docs/reliability.md).
            M = weights[0].unsqueeze(0) if len(weights) == 1 else torch.stack(weights)
            if dora is not None and any(name in dora.factors for name in names):
                update = ops.apply_mixed(x_in, M, index, adapters[0].geo, adapters[0].rope, scaling, None,
                                         self.backend, False, check_index=False)
                result = dora.add_rows(names, row_index, x, x_in, update, result)
                continue
            result = ops.apply_mixed(x_in, M, index, adapters[0].geo, adapters[0].rope, scaling, result, self.backend,
                                     inplace, check_index=False)
        return result

    def _mixed_groups(self, adapter_names) -> list[list[str]]:
        """The adapters a mixed batch uses, grouped by (geometry, dtype, device): the others are not stacked (and get
        no gradient, not a zero one)."""
        used = set(adapter_names)
        groups: dict[tuple, list[str]] = {}
        for name in self.mora_adapter_names():
            if name in used:
                weight = self.mora_adapter(name).weight
                groups.setdefault((self.mora_adapter(name).geo, weight.dtype, weight.device), []).append(name)
        return list(groups.values())

    def dora_factor(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's ``m / ||W + s dW||`` of adapter ``name`` for the base weight ``weight`` (dense ``(out, in)``): one
        factor per output row, in the update's compute dtype, differentiable in m only (the norm is detached)."""
        magnitude = self.mora_magnitude(name)
        with torch.no_grad():
            delta = self.mora_adapter(name).delta_weight(self.mora_scaling(name), weight.dtype)
            norm = torch.linalg.vector_norm(weight.to(delta.dtype) + delta, dim=1)
        return magnitude.to(norm.dtype) / norm

    def _has_dora(self, names: Iterable[str]) -> bool:
        return any(self.mora_magnitude(name) is not None for name in names)

    def _add_to_weight(self, names: Sequence[str], sign: float, finite_only: bool = False) -> None:
        """``W += sign * scaling * dW`` for each adapter of ``names`` in turn, with dW in the weight's precision
        (float64 for a float64 base). The sum is computed aside and written once: a failure leaves W untouched.

        W is the base's dense ``(out, in)`` weight (``mora_kernels.bases``): transposed back for a Conv1D, and
        dequantized, then quantized again (with a warning) for a quantized base. A quantized base is never
        requantized from an already merged weight: the packed weight from before the first merge is kept, each
        merged set is quantized once from it, and when no adapter is left merged it is put back as it was.
        """
        if not names:
            return
        base = self.base_layer
        kind = check_base_layer(base)
        kind.check_merge(base)
        if kind.quantized:
            self._requantize(kind, names, sign, finite_only)
            return
        if self._has_dora([*self.merged_adapters, *names]):
            # a DoRA factor comes from the weight without any adapter: back to it, then the new set merged onto it
            merged = self._merged_after(names, sign)
            kind.write(base, self._composed(self._unmerged_weight(kind.read(base)), merged, finite_only))
            return
        kind.write(base, self._with_updates(kind.read(base), names, sign, finite_only))

    def _merged_after(self, names: Sequence[str], sign: float) -> list[str]:
        return [*self.merged_adapters, *names] if sign > 0 else [n for n in self.merged_adapters if n not in names]

    def _composed(self, weight: torch.Tensor, names: Sequence[str], finite_only: bool) -> torch.Tensor:
        """``weight`` (the base's, no adapter merged) with adapters ``names`` merged: ``+ s dW`` for a plain adapter
        and, for a DoRA one, ``+ (f - 1) W + f s dW`` with ``f`` from ``weight``: the forward's terms, so merged and
        unmerged layers compute the same. The factors are kept for the unmerge (``_unmerged_weight``)."""
        if not self._has_dora(names):
            return self._with_updates(weight, names, 1.0, finite_only)
        factors, total = {}, None
        for name in names:
            delta = self.mora_adapter(name).delta_weight(self.mora_scaling(name), weight.dtype)
            w = weight.to(delta.dtype)
            total = w if total is None else total
            if self.mora_magnitude(name) is None:
                total = total + delta
                continue
            f = factors[name] = self.dora_factor(name, weight).detach().to(delta.dtype)[:, None]
            total = total + (f - 1) * w + f * delta
        updated = total.to(weight.dtype)
        if finite_only and not torch.isfinite(updated).all():
            raise ValueError(f"merge: adapters {list(names)} would make the base weight non-finite; not merged")
        # Kept outside the module's parameters (not saved, not moved), as the quantized base's original below.
        self.__dict__["_dora_factors"] = factors
        return updated

    def _unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight without the merged adapters, from the merged ``weight``: ``W_merged = g W + sum c s dW``
        with ``c = f`` (DoRA, the factors of the merge) or 1, and ``g = 1 + sum (f - 1)`` over the DoRA adapters."""
        if not self.merged_adapters:
            return weight
        factors = self.__dict__.get("_dora_factors") or {}
        numerator, g = None, 1.0
        for name in self.merged_adapters:
            delta = self.mora_adapter(name).delta_weight(self.mora_scaling(name), weight.dtype)
            numerator = weight.to(delta.dtype) if numerator is None else numerator
            f = factors.get(name)
            numerator = numerator - (delta if f is None else f * delta)
            g = g if f is None else g + (f - 1)
        return (numerator / g).to(weight.dtype)

    def _with_updates(self, weight: torch.Tensor, names: Sequence[str], sign: float, finite_only: bool):
        updated = weight
        for name in names:
            delta = self.mora_adapter(name).delta_weight(sign * self.mora_scaling(name), weight.dtype)
            updated = (updated.to(delta.dtype) + delta).to(weight.dtype)
            if finite_only and not torch.isfinite(updated).all():
                raise ValueError(f"merge: adapter {name!r} would make the base weight non-finite; not merged")
        return updated

    def _requantize(self, kind, names: Sequence[str], sign: float, finite_only: bool) -> None:
        """``_add_to_weight`` on a quantized base: the adapters merged afterwards, added to the kept original."""
        base = self.base_layer
        merged = [*self.merged_adapters, *names] if sign > 0 else [n for n in self.merged_adapters if n not in names]
        current = kind.keep(base)
        original = self.__dict__.get("_unmerged_base") or current  # before the first merge: the weight as it is
        try:
            kind.restore(base, original)
            if merged:
                weight = kind.read(base)
                updated = self._composed(weight, merged, finite_only)
                warn_quantized_merge(kind, base)
                kind.write(base, updated)
        except BaseException:
            kind.restore(base, current)
            raise
        # Kept outside the module's parameters (not saved, not moved): only a merged layer holds it.
        self.__dict__["_unmerged_base"] = original if merged else None

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """``W += scaling * dW`` for the active adapters (or ``adapter_names``); then the forward skips them.

        ``safe_merge`` refuses (ValueError, weight untouched) a merge that would put inf/NaN in the weight.
        """
        if adapter_names is None:
            names = self.active_mora_adapters()
        else:
            names = adapter_names_of(adapter_names, "adapter_names")
        todo = [name for name in names if name not in self.merged_adapters]
        if not todo:
            raise RuntimeError(f"merge: adapters {names} are already merged into the base weight")
        known = self.mora_adapter_names()
        unknown = [name for name in todo if name not in known]
        if unknown:
            raise ValueError(f"merge: unknown adapter(s) {unknown}; this layer has {sorted(known)}")
        self._add_to_weight(todo, 1.0, finite_only=safe_merge)
        self.merged_adapters.extend(todo)

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W -= scaling * dW`` for every merged adapter: W comes back up to one rounding of the weight's dtype
        per merge (about 1e-16 relative in float64, 1e-7 in float32, 4e-3 in bf16)."""
        if not self.merged_adapters:
            raise RuntimeError("unmerge: no adapter is merged")
        self._add_to_weight(self.merged_adapters[::-1], -1.0)
        self.merged_adapters.clear()

    @torch.no_grad()
    def restart(self, next_type=None) -> list[torch.nn.Parameter]:
        """ReMoRA step: fold each active adapter into the base weight, zero its M, move it to ``next_type(t)``.

        Returns the matrices that were reset, so that their optimizer state can be dropped.
        """
        if self.merged_adapters:
            raise RuntimeError("restart: unmerge the adapters first (a merged adapter cannot be folded in again)")
        kind = check_base_layer(self.base_layer)
        if kind.quantized:
            raise TypeError(
                f"restart: the base is a {kind.describe(self.base_layer)}; a ReMoRA restart would round each cycle's "
                "update to its quantization grid. Run ReMoRA on a float base"
            )
        if self._has_dora(self.active_mora_adapters()):
            raise ValueError(
                "restart: a DoRA adapter's update rescales the rows of W by its magnitude vector, which a restart "
                "would fold into W with no vector left to train; ReMoRA runs on adapters without use_dora"
            )
        reset = []
        self._add_to_weight(self.active_mora_adapters(), 1.0)
        for name in self.active_mora_adapters():
            adapter = self.mora_adapter(name)
            adapter.weight.zero_()
            adapter.restarts += 1
            if next_type is not None:
                adapter.set_type(next_type(adapter.mora_type))
            reset.append(adapter.weight)
        return reset


def _row_dropout(x: torch.Tensor, dropouts: list[nn.Module], row_index: torch.Tensor) -> torch.Tensor:
    """Each row of x's first dim dropped out with its adapter's probability (``row_index``; -1: none), scaled by
    ``1 / (1 - p)`` as ``nn.Dropout``; x itself when no dropout is active (eval mode, or p = 0 everywhere)."""
    probs = [d.p if isinstance(d, nn.Dropout) and d.training else 0.0 for d in dropouts]
    if not any(probs):
        return x
    p = torch.tensor([0.0, *probs], device=x.device, dtype=x.dtype)[row_index + 1]
    p = p.view(-1, *([1] * (x.dim() - 1)))
    return x * (torch.rand_like(x) >= p) / (1 - p)


class AdapterSet(AdapterMixin):
    """The adapters of one package layer (``MoRALinear``, ``MoRAParameter``), kept by the layer itself (PEFT's layer
    keeps them in PEFT's containers): ``adapters`` (``MoRAMatrix`` by name), ``dropouts``, ``magnitudes`` (DoRA),
    ``scalings``, the active and merged names, and what changes them (``set_adapter``, ``enable_adapters``,
    ``delete_adapter``). A layer calls ``_init_adapters`` in its ``__init__`` and adds adapters with
    ``_register``."""

    def _init_adapters(self) -> None:
        self.adapters = nn.ModuleDict()
        self.dropouts = nn.ModuleDict()
        self.magnitudes = nn.ModuleDict()  # DoRA adapters only
        self.scalings: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self._active: list[str] = []
        self._disabled = False

    def _check_new(self, name: str) -> None:
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")

    def _register(self, name: str, adapter: MoRAMatrix, dropout: float, scaling: float, magnitude) -> None:
        """Add a checked adapter (frozen unless ``name`` is active)."""
        adapter.requires_grad_(name in self._active)
        self.adapters[name] = adapter
        self.dropouts[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        self.scalings[name] = scaling
        if magnitude is not None:
            self.magnitudes[name] = magnitude.requires_grad_(name in self._active)

    # --- the accessors AdapterMixin needs (base_layer is the layer's own)
    def mora_adapter(self, name: str) -> MoRAMatrix:
        return self.adapters[name]

    def mora_scaling(self, name: str) -> float:
        return self.scalings[name]

    def mora_dropout(self, name: str) -> nn.Module:
        return self.dropouts[name]

    def mora_magnitude(self, name: str) -> nn.Parameter | None:
        return self.magnitudes[name].weight if name in self.magnitudes else None

    def mora_adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def disable_adapters(self) -> bool:
        return self._disabled

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active adapter(s) (their sum is applied); only active adapters train.

        An empty list leaves no adapter active: the layer computes its base output (``mora_kernels.set_adapter``
        does this to a layer that holds none of the adapters it activates).
        """
        names = adapter_names_of(names, "names")
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            have = self.mora_adapter_names()
            raise ValueError(f"set_adapter: unknown adapter(s) {unknown}; this layer has {have}")
        # A merged adapter that stops being active would stay in the base weight: take it out first (as PEFT does).
        leaving = [n for n in self.merged_adapters if n not in names]
        with torch.no_grad():
            self._add_to_weight(leaving, -1.0)
        self.merged_adapters[:] = [n for n in self.merged_adapters if n not in leaving]
        self._active = names
        for key, adapter in [*self.adapters.items(), *self.magnitudes.items()]:
            adapter.requires_grad_(key in names and not self._disabled)

    def enable_adapters(self, enabled: bool) -> None:
        """Disabled: the layer computes ``base(x)`` (merged adapters are unmerged first)."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        if not enabled and self.merged_adapters:
            self.unmerge()
        self._disabled = not enabled
        self.set_adapter(self._active)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (not while merged, and not the last one: unload the layer instead)."""
        if name not in self.adapters:
            raise ValueError(f"delete_adapter: unknown adapter {name!r}; this layer has {self.mora_adapter_names()}")
        if name in self.merged_adapters:
            raise RuntimeError(f"delete_adapter: adapter {name!r} is merged; unmerge it first")
        if len(self.adapters) == 1:
            raise RuntimeError("delete_adapter: cannot delete the only adapter; replace the layer by its base instead")
        del self.adapters[name], self.dropouts[name], self.scalings[name]
        if name in self.magnitudes:
            del self.magnitudes[name]
        remaining = [n for n in self._active if n != name]
        self.set_adapter(remaining if remaining or not self._active else self.mora_adapter_names()[0])

    # --- the single-adapter view: the first active adapter
    @property
    def active_name(self) -> str:
        if not self._active:
            have = self.mora_adapter_names()
            raise RuntimeError(f"this layer has no active adapter (it has {have}); set_adapter first")
        return self._active[0]

    @property
    def active(self) -> MoRAMatrix:
        return self.adapters[self.active_name]


class MoRALinear(AdapterSet, nn.Module):
    """``y = base(x) + scaling * D(M C(dropout(x)))`` with a frozen ``base`` and a trainable square ``M``.

    Args:
        base: the layer to adapt (frozen here; its bias is kept): an ``nn.Linear``, transformers' ``Conv1D``, or a
            quantized Linear of bitsandbytes (4-bit, 8-bit) or torchao (see ``mora_kernels.bases``).
        r: the LoRA rank whose parameter budget MoRA matches; ``R = r_hat(in, out, r, mora_type)``.
        mora_type: 1, 2, 3, 4, 6 (original release) or 7 / ``"decoupled"``.
        dropout: dropout probability on the adapter's input (training mode only).
        scaling: factor on the update (the original release uses 1.0 and ignores lora_alpha).
        dtype: dtype of ``M``; float32 by default, as the original, whatever the base's dtype.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"`` (see ``mora_kernels.mora``).
        adapter_name: name of this first adapter.
        use_dora: weight-decomposed MoRA (DoRA on MoRA's update, docs/design.md#dora): a trainable magnitude vector
            ``m`` (``magnitudes[name].weight``, ``(out_features,)``) rescales each row of ``W + scaling dW`` to norm
            ``m``; it starts at the row norms of W, so the layer still starts at ``base(x)``.

    ``M`` starts at zero, so the layer first computes exactly ``base(x)``. More adapters: ``add_adapter``,
    ``set_adapter``, ``delete_adapter``, ``enable_adapters``; ``M``, ``R``, ``geo``, ``rope``, ``r``,
    ``mora_type`` and ``scaling`` describe the (first) active adapter.

    State dict: with one adapter its matrix is saved under the key ``M`` (the single-adapter format); with several,
    each under ``adapters.<name>.weight``. A key ``M`` always loads into the active adapter.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        mora_type: int | str = 1,
        dropout: float = 0.0,
        scaling: float = 1.0,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        adapter_name: str = "default",
        use_dora: bool = False,
    ):
        super().__init__()
        kind = check_base_layer(base)
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.in_features, self.out_features = kind.features(base)
        self.base = base
        self.backend = backend
        self._init_adapters()
        self.add_adapter(adapter_name, r, mora_type, dropout, scaling, dtype, use_dora)
        self.set_adapter(adapter_name)
        base.requires_grad_(False)  # only once every argument was accepted: a refused layer leaves base as it was
        keep_trainable(base)
        self.register_state_dict_post_hook(_single_adapter_key)
        self.train(base.training)  # a layer swapped into an eval-mode model must not start dropping out

    @property
    def base_layer(self) -> nn.Linear:
        return self.base

    # --- several adapters
    def add_adapter(
        self,
        name: str,
        r: int,
        mora_type: int | str = 1,
        dropout: float = 0.0,
        scaling: float = 1.0,
        dtype: torch.dtype = torch.float32,
        use_dora: bool = False,
    ) -> None:
        """Add an adapter (M at zero, frozen until made active with ``set_adapter``)."""
        self._check_new(name)
        dropout, scaling = check_dropout(dropout), check_scaling(scaling)
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
        adapter = MoRAMatrix(self.in_features, self.out_features, r, mora_type, dtype, self.base.weight.device)
        magnitude = dora_magnitude(self.base, adapter, scaling) if use_dora else None
        self._register(name, adapter, dropout, scaling, magnitude)

    # --- the single-adapter view: the first active adapter
    @property
    def M(self) -> nn.Parameter:
        return self.active.weight

    @property
    def R(self) -> int:
        return self.active.geo.R

    @property
    def geo(self) -> Geometry:
        return self.active.geo

    @property
    def rope(self):
        return self.active.rope

    @property
    def rope_cos(self):
        return self.active.rope_cos

    @property
    def rope_sin(self):
        return self.active.rope_sin

    @property
    def r(self) -> int:
        return self.active.r

    @property
    def mora_type(self) -> MoRAType:
        return self.active.mora_type

    @property
    def scaling(self) -> float:
        return self.scalings[self.active_name]

    def forward(self, x: torch.Tensor, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        """``base(x)`` plus the active adapters; ``adapter_names`` (one per row of x) picks an adapter per row
        (default: the names of an enclosing ``adapter_per_row`` block of this thread, if any)."""
        check_float_tensor(x, "x")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., in_features={self.in_features}), got {tuple(x.shape)}")
        weight = self.base.weight
        # An offloaded weight (meta, moved in by a hook), autocast and a quantized base (integer storage, its own
        # compute dtype) legitimately differ from x.
        if weight.device.type != "meta" and x.device != weight.device:
            raise ValueError(f"x must be on the layer's device {weight.device}, got {x.device}")
        if weight.dtype in FLOAT_DTYPES and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x must have the base layer's dtype {weight.dtype} (or run under autocast), got {x.dtype}")
        if adapter_names is None:
            adapter_names = selected_rows(self)
        return self._adapted(x, self.base(x), adapter_names)

    def delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """``scaling * dW`` of an adapter (default: the active one), ``(out, in)``, float32 (float64 if M is)."""
        name = self.active_name if adapter_name is None else adapter_name
        if name not in self.scalings:
            raise ValueError(f"adapter_name: unknown adapter {name!r}; this layer has {self.mora_adapter_names()}")
        return self.adapters[name].delta_weight(self.scalings[name])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        legacy = prefix + "M"
        if legacy in state_dict:  # the single-adapter format: one key M for the active adapter
            self.active.check_loaded(legacy, state_dict[legacy])
            state_dict[f"{prefix}adapters.{self.active_name}.weight"] = state_dict.pop(legacy)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        several = f", adapters={self.mora_adapter_names()}, active={self._active}" if len(self.adapters) > 1 else ""
        if not self._active:
            return f"in_features={self.in_features}, out_features={self.out_features}, no active adapter{several}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, R={self.R}, "
            f"mora_type={int(self.mora_type)}, scaling={self.scaling}, merged={self.merged}, "
            f"backend={self.backend!r}{several}"
        )



def is_float8(dtype: torch.dtype) -> bool:
    """A one-byte float (float8 of any kind): no arithmetic of its own, updates are added in a wider dtype."""
    return dtype.is_floating_point and dtype.itemsize == 1


def with_delta(weight: torch.Tensor, delta: torch.Tensor, finite_only: bool, what: str) -> torch.Tensor:
    """``weight + delta`` computed in delta's dtype and rounded once to weight's (a merge's one rounding); with
    ``finite_only`` a ValueError (``what`` names the merge) instead of a non-finite result."""
    updated = (weight.to(delta.dtype) + delta).to(weight.dtype)
    if finite_only and not torch.isfinite(updated).all():
        raise ValueError(f"merge: {what} would be non-finite; not merged")
    return updated


class _ParameterUpdate(nn.Module):
    """The parametrization of ``parameter_update``: the parameter reads ``W + delta``. A float8 W is added in
    delta's wider dtype and rounded once (clamped first: a cast to float8 gives NaN, not the largest value, above
    its range); cast to float8 first, most of a small update would be lost."""

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.delta = delta

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if not is_float8(W.dtype):
            return W + self.delta
        info = torch.finfo(W.dtype)
        return (W.to(self.delta.dtype) + self.delta).clamp(info.min, info.max).to(W.dtype)


@contextlib.contextmanager
def parameter_update(module: nn.Module, parameter_name: str, delta: torch.Tensor):
    """Within the block ``module.<parameter_name>`` reads ``W + delta`` (differentiable in delta): a weight
    parametrization, cached for the block (computed once however often the module reads it) and removed after it.
    delta is cast to W's dtype, which a parametrization may not change, except for float8 (added in the wider
    dtype). The home of the parametrization of both paths (``MoRAParameter``, the PEFT path's ``ParamWrapper``);
    another parametrization of the parameter (the user's) stays."""
    param = getattr(module, parameter_name)
    if not is_float8(param.dtype):
        delta = delta.to(param.dtype)
    requires_grad = param.requires_grad
    update = _ParameterUpdate(delta)
    parametrize.register_parametrization(module, parameter_name, update)
    module.parametrizations[parameter_name].original.requires_grad_(requires_grad)  # registering resets it
    try:
        with parametrize.cached():
            yield
    finally:
        chain = module.parametrizations[parameter_name]
        if len(chain) == 1:
            parametrize.remove_parametrizations(module, parameter_name, leave_parametrized=False)
        else:
            del chain[next(i for i, p in enumerate(chain) if p is update)]


def parameter_layout(module: nn.Module, parameter_name: str, where: str) -> tuple[int | None, int, int, bool]:
    """``(experts, in_features, out_features, out_first)`` of the parameter ``module.<parameter_name>`` as PEFT
    reads a targeted parameter: 3-D ``(E, out, in)``, or ``(E, in, out)`` where the module says ``is_transposed``;
    2-D ``(out, in)`` (experts None). Anything else is refused, the error naming ``where``."""
    param = getattr(module, parameter_name, None)
    if not isinstance(param, nn.Parameter):
        raise TypeError(f"{where}: {type(module).__name__} has no parameter {parameter_name!r}")
    if param.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: expected a floating-point parameter of dtype {FLOAT_DTYPES}, got {param.dtype}")
    if param.dim() == 2:
        return None, param.shape[1], param.shape[0], True
    if param.dim() != 3:
        raise ValueError(f"{where}: expected a 2-D (out, in) or 3-D (experts, out, in) parameter, got shape "
                         f"{tuple(param.shape)}")
    experts, first, second = param.shape
    out_first = not getattr(module, "is_transposed", False)
    return experts, *((second, first) if out_first else (first, second)), out_first


class MoRAParameter(AdapterSet, nn.Module):
    """MoRA on one parameter that a module reads itself (``apply_mora(target_parameters=...)``): a
    mixture-of-experts weight stored as one 3-D parameter, one M per expert.

    The parameter is read as PEFT reads it (``parameter_layout``): ``(E, out, in)``, or ``(E, in, out)`` where the
    module says ``is_transposed``, or 2-D ``(out, in)``. An adapter's M is ``(E, R, R)`` (``(R, R)`` for 2-D).
    Several parameters of one module: the layers nest (the outer layer's ``base_layer`` is the inner one), as PEFT's
    wrappers do, so module names and checkpoint keys are PEFT's.

    On transformers' experts modules that ``mora_kernels.experts`` supports, the outermost layer runs the nest
    fused: the routed rows of each parameter go through ``mora_mixed`` with the expert as adapter index
    (``experts.experts_forward``), no ``s dW`` is built, and a batch with an adapter per row (``adapter_per_row``)
    is served. Elsewhere, or with ``fuse = False`` on a layer of the nest, expert e's weight reads
    ``W_e + s dW(M_e)`` while the module runs (``_forward_adapted``: a weight parametrization), and a batch is
    served only where every row names the same adapter. Either way the module's routing is untouched and M_e gets
    the gradient of the tokens routed to e.

    Adapters, merge (``W + s dW`` rounded once), set / delete / disable work as on ``MoRALinear``. Refused: dropout
    (it would act on x, which the weight never sees), DoRA and ReMoRA (as PEFT refuses them here).
    """

    def __init__(self, base: nn.Module, parameter_name: str, r: int, mora_type: int | str = 1, scaling: float = 1.0,
                 dtype: torch.dtype = torch.float32, adapter_name: str = "default", backend: str = "auto"):
        super().__init__()
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.backend = backend  # the fused path's mora_mixed backend (the outermost layer's runs the nest)
        self.fuse = True  # False: the parametrization, for this layer and the nest it is in
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be a torch.nn.Module, got {type(base).__name__}")
        if not isinstance(parameter_name, str):
            raise TypeError(f"parameter_name must be a str, got {parameter_name!r}")
        self.parameter_name = parameter_name
        self.base_layer = base
        layout = parameter_layout(self.get_base_layer(), parameter_name, f"parameter {parameter_name!r}")
        self.experts, self.in_features, self.out_features, self.out_first = layout
        self._init_adapters()
        self.add_adapter(adapter_name, r, mora_type, scaling, dtype)
        self.set_adapter(adapter_name)
        self.parameter().requires_grad_(False)  # only once every argument was accepted
        self.train(base.training)

    def get_base_layer(self) -> nn.Module:
        """The module that holds the parameter (below any nested ``MoRAParameter``)."""
        module = self.base_layer
        while isinstance(module, MoRAParameter):
            module = module.base_layer
        return module

    def parameter(self) -> nn.Parameter:
        return getattr(self.get_base_layer(), self.parameter_name)

    @property
    def merged_weight(self) -> torch.Tensor:
        return self.parameter()

    def add_adapter(self, name: str, r: int, mora_type: int | str = 1, scaling: float = 1.0,
                    dtype: torch.dtype = torch.float32) -> None:
        """Add an adapter (M at zero, frozen until made active with ``set_adapter``)."""
        self._check_new(name)
        scaling = check_scaling(scaling)
        adapter = MoRAMatrix(self.in_features, self.out_features, r, mora_type, dtype, self.parameter().device,
                             self.experts)
        self._register(name, adapter, 0.0, scaling, None)

    def delta_weight(self, adapter_name: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scaling * dW`` of an adapter (default: the active one) laid out as the parameter, on its device, in
        float32 (float64 if M, the parameter or ``dtype`` is)."""
        name = self.active_name if adapter_name is None else adapter_name
        if name not in self.scalings:
            raise ValueError(f"adapter_name: unknown adapter {name!r}; this layer has {self.mora_adapter_names()}")
        param = self.parameter()
        delta = self.adapters[name].delta_weight(self.scalings[name], dtype or param.dtype)
        return (delta if self.out_first else delta.transpose(-2, -1)).to(param.device)

    def row_adapter(self, names: Sequence[str]) -> str | None:
        """The one adapter this layer applies to a batch whose rows name ``names`` (``adapter_per_row``), or None
        (every row its base): one weight serves the whole batch, so rows naming different adapters this layer holds
        are refused."""
        held = {name if name in self.adapters else BASE_ROW for name in names}
        if len(held) > 1:
            raise ValueError(
                f"adapter_names: this layer adapts the parameter {self.parameter_name!r}, whose one weight serves "
                f"the whole batch; its rows name different adapters {sorted(held)}. Run one batch per adapter"
            )
        if held and self.merged_adapters:
            raise ValueError("adapter_names: a batch with an adapter per row needs every adapter unmerged first")
        (name,) = held or {BASE_ROW}
        return None if name == BASE_ROW else name

    def fused_nest(self) -> list[MoRAParameter] | None:
        """This layer and the ``MoRAParameter`` layers below it when ``experts.experts_forward`` can run them all in
        one fused forward of the experts module they adapt; None otherwise (then each layer parametrizes)."""
        nest, module = [], self
        while isinstance(module, MoRAParameter):
            if module.experts is None or not module.fuse:
                return None
            nest.append(module)
            module = module.base_layer
        names = [layer.parameter_name for layer in nest]
        return nest if fused_experts.unsupported(module, names) is None else None

    def forward(self, *args, **kwargs):
        nest = self.fused_nest()
        if nest is not None:
            result = self._forward_fused(nest, args, kwargs)
        elif self.disable_adapters:
            return self.base_layer(*args, **kwargs)
        else:
            rows = selected_rows(self)
            if rows is None:
                names = [name for name in self.active_mora_adapters() if name not in self.merged_adapters]
            else:
                names = [name for name in [self.row_adapter(rows)] if name is not None]
            result = self._forward_adapted(names, args, kwargs) if names else self.base_layer(*args, **kwargs)
            nest = [self]
        for layer in nest:
            result = layer._guard_merged(result) if isinstance(result, torch.Tensor) else result
        return result

    def _forward_fused(self, nest: list[MoRAParameter], args, kwargs):
        """The experts module's forward with every layer of ``nest`` applied inside it (``experts.experts_forward``);
        the inner layers' forward never runs."""
        experts = self.get_base_layer()
        hidden, index, weights = fused_experts.routing_of(experts, args, kwargs)
        updates = {layer.parameter_name: layer._experts_terms(hidden.shape[0]) for layer in nest}
        updates = {name: terms for name, terms in updates.items() if terms}
        if not updates:
            return experts(*args, **kwargs)
        return fused_experts.experts_forward(experts, hidden, index, weights, updates, self.backend)

    def _experts_terms(self, tokens: int) -> list:
        """This layer's terms for ``experts_forward``: its active, unmerged adapters, or the calling context's
        adapter per row (``adapter_per_row``; every adapter unmerged)."""
        if self.disable_adapters:
            return []
        rows = selected_rows(self)
        if rows is not None and self.merged_adapters:
            raise ValueError("adapter_names: a batch with an adapter per row needs every adapter unmerged first")
        active = [name for name in self.active_mora_adapters() if name not in self.merged_adapters]
        return fused_experts.terms(self.adapters, self.scalings, active, rows, tokens, self.parameter().device)

    def _forward_adapted(self, names: Sequence[str], args, kwargs):
        """The wrapped module's forward with the adapters ``names`` applied: its parameter reads ``W + sum s dW``
        (each adapter's update materialized at the parameter's size). The one step a fused forward replaces."""
        delta = sum(self.delta_weight(name) for name in names)
        with parameter_update(self.get_base_layer(), self.parameter_name, delta):
            return self.base_layer(*args, **kwargs)

    def _add_to_weight(self, names: Sequence[str], sign: float, finite_only: bool = False) -> None:
        """``W += sign * scaling * dW`` for each adapter of ``names`` in turn, each computed in float32 (float64 for
        a float64 parameter) and rounded once; the sum is computed aside and written once."""
        if not names:
            return
        param = self.parameter()
        updated = param.data
        for name in names:
            what = f"adapter {name!r} on {self.parameter_name}"
            updated = with_delta(updated, sign * self.delta_weight(name, param.dtype), finite_only, what)
        param.data.copy_(updated)

    def extra_repr(self) -> str:
        experts = "" if self.experts is None else f", experts={self.experts}"
        return (f"parameter_name={self.parameter_name!r}, in_features={self.in_features}, "
                f"out_features={self.out_features}{experts}, adapters={self.mora_adapter_names()}, "
                f"active={self._active}, merged={self.merged}")


def _single_adapter_key(layer: MoRALinear, state_dict, prefix, local_metadata) -> None:
    """State-dict post-hook: a layer with one adapter keeps the single-adapter key ``M``."""
    if len(layer.adapters) == 1:
        (name,) = layer.adapters.keys()
        state_dict[prefix + "M"] = state_dict.pop(f"{prefix}adapters.{name}.weight")


# Names this module held before targeting moved to the model-level API: deprecated aliases that still work.
_MOVED = {"replace_linears": "adapters", "targets": "adapters", "matches": "adapters", "set_submodule": "adapters",
          "check_target_modules": "core"}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import adapters, core  # on use only: adapters imports this module

    warnings.warn(f"mora_kernels.layer.{name} is deprecated; use mora_kernels.{_MOVED[name]}.{name}",
                  DeprecationWarning, stacklevel=2)
    return getattr({"adapters": adapters, "core": core}[_MOVED[name]], name)
