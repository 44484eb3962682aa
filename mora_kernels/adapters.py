"""MoRA on any PyTorch model without PEFT, and the checkpoint format of the original release.

``apply_mora`` swaps the targeted ``nn.Linear`` layers for ``MoRALinear`` (or adds an adapter to layers already
swapped), ``save_adapter`` / ``load_adapter`` write and read the original release's format, ``merge`` folds the
active adapters into the base weights and puts the plain Linears back.

Checkpoint format (the original release, a fork of PEFT 0.9): a folder with ``adapter_config.json``
(``"peft_type": "LORA"``, ``"r"``: the LoRA rank, ``"use_mora": true``, ``"mora_type"``, ``"target_modules"``, ...)
and ``adapter_model.safetensors`` holding, for each adapted Linear named ``<name>`` in the model,
``base_model.model.<name>.lora_A.weight`` and ``.lora_B.weight``: the same ``(R, R)`` matrix M twice. The original
ignores ``lora_alpha`` (scaling 1); a scaling other than 1 is written as ``"mora_scaling"``, and a checkpoint saved
after ReMoRA restarts records ``"remora_restarts"``: fields only this package reads. ``target_modules`` lists name
suffixes (``["q_proj"]``) when they select exactly the adapted layers, else full module names. Weights are read
with safetensors (or ``torch.load(weights_only=True)`` for a ``.bin``): nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from .core import check_dropout, check_scaling, mora_type_of
from .layer import BASE_ROW, MoRALinear, check_base_layer, check_loaded_matrix, matches, set_submodule, targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."  # PEFT's prefix: PeftModel.base_model (LoraModel).model (the user's model)


# --- the checkpoint format (also used by mora_kernels.peft_integration)
def read_config(path: str | os.PathLike, allow_restarted: bool = False) -> dict:
    """``adapter_config.json`` of a MoRA checkpoint, checked: peft_type LORA, use_mora true, valid r and mora_type.

    A checkpoint saved after ReMoRA restarts (``remora_restarts`` > 0) is refused unless ``allow_restarted``: its
    M applies on top of base weights that hold the earlier cycles, which the checkpoint does not contain.
    """
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {os.fspath(path)!r}")
    with open(file) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA" or config.get("use_mora") is not True:
        raise ValueError(
            f"{file}: not a MoRA adapter (expected peft_type 'LORA' and use_mora true, got peft_type "
            f"{config.get('peft_type')!r}, use_mora {config.get('use_mora')!r})"
        )
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{file}: r must be a positive int (the LoRA rank), got {r!r}")
    mora_type_of(config.get("mora_type", 1), f"{file}: mora_type")
    check_scaling(config.get("mora_scaling", 1.0), f"{file}: mora_scaling")
    check_dropout(config.get("lora_dropout", 0.0), f"{file}: lora_dropout")
    restarts = config.get("remora_restarts", 0)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise ValueError(f"{file}: remora_restarts must be an int >= 0, got {restarts!r}")
    if restarts and not allow_restarted:
        raise ValueError(
            f"{file}: saved after {restarts} ReMoRA restart(s): its M applies on top of base weights that hold the "
            "earlier cycles' updates, which this checkpoint does not contain. Load it onto those base weights and "
            "pass allow_restarted=True"
        )
    return config


def read_matrices(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{module name in the model: M}`` from the checkpoint's weights; lora_A and lora_B must be equal."""
    file = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(file):
        from safetensors.torch import load_file

        state = load_file(file)
    elif os.path.isfile(os.path.join(path, LEGACY_WEIGHTS_NAME)):
        state = torch.load(os.path.join(path, LEGACY_WEIGHTS_NAME), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"path: no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {os.fspath(path)!r}")
    matrices, seconds = {}, {}
    for key, tensor in state.items():
        for part, into in ((".lora_A.weight", matrices), (".lora_B.weight", seconds)):
            if key.startswith(KEY_PREFIX) and key.endswith(part):
                into[key[len(KEY_PREFIX) : -len(part)]] = tensor
                break
        else:
            raise ValueError(f"{file}: unexpected key {key!r} (expected {KEY_PREFIX}<module>.lora_A/lora_B.weight)")
    for name, M in matrices.items():
        if M.dim() != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"{file}: {name}.lora_A.weight must be a square (R, R) matrix, got {tuple(M.shape)}")
        if name in seconds and not torch.equal(seconds[name], M):
            raise ValueError(f"{file}: {name}: lora_A and lora_B differ; a MoRA checkpoint holds M twice")
    if set(seconds) - set(matrices):
        raise ValueError(f"{file}: lora_B without lora_A for {sorted(set(seconds) - set(matrices))}")
    if not matrices:
        raise ValueError(f"{file}: holds no MoRA matrix")
    return matrices


