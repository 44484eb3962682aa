"""A MoRA adapter as a standard PEFT LoRA folder, for tools that load only LoRA (serving engines, plain PEFT).

Types 1-4 export exactly: their update is ``dW = D M C`` (docs/design.md#merge) with fixed integer maps ``C``
(``R x n``, the compress map's counts) and ``D`` (``m x R``, 0/1 copies), so ``lora_A = C`` and
``lora_B = s D M`` (``s`` the adapter's scaling) give ``lora_B @ lora_A = s dW`` at rank ``R``, exact up to the
storage rounding of ``s M`` (none when ``s = 1``). The maps come from the reference backend itself: ``C`` is the
compress adjoint applied to the identity, ``D`` the decompress map applied to it.

Types 6/7 (high rank) have no such factorization of small rank; they are exported as a rank-k LoRA from the SVD of
each layer's ``s dW`` (float64): ``lora_B = U_k sqrt(S_k)``, ``lora_A = sqrt(S_k) V_k^T``, with ``k`` given
(``rank``) or the smallest whose relative Frobenius error ``||s dW - lora_B lora_A||_F / ||s dW||_F`` is at most
``max_error``. Never silently: one of the two is required, and every layer's measured error (of the factors as
stored) is written to ``export_report.json`` and returned. Types 1-4 take the same SVD route when a smaller rank is
asked (``rank < R``, or ``max_error`` met below ``R``), and stay exact otherwise.

Layers of one adapter may need different ranks (``R`` depends on the layer's shape); every layer is written at the
largest one, the others padded with zero rows of ``lora_A`` and columns of ``lora_B`` (exact), so that ``r`` and
``lora_alpha = r`` (PEFT's scaling ``lora_alpha / r = 1``) hold for every layer in every engine, including those
that read neither ``rank_pattern`` nor ``alpha_pattern``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
from torch import nn

from . import reference
from .adapters import _name_or_path, _target_modules, _uncompiled
from .bases import check_base_layer
from .checkpoint import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, check_path
from .core import check_int
from .files import write_files
from .layer import AdapterMixin, MoRAParameter
from .rollback import check_model

REPORT_NAME = "export_report.json"
VLLM_MAX_LORA_RANK = 512  # vLLM's largest supported max_lora_rank


def export_lora(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    rank: int | None = None,
    max_error: float | None = None,
) -> dict:
    """Write adapter ``adapter_name`` of ``model`` to folder ``path`` as a standard PEFT LoRA adapter; return the
    report.

    ``model``: adapted by this package (``apply_mora`` / ``load_adapter``) or a ``PeftModel`` made with
    ``peft_integration.MoRAConfig``. The folder holds ``adapter_config.json`` (written from PEFT's ``LoraConfig``:
    ``r`` = the rank, ``lora_alpha = r``, ``fan_in_fan_out`` for Conv1D targets), ``adapter_model.safetensors``
    (``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, as PEFT writes them) and ``export_report.json``
    (the rank, and per layer its method and relative Frobenius error). Types 1-4 are exact at rank ``R`` unless a
    smaller ``rank`` or a ``max_error`` asks for compression; types 6/7 need ``rank`` or ``max_error`` (see the
    module docstring). A rank above vLLM's largest LoRA rank (512) is warned about and flagged in the report.
    """
    check_path(path)
    rank, max_error = _check_choice(rank, max_error)
    inner, peft_config = _user_model(model, adapter_name)
    layers = [(name, module) for name, module in inner.named_modules()
              if isinstance(module, AdapterMixin) and adapter_name in module.mora_adapter_names()]
    if not layers:
        raise ValueError(f"adapter_name: no MoRA layer of the model has an adapter named {adapter_name!r}")
    parameters = [name for name, module in layers if isinstance(module, MoRAParameter)]
    if parameters:  # as for the PEFT path's target_parameters (_user_model)
        raise ValueError(f"adapter {adapter_name!r} adapts target_parameters on {parameters} (one M per expert), "
                         "which a Linear layer's LoRA factors cannot hold; not exported")
    factors, rows = {}, []
    for name, layer in layers:
        A, B, row = _export_layer(name, layer, adapter_name, rank, max_error)
        factors[name] = (A, B)
        rows.append(row)
    r = max(A.shape[0] for A, _ in factors.values())
    dropouts = {getattr(layer.mora_dropout(adapter_name), "p", 0.0) for _, layer in layers}
    config = _lora_config(
        r=r,
        target_modules=_target_modules(inner, [name for name, _ in layers]),
        lora_dropout=max(dropouts),  # one value per adapter in both formats; dropout only acts in training
        fan_in_fan_out=all(check_base_layer(layer.base_layer).transposed for _, layer in layers),
        base_model_name_or_path=_name_or_path(inner),
        task_type=getattr(peft_config, "task_type", None),
    )
    report = {
        "rank": r,
        "exact": all(row["method"] == "exact" for row in rows),
        "requested": {"rank": rank, "max_error": max_error},
        "max_relative_error": max(row["relative_error"] for row in rows),
        "vllm_max_lora_rank": VLLM_MAX_LORA_RANK,
        "exceeds_vllm_max_lora_rank": r > VLLM_MAX_LORA_RANK,
        "layers": rows,
    }
    if r > VLLM_MAX_LORA_RANK:
        warnings.warn(
            f"export_lora: the exported LoRA has rank {r}, above vLLM's largest LoRA rank {VLLM_MAX_LORA_RANK}; "
            "serve it elsewhere, or export with rank=/max_error= to compress it (SVD, error reported per layer)"
        )
    _write(path, config, factors, report)
    return report


def _check_choice(rank, max_error):
    if rank is not None and max_error is not None:
        raise ValueError(f"give rank or max_error, not both (got rank={rank!r}, max_error={max_error!r})")
    if rank is not None:
        rank = check_int(rank, "rank")
    if max_error is not None:
        if isinstance(max_error, bool) or not isinstance(max_error, (int, float)):
            raise TypeError(f"max_error must be a real number in [0, 1), got {max_error!r}")
        if not 0 <= max_error < 1:
            raise ValueError(f"max_error must be in [0, 1) (a relative Frobenius error), got {max_error!r}")
        max_error = float(max_error)
    return rank, max_error


def _user_model(model, adapter_name: str):
    """The model whose module names the LoRA keys use, and the PEFT config of the adapter (None off PEFT)."""
    model = _uncompiled(check_model(model))
    peft = sys.modules.get("peft")  # a PeftModel exists only if peft was imported
    if peft is None or not isinstance(model, peft.PeftModel):
        return model, None
    config = model.peft_config.get(adapter_name)
    if config is None:
        raise ValueError(
            f"adapter_name: the PeftModel has no adapter {adapter_name!r}; it has {list(model.peft_config)}"
        )
    if not getattr(config, "use_mora", False):
        raise ValueError(
            f"adapter_name: adapter {adapter_name!r} is a LoRA adapter already; save it with save_pretrained"
        )
    extras = [f"{field}={getattr(config, field)!r}" for field in ("modules_to_save", "bias")
              if getattr(config, field) not in (None, "none")]
    if extras:
        raise ValueError(f"adapter {adapter_name!r} also trains {', '.join(extras)}, which this export does not carry")
    if getattr(config, "target_parameters", None):  # one M per expert: not a Linear layer's LoRA factors
        raise ValueError(f"adapter {adapter_name!r} adapts target_parameters={config.target_parameters!r} (one M per "
                         "expert, docs/peft.md#target-parameters), which this export does not carry")
    return model.base_model.model, config


def _export_layer(name, layer, adapter_name, rank, max_error):
    """``(lora_A, lora_B, report row)`` of one layer."""
    matrix = layer.mora_adapter(adapter_name)
    where = f"layer {name!r}, adapter {adapter_name!r}"
    if matrix.restarts:
        raise ValueError(
            f"{where}: went through {matrix.restarts} ReMoRA restart(s) whose updates live in the base weights; M "
            "alone is not the update. Merge the model (mora_kernels.merge) and save its weights instead"
        )
    if layer.mora_magnitude(adapter_name) is not None:
        raise ValueError(
            f"{where}: a DoRA adapter rescales each row of W + s dW by its magnitude vector, which no plain LoRA "
            "carries; merge the model (mora_kernels.merge) and serve its weights instead"
        )
    if matrix.weight.device.type == "meta" or not torch.isfinite(matrix.weight).all():
        raise ValueError(f"{where}: M holds no values (meta device) or NaN/inf; nothing to export")
    geo, scaling = matrix.geo, layer.mora_scaling(adapter_name)
    dtype = torch.float64 if matrix.weight.dtype == torch.float64 else torch.float32
    M = matrix.weight.detach().double()
    delta = reference.delta_weight(M, geo, matrix.rope) * scaling  # float64, (m, n)
    exact = not geo.t.blockwise and (rank is None or rank >= geo.R) and max_error is None
    if not geo.t.blockwise and max_error is not None:
        exact = _svd_rank(torch.linalg.svdvals(delta), None, max_error) >= geo.R
    if exact:
        eye = torch.eye(geo.R, dtype=torch.float64, device=M.device)
        A = reference.compress_adjoint(eye, geo)  # row j: C^T e_j, i.e. row j of C (R x n)
        B = reference.decompress(eye, geo).T @ M * scaling  # D (m x R) times s M
        method = "exact"
    elif geo.t.blockwise and rank is None and max_error is None:
        raise ValueError(
            f"{where}: mora_type {int(geo.t)} is high rank (its dW has rank up to min(n, m) = {min(geo.n, geo.m)}); "
            "a LoRA of it is an approximation: choose rank= (--rank) or max_error= (--max-error), and its error "
            "per layer is reported"
        )
    else:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = max(_svd_rank(S, rank, max_error), 1)  # a zero update still needs one (zero) rank
        root = S[:k].sqrt()
        A, B = root[:, None] * Vh[:k], U[:, :k] * root
        method = "svd"
    A, B = A.to(dtype), B.to(dtype)
    error = _relative_error(delta, A, B)
    if max_error is not None and error > max_error:
        raise ValueError(
            f"{where}: max_error={max_error} is below what {dtype} factors can hold (measured {error:.3e} after "
            "rounding); ask for a larger max_error"
        )
    row = {"module": name, "mora_type": int(geo.t), "in_features": geo.n, "out_features": geo.m, "R": geo.R,
           "rank": A.shape[0], "method": method, "relative_error": error}
    return A.cpu(), B.cpu(), row


def _svd_rank(S: torch.Tensor, rank, max_error) -> int:
    """Singular values kept: ``rank`` (at most all), or the fewest whose dropped tail is within ``max_error``."""
    if rank is not None:
        return min(rank, S.numel())
    tail = S.flip(0).square().cumsum(0).flip(0).sqrt()  # tail[k] = ||S[k:]||, the error of keeping k values
    total = tail[0].item() if S.numel() else 0.0
    within = (tail <= max_error * total).nonzero()
    return int(within[0].item()) if within.numel() else S.numel()


def _relative_error(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """``||delta - B A||_F / ||delta||_F`` in float64 for the factors as stored (0 for an exact zero update)."""
    norm = torch.linalg.matrix_norm(delta).item()
    diff = torch.linalg.matrix_norm(delta - B.double() @ A.double()).item()
    return diff / norm if norm else diff


def _lora_config(**fields) -> dict:
    """The adapter_config.json content, from PEFT's own ``LoraConfig``, as its ``save_pretrained`` writes it."""
    from peft import LoraConfig

    config = LoraConfig(lora_alpha=fields["r"], use_rslora=False, bias="none", init_lora_weights=True,
                        inference_mode=True, **fields).to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def _write(path, config: dict, factors: dict, report: dict) -> None:
    """The three files, serialized first, then written whole or not at all (``files.write_files``)."""
    from safetensors.torch import save

    r = report["rank"]
    state = {}
    for name, (A, B) in factors.items():
        pad = r - A.shape[0]  # zero rows of A and columns of B add nothing to B A
        state[f"{KEY_PREFIX}{name}.lora_A.weight"] = torch.cat((A, A.new_zeros(pad, A.shape[1]))).contiguous()
        state[f"{KEY_PREFIX}{name}.lora_B.weight"] = torch.cat((B, B.new_zeros(B.shape[0], pad)), 1).contiguous()
    files = {
        CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True),
        REPORT_NAME: json.dumps(report, indent=2, allow_nan=False) + "\n",
    }
    os.makedirs(path, exist_ok=True)
    write_files({os.path.join(path, WEIGHTS_NAME): save(state, metadata={"format": "pt"}),
                 **{os.path.join(path, name): text.encode("utf-8") for name, text in files.items()}})


def format_report(report: dict) -> str:
    """The report as lines of text (the command line prints it)."""
    lines = [f"{row['module']}: type {row['mora_type']}, R={row['R']}, {row['method']} at rank {row['rank']}, "
             f"relative Frobenius error {row['relative_error']:.3e}" for row in report["layers"]]
    kind = "exact" if report["exact"] else "approximate (SVD)"
    lines.append(f"LoRA rank {report['rank']} ({kind}), largest relative error {report['max_relative_error']:.3e}")
    if report["exceeds_vllm_max_lora_rank"]:
        lines.append(f"warning: rank {report['rank']} exceeds vLLM's largest LoRA rank {VLLM_MAX_LORA_RANK}")
    return "\n".join(lines)
