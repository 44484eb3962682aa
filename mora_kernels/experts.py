"""MoRA on a mixture-of-experts layer fused into its experts' forward (docs/peft.md#fused-experts).

Transformers 5 stores a MoE layer's experts as one 3-D parameter per projection and gives the experts module the
routing: ``forward(hidden_states, top_k_index, top_k_weights)``. With one M per expert (``MoRAMatrix(experts=E)``),
the rows routed to expert e are a mixed batch with ``adapter_index = e``: ``experts_forward`` computes, per routed
(token, expert) pair,

    gate_up = x W_gu[e]^T (+ b_gu[e]) + sum_i s_i D(M_gu,i[e] C(x)),   h = act(gate_up),
    out     = h W_d[e]^T  (+ b_d[e])  + sum_i s_i D(M_d,i[e] C(h)),     y[token] += weight[token, e] out

with one ``mora_mixed`` call per parameter and adapter (a fixed number of launches whatever E, forward and backward,
the backward giving every expert's dM), and never builds ``s dW`` (``E out in`` elements per parameter) as the weight
parametrization does.

The base part is transformers' own grouped path for these modules (``transformers.integrations.moe``: the routed
pairs sorted by expert, ``_grouped_linear`` on the module's own weights and layout, the module's ``_apply_gate`` or
``act_fn``, the router weights, the per-token sum), what the module runs with ``experts_implementation=
"grouped_mm"``; float64 goes through transformers' per-expert loop (``grouped_mm`` computes in 16/32-bit floats).
Supported: the classes of ``SUPPORTED``, checked to run on that path (tests/test_experts.py); ``unsupported`` says
why another module (or a state of one: expert parallelism, forward hooks, a replaced forward) is not, and callers
fall back to the parametrization there. transformers is imported on use only, when such a module is passed.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import ops

if TYPE_CHECKING:  # layer imports this module (MoRAParameter runs fused through it)
    from .layer import MoRAMatrix

# The experts classes of transformers 5 whose forward is the grouped path above (checked against their eager forward
# in the tests). Others decorated the same way may differ in what the decorator does not describe.
SUPPORTED = ("Qwen3MoeExperts", "MixtralExperts", "GptOssExperts")
_COMPUTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def projections(experts: nn.Module) -> tuple[str, str]:
    """The names of the module's two expert parameters: (the first projection, ``down_proj``)."""
    return ("gate_up_proj" if experts.has_gate else "up_proj"), "down_proj"


def unsupported(experts: nn.Module, parameters: Sequence[str] = ()) -> str | None:
    """Why ``experts_forward`` cannot run ``experts`` with updates on ``parameters`` (None: it can)."""
    cls = type(experts)
    if nn.utils.parametrize.is_parametrized(experts):  # torch made it a subclass (another wrapper's weight)
        cls = cls.__bases__[0]
    name = cls.__name__
    if name not in SUPPORTED or cls.__module__.split(".")[0] != "transformers":
        return f"{name} is not one of transformers' experts modules {SUPPORTED}"
    # (attributes that older transformers 5 releases lack, with neither feature)
    if getattr(experts, "has_post_expert_norm", False) or getattr(experts, "_is_expert_parallel", False):
        return f"{name} runs with a post-expert norm or expert parallelism"
    if experts._forward_hooks or experts._forward_pre_hooks or "forward" in vars(experts):
        return f"{name} has forward hooks or a replaced forward (offloading, ...), which the fused path would skip"
    others = sorted(set(parameters) - set(projections(experts)))
    if others:
        return f"parameters {others} are not the expert projections {projections(experts)}"
    dtypes = {getattr(experts, p).dtype for p in projections(experts)}
    if not dtypes <= set(_COMPUTED):
        return f"the expert weights are {sorted(map(str, dtypes))}, not float64/float32/float16/bfloat16"
    return None


