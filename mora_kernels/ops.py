"""The functional MoRA op and the choice of backend.

Backends: ``"reference"`` (pure PyTorch, any device), ``"triton"`` (fused kernels, CUDA tensors), ``"cuda"``
(the csrc extension, CUDA tensors). The two fused ones run behind the same ops and autograd formula (``fused.py``);
each is a record of ``backends.py`` (its modules, dtypes, mixed path, status); this module names none of them.
Decided here, once, for every backend: validation, which backend runs (``resolve_backend``), whether in-place is
allowed (``mora``), and that inputs in a dtype the backend does not compute in (float64) run the reference.
Backend modules are imported only when asked for, so importing the package needs neither a GPU nor a compiler.
"""

from __future__ import annotations

import torch

from . import backends, fused, reference, tuning
from .core import (
    Geometry,
    check_inputs,
    check_matrix,
    check_mixed_inputs,
    check_mixed_scaling,
    check_rope,
    check_scaling,
)

BACKENDS = ("auto", "reference", *backends.FUSED)


def backend_status(name: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device`` (default: cuda if present, else cpu), and why not."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device or a device string such as 'cuda:0', got {device!r}") from None
    if name == "reference":
        return True, "pure PyTorch, runs on every device"
    if name not in backends.FUSED:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return backends.FUSED[name].status(device)