def write_checkpoint(path: str | os.PathLike, config: dict, matrices: dict[str, torch.Tensor]) -> None:
    """Write ``config`` and ``{module name: M}`` in the original release's format (safetensors)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {}
    for name, M in matrices.items():
        M = M.detach().to("cpu").contiguous()
        state[f"{KEY_PREFIX}{name}.lora_A.weight"] = M
        state[f"{KEY_PREFIX}{name}.lora_B.weight"] = M.clone()  # safetensors refuses shared storage
    save_file(state, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


# --- the model-level API
def mora_layers(model: nn.Module) -> Iterator[tuple[str, MoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, MoRALinear):
            yield name, module


def apply_mora(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int,
    mora_type: int | str = 1,
    *,
    adapter_name: str = "default",
    dropout: float = 0.0,
    scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> nn.Module:
    """Adapt ``model`` in place and return it; only the MoRA matrices of active adapters stay trainable.

    ``target_modules``: a list of module names or name suffixes (``["q_proj", "v_proj"]``), or one regex matched
    against full names, as in PEFT. A Linear is replaced by a ``MoRALinear`` whose adapter ``adapter_name`` is
    active; on a layer that is already a ``MoRALinear`` the adapter is added inactive (``set_adapter`` to use it).
    """
    check_scaling(scaling)  # checked before any layer changes (each layer checks them again)
    check_dropout(dropout)
    found = targets(model, target_modules)
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear of the model")
    options = dict(dropout=dropout, scaling=scaling, dtype=dtype)
    for name, module in found:
        if isinstance(module, MoRALinear):
            module.add_adapter(adapter_name, r, mora_type, **options)
        else:
            layer = MoRALinear(module, r, mora_type, backend=backend, adapter_name=adapter_name, **options)
            set_submodule(model, name, layer)
    return _train_only_active_matrices(model)


def _train_only_active_matrices(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    for _, layer in mora_layers(model):
        layer.set_adapter(layer.active_adapters)  # sets requires_grad on the active adapters' M
    return model


def _layers_with(model: nn.Module, adapter_name: str) -> list[tuple[str, MoRALinear]]:
    layers = [(name, layer) for name, layer in mora_layers(model) if adapter_name in layer.adapters]
    if not layers:
        raise ValueError(f"adapter_name: no MoRA layer of the model has an adapter named {adapter_name!r}")
    return layers


def save_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", *, allow_restarted: bool = False
) -> None:
    """Write adapter ``adapter_name`` of ``model`` to folder ``path`` in the original release's format.

    After ReMoRA restarts the earlier cycles live in the base weights, and M alone no longer reproduces the model:
    this is refused unless ``allow_restarted`` (save the base weights too; the checkpoint records
    ``remora_restarts`` and loads only with ``allow_restarted=True``). Saving the merged model needs neither.
    """
    layers = _layers_with(model, adapter_name)
    settings = {
        (layer.adapters[adapter_name].r, int(layer.adapters[adapter_name].mora_type), layer.scalings[adapter_name],
         getattr(layer.dropouts[adapter_name], "p", 0.0), layer.adapters[adapter_name].restarts)
        for _, layer in layers
    }
    if len(settings) != 1:
        raise ValueError(
            f"save_adapter: the format stores one (r, mora_type, scaling, dropout, restarts) per adapter, but "
            f"adapter {adapter_name!r} has {sorted(settings)} on different layers"
        )
    ((r, mora_type, scaling, dropout, restarts),) = settings
    if restarts and not allow_restarted:
        raise ValueError(
            f"save_adapter: adapter {adapter_name!r} went through {restarts} ReMoRA restart(s), which folded the "
            "earlier cycles' updates into the base weights; a checkpoint of M alone would lose them. Save the merged "
            "model (mora_kernels.merge(model), then its weights), or save the base weights too and pass "
            "allow_restarted=True"
        )
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": getattr(model, "name_or_path", None),
        "r": r,
        "lora_alpha": r,  # unused: the original release ignores lora_alpha (scaling 1)
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, [name for name, _ in layers]),
        "bias": "none",
        # PEFT's flag for Conv1D targets (weights stored (in, out)); MoRA reads the layout from the layer itself
        "fan_in_fan_out": all(check_base_layer(layer.base).transposed for _, layer in layers),
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_mora": True,
        "mora_type": mora_type,
    }
    if scaling != 1.0:
        config["mora_scaling"] = scaling
    if restarts:
        config["remora_restarts"] = restarts
    write_checkpoint(path, config, {name: layer.adapters[adapter_name].weight for name, layer in layers})


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """``target_modules`` for a checkpoint of the layers ``names``: their last name parts (``["q_proj"]``, as the
    original release writes) if those select exactly these layers, else the full names (PEFT reads both)."""
    suffixes = sorted({name.rpartition(".")[2] for name in names})
    selected, inside = set(), ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, MoRALinear):
            inside = name + "."
        if matches(name, suffixes):
            selected.add(name)
    return suffixes if selected == set(names) else sorted(names)


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", *, allow_restarted: bool = False
) -> nn.Module:
    """Load a MoRA checkpoint (this package's or the original release's) into ``model``; return it.

    As after ``apply_mora``, only the active adapters' matrices are left trainable.

    Layers named in the checkpoint become ``MoRALinear`` with adapter ``adapter_name`` active; on layers that are
    already ``MoRALinear`` the adapter is added inactive, or, if it exists, its matrix is overwritten: it must then
    have the checkpoint's r, mora_type, scaling and dropout (ValueError naming the difference; delete it or load
    under another name). M keeps the checkpoint's dtype upcast to at least float32; a float64 base computes the
    update in float64. Everything is checked before the model changes: a refused checkpoint leaves it as it was.
    ``allow_restarted``: see ``read_config`` (the model's base weights must hold the ReMoRA cycles before this M).
    """
    config = read_config(path, allow_restarted)
    matrices = read_matrices(path)
    r, mora_type = config["r"], mora_type_of(config.get("mora_type", 1))
    options = dict(dropout=config.get("lora_dropout", 0.0), scaling=config.get("mora_scaling", 1.0))
    missing = [name for name, _ in targets(model, config.get("target_modules") or []) if name not in matrices]
    if missing:
        raise ValueError(f"path: the checkpoint's target_modules match {missing} in the model but it has no M for them")
    plan = [(name, _check_target(model, name, M, adapter_name, r, mora_type, options), M)
            for name, M in matrices.items()]
    for name, module, M in plan:
        dtype = M.dtype if M.dtype == torch.float64 else torch.float32
        if not isinstance(module, MoRALinear):
            module = MoRALinear(module, r, mora_type, adapter_name=adapter_name, dtype=dtype, **options)
            set_submodule(model, name, module)
        elif adapter_name not in module.adapters:
            module.add_adapter(adapter_name, r, mora_type, dtype=dtype, **options)
        with torch.no_grad():
            module.adapters[adapter_name].weight.copy_(M)
        module.adapters[adapter_name].restarts = config.get("remora_restarts", 0)
    return _train_only_active_matrices(model)


def _check_target(model, name, M, adapter_name, r, mora_type, options) -> nn.Module:
    """The module ``name`` of ``model`` if checkpoint matrix ``M`` can load into it; else the error, untouched."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"path: the checkpoint adapts {name!r}, which the model does not have") from None
    if not isinstance(module, MoRALinear):
        check_base_layer(module)
    elif adapter_name in module.adapters:
        adapter = module.adapters[adapter_name]
        have = dict(r=adapter.r, mora_type=int(adapter.mora_type), scaling=module.scalings[adapter_name],
                    dropout=getattr(module.dropouts[adapter_name], "p", 0.0))
        want = dict(r=r, mora_type=int(mora_type), **options)
        differ = [f"{k} {have[k]!r} here, {want[k]!r} in the checkpoint" for k in have if have[k] != want[k]]
        if differ:
            raise ValueError(
                f"path: layer {name!r} already has an adapter {adapter_name!r} with other settings "
                f"({'; '.join(differ)}); delete it (delete_adapter) or load under another adapter_name"
            )
    key = f"{name} (r={r}, mora_type={int(mora_type)})"
    in_features, out_features = (  # a Conv1D has no in_features / out_features attributes
        (module.in_features, module.out_features) if isinstance(module, MoRALinear)
        else check_base_layer(module).features(module)
    )
    check_loaded_matrix(key, M, in_features, out_features, r, mora_type)
    return module


def _check_known(model: nn.Module, names: Sequence[str], argument: str) -> list[tuple[str, MoRALinear]]:
    """Every MoRA layer of ``model``; ValueError naming ``argument`` if some name is held by no layer."""
    layers = list(mora_layers(model))
    held = {name for _, layer in layers for name in layer.adapters}
    unknown = [name for name in dict.fromkeys(names) if name not in held]
    if unknown:
        raise ValueError(f"{argument}: unknown adapter(s) {unknown}; the model's MoRA layers have {sorted(held)}")
    return layers


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Make ``adapter_name`` (or a list of names, summed) the active adapter(s) of the model.

    Every MoRA layer activates the listed adapters it holds and deactivates the others; a layer that holds none of
    them computes its base output. A name that no layer holds is a ValueError.
    """
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names:
        raise ValueError("adapter_name: name at least one adapter (use disable_adapters to compute the base output)")
    for _, layer in _check_known(model, names, "adapter_name"):
        layer.set_adapter([name for name in names if name in layer.adapters])


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    for _, layer in _layers_with(model, adapter_name):
        layer.delete_adapter(adapter_name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes its base output (merged adapters are unmerged first)."""
    layers = [layer for _, layer in mora_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, adapter_names: Sequence[str]):
    """Within the block row ``i`` of every batch uses adapter ``adapter_names[i]`` (``"__base__"``: none).

    A layer that does not hold a row's adapter computes its base output for that row.
    """
    names = list(adapter_names)
    _check_known(model, [name for name in names if name != BASE_ROW], "adapter_names")

    def hook(module, args, kwargs):
        held = [name if name in module.adapters else BASE_ROW for name in names]
        return args, {**kwargs, "adapter_names": held}

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for _, layer in mora_layers(model)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold each MoRA layer's active adapters into its base weight and put the plain Linear back; return model."""
    for _, layer in mora_layers(model):  # a base that refuses a merge (see mora_kernels.bases) refuses before any
        check_base_layer(layer.base).check_merge(layer.base)
    for name, layer in list(mora_layers(model)):
        todo = [a for a in layer.active_adapters if a not in layer.merged_adapters]
        if todo:
            layer.merge(adapter_names=todo)
        set_submodule(model, name, layer.base)
    return model