def routing_of(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden_states, top_k_index, top_k_weights)`` from the arguments of a call to ``experts`` (each module names
    them its way: gpt-oss says ``router_indices``, ``routing_weights``)."""
    bound = inspect.signature(experts.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    values = tuple(bound.arguments.values())
    if len(values) != 3 or any(not isinstance(v, torch.Tensor) for v in values):
        raise TypeError(f"{type(experts).__name__}: expected hidden_states and the routing (indices, weights), got "
                        f"{[type(v).__name__ for v in values]}")
    return values


@dataclasses.dataclass(frozen=True)
class Update:
    """One MoRA term on one expert parameter: ``matrices`` (each ``MoRAMatrix(experts=E)``, one geometry and
    dtype) with their ``scalings``. ``rows=None``: ``matrices[0]`` acts on every token (one matrix). Else
    ``rows[t]`` (an integer tensor, one entry per token of ``hidden_states``) picks the matrix token t uses (-1:
    none), a mixed-adapter batch: matrix a of expert e is row ``a E + e`` of one stack, one launch for all."""

    matrices: tuple[MoRAMatrix, ...]
    scalings: tuple[float, ...]
    rows: torch.Tensor | None = None


def terms(matrices: Mapping[str, MoRAMatrix], scalings: Mapping[str, float], active: Sequence[str],
          row_names: Sequence[str] | None, tokens: int, device) -> list[Update]:
    """One parameter's ``Update`` records: each adapter of ``active`` on every token; or, with ``row_names`` (one
    adapter name per sequence of the batch, whose tokens the MoE block flattened in order), one record per group of
    the held adapters sharing geometry and dtype, each token using its sequence's adapter (names not in
    ``matrices``, and the base rows, get no term). ``matrices`` / ``scalings``: the layer's adapters by name."""
    if row_names is None:
        return [Update((matrices[name],), (scalings[name],)) for name in active]
    if not row_names or tokens % len(row_names):
        raise ValueError(f"adapter_names: {len(row_names)} names (one per sequence) do not divide the {tokens} "
                         "tokens the experts received")
    groups: dict[tuple, list[str]] = {}
    for name in dict.fromkeys(row_names):
        if name in matrices:
            groups.setdefault((matrices[name].geo, matrices[name].weight.dtype), []).append(name)
    updates = []
    for names in groups.values():
        slot = {name: a for a, name in enumerate(names)}
        rows = torch.tensor([slot.get(name, -1) for name in row_names], device=device)
        updates.append(Update(tuple(matrices[n] for n in names), tuple(scalings[n] for n in names),
                              rows.repeat_interleave(tokens // len(row_names))))
    return updates


def experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, updates: Mapping[str, Sequence[Update]],
                    backend: str = "auto") -> torch.Tensor:
    """The experts' output ``(tokens, hidden)`` with MoRA's terms added inside each expert, before the activation.

    Args:
        experts: a supported experts module (``unsupported(experts, updates)`` is None); its weights are read, never
            changed.
        hidden_states, top_k_index, top_k_weights: what the MoE block passes the module: ``(T, hidden)``, the
            ``(T, k)`` expert ids (in [0, E)) and router weights.
        updates: ``{parameter name: [Update, ...]}``, the terms summed on each projection (none: the base alone).
        backend: ``mora_mixed``'s backend (``"auto"``: the fused kernels on CUDA).
    """
    reason = unsupported(experts, list(updates))
    if reason is not None:
        raise ValueError(f"experts: {reason}")
    from transformers.integrations import moe

    E, k = experts.num_experts, top_k_index.shape[-1]
    pairs = (hidden_states.shape[0], k)
    if hidden_states.dim() != 2 or top_k_index.shape != pairs or top_k_weights.shape != pairs:
        raise ValueError(f"hidden_states (T, hidden), top_k_index and top_k_weights (T, k) expected, got "
                         f"{tuple(hidden_states.shape)}, {tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}")
    for name, terms in updates.items():
        _check_updates(experts, name, terms, hidden_states.shape[0])
    # transformers' grouped path: the (token, expert) pairs sorted by expert, so each expert's rows are contiguous
    ids, perm = torch.sort(top_k_index.reshape(-1))
    tokens = perm // k
    # counts by histc, as transformers: bincount has no deterministic CUDA kernel; histc takes floats on a CPU only
    counts = torch.histc(ids.float() if ids.device.type in ("cpu", "mps") else ids.int(), bins=E, min=0, max=E - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    first, down = projections(experts)
    h = _projection(moe, experts, first, hidden_states[tokens], ids, tokens, offsets, updates.get(first, ()), backend)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = _projection(moe, experts, down, h, ids, tokens, offsets, updates.get(down, ()), backend)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    # back to token order and summed over the k experts of each token (transformers' deterministic reduction)
    final = torch.empty_like(out).index_copy(0, perm, out).view(-1, k, out.shape[-1]).sum(dim=1)
    return final.to(hidden_states.dtype)


def _projection(moe, experts, name, x, ids, tokens, offsets, terms, backend):
    weight = getattr(experts, name)  # read through any parametrization another wrapper registered
    bias = getattr(experts, f"{name}_bias")[ids] if experts.has_bias else None
    if weight.dtype == torch.float64:  # grouped_mm computes in 16/32-bit floats: transformers' per-expert loop
        w = weight if experts.is_transposed else weight.transpose(-2, -1)
        out = torch.ops.transformers.grouped_mm_fallback(x, w, offsets)
        out = out if bias is None else out + bias
    else:
        out = moe._grouped_linear(x, weight, offsets, bias=bias, is_transposed=experts.is_transposed)
    E = experts.num_experts
    for term in terms:
        first = term.matrices[0]
        if term.rows is None:
            M, index, scaling = first.weight, ids, term.scalings[0]
        else:
            M = torch.cat([m.weight for m in term.matrices])  # (A E, R, R): adapter a, expert e at row a E + e
            slot = term.rows.to(ids.device)[tokens]
            index = torch.where(slot >= 0, slot * E + ids, -1)
            scaling = torch.tensor(term.scalings, dtype=torch.float64, device=x.device).repeat_interleave(E)
        # the index is built here from the router's ids, which the module's own forward takes as valid too
        out = ops.apply_mixed(x, M, index, first.geo, first.rope, scaling, out, backend, check_index=False)
    return out


def _check_updates(experts, name: str, terms: Sequence[Update], tokens: int) -> None:
    weight = getattr(experts, name)
    E = experts.num_experts
    n, m = (weight.shape[1], weight.shape[2]) if experts.is_transposed else (weight.shape[2], weight.shape[1])
    for term in terms:
        if not isinstance(term, Update) or not term.matrices or len(term.matrices) != len(term.scalings):
            raise TypeError(f"updates[{name!r}]: expected Update records with one scaling per matrix, got {term!r}")
        for matrix in term.matrices:
            if matrix.experts != E or (matrix.geo.n, matrix.geo.m) != (n, m) or matrix.geo != term.matrices[0].geo:
                raise ValueError(
                    f"updates[{name!r}]: expected MoRAMatrix stacks of {E} experts, {n} -> {m} features, one geometry; "
                    f"got experts={matrix.experts}, {matrix.geo.n} -> {matrix.geo.m}"
                )
        if term.rows is None and len(term.matrices) != 1:
            raise ValueError(f"updates[{name!r}]: several matrices need rows (which one each token uses)")
        if term.rows is not None and tuple(term.rows.shape) != (tokens,):
            raise ValueError(f"updates[{name!r}]: rows must have one entry per token ({tokens}), got "
                             f"{tuple(term.rows.shape)}")