def resolve_backend(backend: str, device: torch.device, geo: Geometry | None = None, dtype: torch.dtype | None = None,
                    rows: int = 0) -> str:
    """The backend that runs for ``backend`` on ``device``; raises if an explicit backend cannot run there.

    ``auto`` on a CUDA device runs what ``tuned.json`` measured fastest (and correct) for this GPU, Triton version
    and shape class (``geo``'s type family, x's ``dtype``, ``rows`` of x); where nothing was measured, Triton.

    Decided once per (backend, device, type family, dtype, row class) and remembered (``_CHOSEN``): decode calls a
    layer per token, and the decision asks the device, the backend module and the table each time it is made. A
    device without an index (``"cuda"``: whichever GPU is current) is decided afresh. ``forget_choices`` drops
    what was decided (after the table or the environment changed)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and device.type != "cuda":
        return "reference"  # the Triton interpreter is for tests, not for users
    key = (backend, device, None if geo is None else geo.t.blockwise, dtype, rows < tuning.FEW_ROWS)
    name = _CHOSEN.get(key)
    if name is None:
        name = _resolve(backend, device, geo, dtype, rows)
        if device.index is not None or device.type != "cuda":
            _CHOSEN[key] = name
    return name


_CHOSEN: dict[tuple, str] = {}


def forget_choices() -> None:
    """Forget every backend and tile choice made so far (tests, and tools that change the table or the device)."""
    _CHOSEN.clear()
    tuning.forget_entries()


def _resolve(backend: str, device: torch.device, geo: Geometry | None, dtype: torch.dtype | None, rows: int) -> str:
    if backend == "auto":
        measured = None if geo is None else tuning.auto_backend(device, geo.t.blockwise, dtype, rows)
        for name in (measured, backends.DEFAULT.name):
            if name == "reference" or (name is not None and backend_status(name, device)[0]):
                return name
        return "reference"
    usable, reason = backend_status(backend, device)
    if not usable:
        raise RuntimeError(f"backend={backend!r} cannot run on {device}: {reason}")
    return backend


def needs_autograd(*tensors) -> bool:
    """Whether autograd would record an op on these tensors (then no input may be written in place)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def apply(x, M, geo: Geometry, rope=None, scaling: float = 1.0, base=None, backend: str = "auto",
          inplace: bool = False):
    """``mora`` after validation; for callers (the layer) that validated once already."""
    name = resolve_backend(backend, x.device, geo, x.dtype, x.numel() // max(geo.n, 1))
    if name == "reference" or not backends.FUSED[name].computes(x, M, base):
        return reference.forward(x, M, geo, rope, scaling, base, inplace)
    return fused.apply(x, M, geo, rope, scaling, base, inplace, name)


def mora(
    x: torch.Tensor,
    M: torch.Tensor,
    out_features: int,
    mora_type: int | str,
    *,
    scaling: float = 1.0,
    base: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
    inplace: bool = False,
) -> torch.Tensor:
    """MoRA update ``base + scaling * D(M C(x))``.

    Args:
        x: ``(..., in_features)``, float64/float32/float16/bfloat16, any leading dims.
        M: ``(R, R)`` square matrix; R even for types 6 and 7.
        out_features: ``m``, the length of the output's last dim.
        mora_type: 1, 2, 3, 4, 6 (original release) or 7 / ``"decoupled"`` (type 6 without rotation).
        scaling: factor on the update (the original release uses 1.0).
        base: optional ``(..., out_features)`` tensor the update is added to (the base layer's output).
        rope: optional float32 ``(cos, sin)`` tables of shape ``(>= used blocks, R)`` for type 6; computed
            by ``core.rope_tables`` when omitted (docs/design.md#type-6-rotation).
        backend: ``"auto"`` (on CUDA tensors the fused backend measured fastest for this GPU and shape in
            ``tuned.json``, Triton where nothing was measured; the reference elsewhere), ``"reference"``,
            ``"triton"`` or ``"cuda"``. float64 inputs run the reference whatever the backend.
        inplace: add the update into ``base`` itself and return it (serving: no new output buffer). Only where
            autograd records nothing (``torch.no_grad()`` or no input requiring grad). Without it, ``base`` is
            read and a new tensor written, the same bytes moved, and gradients flow to ``base``.

    Returns:
        ``(..., out_features)`` in x's dtype, or base's dtype when base is given. Computed in at least float32.
    """
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    geo = check_inputs(x, M, out_features, mora_type, base=base, rope=rope, inplace=inplace)
    scaling = check_scaling(scaling)
    _check_inplace(inplace, x, M, base)
    return apply(x, M, geo, rope, scaling, base, backend, bool(inplace))


def _check_inplace(inplace, x, M, base) -> None:
    if inplace:
        if base is None:
            raise ValueError("inplace=True adds the update into base: pass base=")
        if needs_autograd(x, M, base):
            raise ValueError(
                "inplace=True writes into base, which autograd cannot differentiate: call it under torch.no_grad() "
                "or with inputs that do not require grad, or drop inplace (base= alone fuses the add out of place)"
            )


def apply_mixed(x, M, adapter_index, geo: Geometry, rope=None, scaling=1.0, base=None, backend: str = "auto",
                inplace: bool = False, check_index: bool = True):
    """``mora_mixed`` after validation (``check_index=False``: the caller built the index, its values are valid)."""
    record = backends.FUSED.get(backend)
    if record is not None and record.mixed is None:
        raise ValueError(backends.mixed_unsupported(record))
    name = resolve_backend(backend, x.device)
    record = backends.FUSED.get(name)
    if record is not None and record.mixed is not None and record.computes(x, M, base):
        return fused.apply_mixed(x, M, adapter_index, geo, rope, scaling, base, inplace, name, check_index)
    return reference.forward_mixed(x, M, adapter_index, geo, rope, scaling, base, inplace, check_index)


def mora_mixed(
    x: torch.Tensor,
    M: torch.Tensor,
    adapter_index: torch.Tensor,
    out_features: int,
    mora_type: int | str,
    *,
    scaling: float | torch.Tensor = 1.0,
    base: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
    inplace: bool = False,
) -> torch.Tensor:
    """Many MoRA adapters of one geometry over one batch: token t gets ``base[t] + scaling[a] D(M[a] C(x[t]))``
    with ``a = adapter_index[t]``, or ``base[t]`` (zeros without base) where ``a = -1``.

    Args:
        x: ``(..., in_features)`` as in ``mora``.
        M: the K adapters stacked, ``(K, R, R)``, one dtype.
        adapter_index: integer tensor of shape ``x.shape[:-1]``, values in [-1, K) (checked: a ValueError, not a
            wild read; the check reads the values on the host, one sync on a GPU).
        out_features, mora_type, base, rope, inplace: as in ``mora`` (one type and R for all K adapters).
        scaling: a float, or a ``(K,)`` tensor of factors, one per adapter (not differentiated).
        backend: ``"auto"``, ``"triton"`` (one fused pass for the whole batch, a fixed number of launches whatever
            K is) or ``"reference"`` (a loop over the adapters present). ``"cuda"`` raises: no mixed kernel there.

    Returns:
        ``(..., out_features)`` as ``mora``. Differentiable in x, M (every adapter's gradient from one backward)
        and base.
    """
    geo = check_mixed_inputs(x, M, adapter_index, out_features, mora_type, base=base, rope=rope, inplace=inplace)
    scaling = check_mixed_scaling(scaling, M.shape[0], x.device)
    _check_inplace(inplace, x, M, base)
    return apply_mixed(x, M, adapter_index, geo, rope, scaling, base, backend, bool(inplace))


def delta_weight(
    M: torch.Tensor,
    in_features: int,
    out_features: int,
    mora_type: int | str,
    *,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``dW`` of shape ``(out_features, in_features)`` with ``mora(x, M, ...) == x @ dW.T``.

    Closed form, vectorized (no loop over columns or blocks), in float32 (float64 when M is float64), on M's device.
    """
    geo = check_matrix(M, in_features, out_features, mora_type)
    check_rope(rope, geo, M.device)
    return reference.delta_weight(M, geo, rope)
