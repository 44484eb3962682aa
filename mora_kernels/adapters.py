"""MoRA on any PyTorch model without PEFT: which modules are adapted, and the model-level API.

``targets`` picks the modules that ``target_modules`` names (PEFT's rule); ``replace_linears`` swaps them for
``MoRALinear`` and does nothing else. ``apply_mora`` swaps them too (or adds an adapter to layers already swapped)
and trains only the active adapters; ``save_adapter`` / ``load_adapter`` write and read the original release's format
(``mora_kernels.checkpoint``), ``merge`` folds the active adapters into the base weights and puts the plain Linears
back. ``parameter_targets`` picks the parameters that ``target_parameters`` names (PEFT's rule too): ``apply_mora``
wraps their modules in ``MoRAParameter`` layers (one M per expert), nested as PEFT nests its wrappers, so that their
checkpoints carry PEFT's keys and every function here treats them as it treats ``MoRALinear``.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from . import ops
from .bases import check_base_layer
from .checkpoint import (
    CONFIG_NAME,
    KEY_PREFIX,
    check_path,
    check_rank_pattern,
    config_scaling,
    exact_pattern,
    layer_r,
    pattern_key,
    pattern_value,
    read_config,
    read_matrices,
    weights_file,
    write_checkpoint,
)
from .core import check_dropout, check_float_dtype, check_scaling, check_target_modules, mora_type_of, r_hat
from .layer import (
    BASE_ROW,
    AdapterMixin,
    AdapterSet,
    MoRALinear,
    MoRAParameter,
    RowSelection,
    adapter_names_of,
    check_adapter_name,
    check_loaded_matrix,
    parameter_layout,
    row_selection,
)
from .rollback import atomic, check_model, check_not_shared


def mora_layers(model: nn.Module) -> Iterator[tuple[str, MoRALinear | MoRAParameter]]:
    """The package's MoRA layers of ``model``: ``MoRALinear`` and ``MoRAParameter`` (each of a nest)."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterSet):
            yield name, module


def check_target_parameters(target_parameters) -> list[str]:
    """``target_parameters`` as a non-empty list of parameter names or name suffixes, or an error naming it."""
    if isinstance(target_parameters, str) or not isinstance(target_parameters, (list, tuple)):
        raise TypeError(f"target_parameters must be a list of parameter names (as PEFT's), got {target_parameters!r}")
    bad = [t for t in target_parameters if not isinstance(t, str) or not t]
    if bad or not target_parameters:
        raise ValueError(f"target_parameters: expected parameter names '<module>.<parameter>' (full, or suffixes "
                         f"such as 'mlp.experts.gate_up_proj'), got {list(target_parameters)!r}")
    return list(target_parameters)


def parameter_targets(model: nn.Module, target_parameters) -> list[tuple[str, nn.Module, list[str]]]:
    """``(module name, module, parameter names)`` for each module holding parameters that ``target_parameters``
    names (PEFT's rule: ``<module>.<parameter>`` equal to a name or ending with ``.`` + a name). The module name is
    the module's own, also where ``MoRAParameter`` layers wrap it (theirs is the name of the outermost); the names
    are in the order the parameters were registered, the order in which their layers nest (PEFT's: the last one
    outermost). Refused: a parameter of the model itself (it cannot be replaced in place) or of a ``MoRALinear``
    (``target_modules`` adapts it); the parameters themselves are checked by ``MoRAParameter``'s layout."""
    target_parameters = check_target_parameters(target_parameters)

    def named(name: str, parameter: str) -> bool:
        key = f"{name}.{parameter}" if name else parameter
        return any(key == t or key.endswith("." + t) for t in target_parameters)

    found = []

    def visit(name: str, module: nn.Module) -> None:
        while isinstance(module, MoRAParameter):
            module = module.base_layer
        if isinstance(module, AdapterMixin):
            taken = [p for p, _ in module.base_layer.named_parameters(recurse=False) if named(name, p)]
            if taken:
                raise ValueError(f"target_parameters: {taken} of {name!r} belong to a MoRA layer's base Linear, "
                                 "which target_modules adapts; target one or the other")
            return
        own = [p for p, _ in module.named_parameters(recurse=False) if named(name, p)]
        if own and not name:
            raise ValueError(f"target_parameters: {own} are parameters of the model itself, which cannot be replaced "
                             "in place; wrap it (nn.Sequential(model))")
        if own:
            found.append((name, module, own))
        for child, submodule in module._modules.items():
            if submodule is not None:
                visit(f"{name}.{child}" if name else child, submodule)

    visit("", model)
    return found


def _parameter_layer(model: nn.Module, name: str, parameter_name: str) -> MoRAParameter | None:
    """The ``MoRAParameter`` of the nest at ``name`` that adapts ``parameter_name``, or None."""
    module = model.get_submodule(name)
    while isinstance(module, MoRAParameter):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def _wrap_parameter(model: nn.Module, name: str, parameter_name: str, r: int, mora_type, adapter_name: str,
                    backend: str = "auto", **options) -> MoRAParameter:
    """The ``MoRAParameter`` for ``parameter_name`` of the module at ``name``: the existing one, with adapter
    ``adapter_name`` added (inactive) unless it holds it, or a new one around the nest (outermost, as PEFT)."""
    layer = _parameter_layer(model, name, parameter_name)
    if layer is None:
        layer = MoRAParameter(model.get_submodule(name), parameter_name, r, mora_type, adapter_name=adapter_name,
                              backend=backend, **options)
        set_submodule(model, name, layer)
    elif adapter_name not in layer.adapters:
        layer.add_adapter(adapter_name, r, mora_type, **options)
    return layer


def matches(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches names or name suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def targets(model: nn.Module, target_modules: str | Iterable[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules to adapt: matched by name, outside any MoRA layer (``MoRALinear`` or PEFT's).

    transformers' ``Conv1D`` is adapted too; any other matched module that holds parameters but is not an
    ``nn.Linear`` is refused with ``check_base_layer``'s error instead of being skipped, so nothing is silently not
    trained; matched containers (no parameters of their own) are passed over.
    """
    target_modules = check_target_modules(target_modules)
    found, inside = [], ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, AdapterMixin):  # MoRALinear or PEFT's layer: its base is not a target of its own
            inside = name + "."
        if not matches(name, target_modules):
            continue
        if not isinstance(module, AdapterMixin):
            # (a PEFT LoRA layer holds no parameters of its own either: check_base_layer says where it came from)
            if not isinstance(module, nn.Linear) and next(module.parameters(recurse=False), None) is None \
                    and not hasattr(module, "get_base_layer"):
                continue
            try:
                check_base_layer(module)
            except TypeError as error:
                raise TypeError(f"target_modules: module {name!r} cannot be adapted: {error}") from None
            _check_replaceable(model, name)
        found.append((name, module))
    return found


def _check_replaceable(model: nn.Module, name: str) -> None:
    """Refuse a matched Linear that cannot be swapped for a MoRA layer: the model itself (it cannot replace itself
    in place), or the output projection of ``nn.MultiheadAttention``, which reads its weight directly instead of
    calling it (the adapter would never run; torch's attention then fails on the missing weight)."""
    if not name:
        raise ValueError(
            "target_modules: matched the model itself, which cannot be replaced in place; wrap it "
            "(nn.Sequential(model)) or adapt the layer directly with MoRALinear(model, r)"
        )
    parent = model.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, nn.MultiheadAttention):
        raise TypeError(
            f"target_modules: module {name!r} is the output projection of an nn.MultiheadAttention, which reads "
            "its weight directly instead of calling it, so an adapter there would never run; adapt the Linears "
            "of the model's own attention or MLP instead"
        )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def replace_linears(
    model: nn.Module, target_modules: str | Iterable[str], r: int, mora_type: int | str = 1, **kwargs
) -> list[str]:
    """Replace each ``nn.Linear`` of ``model`` whose name matches ``target_modules`` by a ``MoRALinear``.

    The layer-level swap, for code that manages training itself: it changes no other parameter's ``requires_grad``
    and skips layers that already hold MoRA. ``adapters.apply_mora`` is the adapter-level entry point built on the
    same layers: it also freezes everything but the active adapters' M, adds named adapters to existing MoRA
    layers, and pairs with ``save_adapter`` / ``load_adapter`` / ``set_adapter``.

    ``kwargs`` go to ``MoRALinear`` (dropout, scaling, dtype, backend, adapter_name). Returns the replaced names;
    raises ValueError if nothing matched, since a silent no-op would train nothing, and TypeError for a matched
    layer that MoRA cannot adapt (see ``check_base_layer``). Layers that are already ``MoRALinear`` are kept.
    """
    replaced = []
    with atomic(model):  # a layer refused half way puts back the layers replaced before it
        for name, module in targets(model, target_modules):
            if isinstance(module, MoRALinear):
                continue
            set_submodule(model, name, MoRALinear(module, r, mora_type, **kwargs))
            replaced.append(name)
    if not replaced:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear of the model")
    return replaced


def apply_mora(
    model: nn.Module,
    target_modules: str | Iterable[str] | None,
    r: int,
    mora_type: int | str = 1,
    *,
    adapter_name: str = "default",
    dropout: float = 0.0,
    scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    use_dora: bool = False,
    target_parameters: Sequence[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
) -> nn.Module:
    """Adapt ``model`` in place and return it; only the MoRA matrices of active adapters stay trainable
    (and, with ``use_dora``, their DoRA magnitude vectors: see ``MoRALinear``).

    The adapter-level entry point (``replace_linears`` is the bare layer swap, which freezes nothing else and
    knows no adapter names).

    ``target_modules``: a list of module names or name suffixes (``["q_proj", "v_proj"]``), or one regex matched
    against full names, as in PEFT. A Linear is replaced by a ``MoRALinear`` whose adapter ``adapter_name`` is
    active; on a layer that is already a ``MoRALinear`` the adapter is added inactive (``set_adapter`` to use it).

    ``target_parameters``: parameters that a module reads itself, named as in PEFT (``"mlp.experts.gate_up_proj"``:
    a full ``<module>.<parameter>`` name or its suffix), typically mixture-of-experts weights stored as one 3-D
    parameter: each gets a ``MoRAParameter`` with one M per expert (``target_modules`` may then be None or ``[]``).
    Not with ``dropout`` or ``use_dora`` (refused there, as by PEFT).

    ``rank_pattern``: PEFT's, ``{pattern: r}``: a layer whose name (a parameter's: its full name) a pattern matches
    gets that r instead of ``r`` (PEFT's rule: the first key whose regex matches the end of the name at a dot
    boundary); a key that matches no adapted layer is warned about, as by PEFT. ``save_adapter`` writes the layers'
    r as PEFT's ``rank_pattern`` when they differ.
    """
    # Everything is checked before any layer changes (each layer checks again); what cannot be foreseen is rolled
    # back by atomic.
    check_model(model)
    check_adapter_name(adapter_name)
    check_scaling(scaling)
    check_dropout(dropout)
    check_float_dtype(dtype, "dtype")
    rank_pattern = {} if rank_pattern is None else check_rank_pattern(rank_pattern)
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    parameters = [] if target_parameters is None else parameter_targets(model, target_parameters)
    if target_parameters is not None:
        if not parameters:
            raise ValueError(f"target_parameters={target_parameters!r} matched no parameter of the model")
        if dropout or use_dora:
            raise ValueError(f"target_parameters: {'use_dora' if use_dora else f'dropout={dropout!r}'} is refused "
                             "on parameters: their update reaches the weight whole (dropout would act on x, which "
                             "the weight never sees; PEFT refuses DoRA there too)")
    if target_modules is None and target_parameters is None:
        raise ValueError("target_modules: name the modules to adapt (or the parameters, with target_parameters)")
    # [] beside target_parameters names no module (PEFT's idiom); alone, it is a target that matched nothing
    modules_named = target_modules is not None and not (target_parameters is not None and target_modules == [])
    found = targets(model, target_modules) if modules_named else []
    if modules_named and not found:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear of the model")
    both = sorted({name for name, _ in found} & {name for name, _, _ in parameters})
    if both:
        raise ValueError(f"target_modules and target_parameters both name modules {both}; adapt each one way")
    taken = [name for name, module in found if isinstance(module, MoRALinear) and adapter_name in module.adapters]
    taken += [f"{name}.{p}" for name, _, params in parameters for p in params
              if adapter_name in getattr(_parameter_layer(model, name, p), "adapters", ())]
    if taken:
        raise ValueError(
            f"adapter_name: adapter {adapter_name!r} already exists on {taken}; delete it or choose another name"
        )
    # Each layer's r: rank_pattern's for the layer's name (a parameter's full name, as PEFT matches it), else r.
    ranks = {name: pattern_value(rank_pattern, name, r) for name, _ in found}
    ranks.update({f"{name}.{p}": pattern_value(rank_pattern, f"{name}.{p}", r) for name, _, params in parameters
                  for p in params})
    unused = [key for key in rank_pattern if not any(pattern_key([key], name) for name in ranks)]
    for name, module in found:
        try:
            base = module.base_layer if isinstance(module, AdapterMixin) else module
            r_hat(*check_base_layer(base).features(base), ranks[name], mora_type)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{error} (layer {name!r})") from None
    for name, module, params in parameters:
        for p in params:
            try:
                _, n, m, _ = parameter_layout(module, p, f"target_parameters: {name}.{p}")
                r_hat(n, m, ranks[f"{name}.{p}"], mora_type)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{error} (parameter {name}.{p})") from None
    if unused:  # PEFT's warning: a key that names no adapted layer is most likely a typo
        warnings.warn(f"rank_pattern: keys {unused} match no adapted layer and were ignored", RuntimeWarning,
                      stacklevel=2)
    options = dict(dropout=dropout, scaling=scaling, dtype=dtype, use_dora=use_dora)
    with atomic(model):
        for name, module in found:
            if isinstance(module, MoRALinear):
                module.add_adapter(adapter_name, ranks[name], mora_type, **options)
            else:
                layer = MoRALinear(module, ranks[name], mora_type, backend=backend, adapter_name=adapter_name,
                                   **options)
                set_submodule(model, name, layer)
        for name, _, params in parameters:
            for p in params:
                _wrap_parameter(model, name, p, ranks[f"{name}.{p}"], mora_type, adapter_name, backend,
                                scaling=scaling, dtype=dtype)
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

    Its layers share one mora_type, dropout, DoRA flag and restart count (else a ValueError); layers of different r
    or scaling are written as PEFT's ``rank_pattern`` / ``alpha_pattern``, one exact key per layer.

    After ReMoRA restarts the earlier cycles live in the base weights, and M alone no longer reproduces the model:
    this is refused unless ``allow_restarted`` (save the base weights too; the checkpoint records
    ``remora_restarts`` and loads only with ``allow_restarted=True``). Saving the merged model needs neither.
    """
    check_path(path)
    model = _uncompiled(check_model(model))
    layers = _layers_with(model, adapter_name)
    settings = {
        (int(layer.adapters[adapter_name].mora_type), getattr(layer.dropouts[adapter_name], "p", 0.0),
         layer.adapters[adapter_name].restarts, layer.mora_magnitude(adapter_name) is not None)
        for _, layer in layers
    }
    if len(settings) != 1:
        raise ValueError(
            f"save_adapter: the format stores one (mora_type, dropout, restarts, use_dora) per adapter, but "
            f"adapter {adapter_name!r} has {sorted(settings)} on different layers"
        )
    ((mora_type, dropout, restarts, use_dora),) = settings
    linears = [name for name, layer in layers if isinstance(layer, MoRALinear)]
    # A parameter's rank_pattern / alpha_pattern key is its own name (PEFT's), a Linear's its module's.
    own = _parameter_names(model)
    scalings = {own.get(name, name): layer.scalings[adapter_name] for name, layer in layers}
    ranks = {own.get(name, name): layer.adapters[adapter_name].r for name, layer in layers}
    # r: the most common one (the smallest of a tie); the others are rank_pattern's, below
    r = min(Counter(ranks.values()).most_common(), key=lambda pair: (-pair[1], pair[0]))[0]
    empty = [name for name, layer in layers if layer.adapters[adapter_name].weight.device.type == "meta"]
    if empty:
        raise ValueError(f"save_adapter: adapter {adapter_name!r} has no values on layers {empty} (meta device); "
                         "load or initialize the weights before saving")
    broken = [name for name, layer in layers if not torch.isfinite(layer.adapters[adapter_name].weight).all()]
    if broken:  # every loader refuses such a matrix: saving it would write a checkpoint that cannot be read back
        raise ValueError(f"save_adapter: adapter {adapter_name!r} holds NaN or inf on layers {broken}; not saved")
    if restarts and not allow_restarted:
        raise ValueError(
            f"save_adapter: adapter {adapter_name!r} went through {restarts} ReMoRA restart(s), which folded the "
            "earlier cycles' updates into the base weights; a checkpoint of M alone would lose them. Save the merged "
            "model (mora_kernels.merge(model), then its weights), or save the base weights too and pass "
            "allow_restarted=True"
        )
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": _name_or_path(model),
        "r": r,
        "lora_alpha": r,  # unused: the original release ignores lora_alpha (scaling 1)
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, linears),
        "bias": "none",
        # PEFT's flag for Conv1D targets (weights stored (in, out)); MoRA reads the layout from the layer itself
        "fan_in_fan_out": bool(linears) and all(check_base_layer(layer.base).transposed for _, layer in layers
                                                if isinstance(layer, MoRALinear)),
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_mora": True,
        "mora_type": mora_type,
    }
    if len(linears) < len(layers):  # PEFT's field; the keys of these layers are their nests' module names, as PEFT's
        config["target_parameters"] = sorted(name for name in scalings if name not in linears)
    if len(set(ranks.values())) > 1:
        # Per-layer r as PEFT's rank_pattern, every layer's exactly (a key written only for the layers of another r
        # would also match the names it is a dot suffix of).
        config["rank_pattern"] = exact_pattern(ranks)
    if len(set(scalings.values())) > 1:
        # Per-layer factors (a PEFT folder's alpha_pattern, or set by hand) as PEFT's alpha_pattern, exactly: with
        # lora_alpha 1 and mora_scaling 1 a layer's factor is its alpha (checkpoint.layer_scaling).
        config["lora_alpha"] = 1
        config["alpha_pattern"] = exact_pattern(scalings)
    elif next(iter(scalings.values())) != 1.0:
        config["mora_scaling"] = next(iter(scalings.values()))
    if restarts:
        config["remora_restarts"] = restarts
    magnitudes = None
    if use_dora:  # PEFT's flag and key: both paths load it, the original release cannot (it has no DoRA)
        config["use_dora"] = True
        magnitudes = {name: layer.mora_magnitude(adapter_name) for name, layer in layers}
    write_checkpoint(path, config, {name: layer.adapters[adapter_name].weight for name, layer in layers}, magnitudes)


def _parameter_names(model: nn.Module) -> dict[str, str]:
    """``{module name of a MoRAParameter: the full name of the parameter it adapts}`` (``<module>.<parameter>``,
    the module's own name, without the ``.base_layer`` parts of the nest around it)."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, MoRAParameter) and name not in names:  # the outermost of a nest: walk it down
            layer, inner = module, name
            while isinstance(layer, MoRAParameter):
                names[inner] = f"{name}.{layer.parameter_name}"
                layer, inner = layer.base_layer, inner + ".base_layer"
    return names


def _uncompiled(model: nn.Module) -> nn.Module:
    """The model a ``torch.compile`` wrapper runs (its own names, without ``_orig_mod.``), else ``model``."""
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else model


def _name_or_path(model: nn.Module) -> str | None:
    """The model's ``name_or_path`` (transformers) for the config: a path object as its string."""
    value = getattr(model, "name_or_path", None)
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """``target_modules`` for a checkpoint of the layers ``names``: their last name parts (``["q_proj"]``, as the
    original release writes) if those select exactly these layers, else the full names (PEFT reads both)."""
    suffixes = sorted({name.rpartition(".")[2] for name in names})
    selected, inside = set(), ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, AdapterMixin):  # MoRALinear or PEFT's MoRA layer (mora_kernels.export)
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
    returned, model = model, _uncompiled(check_model(model))
    config = read_config(path, allow_restarted)
    mora_type = mora_type_of(config.get("mora_type", 1))
    plan = checked_plan(model, path, config, adapter_name)
    with atomic(model):
        for name, module, M, magnitude in plan:
            dtype = M.dtype if M.dtype == torch.float64 else torch.float32
            if isinstance(module, ParameterTarget):  # in nesting order (checked_plan's): the nests come out as PEFT's
                layer = _wrap_parameter(model, module.name, module.parameter_name, layer_r(config, module.key),
                                        mora_type, adapter_name, scaling=config_scaling(config, module.key),
                                        dtype=dtype)
                with torch.no_grad():
                    layer.adapters[adapter_name].weight.copy_(M)
                layer.adapters[adapter_name].restarts = config.get("remora_restarts", 0)
                continue
            options, r = _layer_options(config, name), layer_r(config, name)
            if not isinstance(module, MoRALinear):
                module = MoRALinear(module, r, mora_type, adapter_name=adapter_name, dtype=dtype, **options)
                set_submodule(model, name, module)
            elif adapter_name not in module.adapters:
                module.add_adapter(adapter_name, r, mora_type, dtype=dtype, **options)
            with torch.no_grad():
                module.adapters[adapter_name].weight.copy_(M)
                if options["use_dora"]:
                    module.magnitudes[adapter_name].weight.copy_(magnitude)
            module.adapters[adapter_name].restarts = config.get("remora_restarts", 0)
        _train_only_active_matrices(model)
    return returned


def checked_plan(model: nn.Module, path, config: dict, adapter_name: str,
                 other_keys: bool = False) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor | None]]:
    """``(module name, module, M, DoRA's magnitude vector or None)`` for each matrix of the checkpoint at ``path``
    (whose config was read with ``read_config``), once every one of them was checked against ``model``; else the
    error, model untouched. The weights file is read once.

    ``model`` is the model whose module names the checkpoint's keys use: the user's model on both paths (for a
    ``PeftModel``, its ``base_model.model``).
    """
    check_adapter_name(adapter_name)
    file = weights_file(path)
    matrices, magnitudes = read_matrices(path, other_keys)
    mora_type = mora_type_of(config.get("mora_type", 1))
    parameters = _parameter_plan(model, file, config, matrices, adapter_name)
    plan = [(name, _check_target(model, name, M, adapter_name, layer_r(config, name), mora_type,
                                 _layer_options(config, name), file), M, magnitudes.get(name))
            for name, M in matrices.items() if name not in parameters]
    # PEFT narrows target_modules with these fields, which this check does not model: then the keys alone decide.
    narrowed = any(config.get(field) for field in ("layers_to_transform", "layers_pattern", "exclude_modules"))
    try:
        wanted = [] if narrowed else targets(model, config.get("target_modules") or [])
    except (TypeError, ValueError) as error:
        raise type(error)(f"{os.path.join(path, CONFIG_NAME)}: {error}") from None
    _check_magnitudes(file, config, plan, magnitudes)  # (use_dora with target_parameters is refused above)
    missing = [name for name, _ in wanted if name not in matrices]
    if missing:
        raise ValueError(
            f"{file}: the checkpoint's target_modules match {missing} in the model but it has no M for them"
        )
    return plan + [(key, target, matrices[key], None) for key, target in parameters.items()]


class ParameterTarget(NamedTuple):
    """Where a checkpoint's parameter matrix loads: parameter ``parameter_name`` of the module at ``name``; ``key``
    is the parameter's full name (``rank_pattern`` and ``alpha_pattern`` match it)."""

    name: str
    parameter_name: str
    key: str


def _parameter_plan(model: nn.Module, file: str, config: dict, matrices: dict, adapter_name: str) -> dict:
    """``{checkpoint module name: ParameterTarget}`` for the config's ``target_parameters``, in nesting order, each
    matrix checked against its parameter; else the error, model untouched. The names are PEFT's: the wrappers of one
    module's targeted parameters nest in the order the module registered them, the last one outermost, so the
    i-th of k is keyed ``<module>`` + ``.base_layer`` * (k - 1 - i)."""
    if not config.get("target_parameters"):
        return {}
    where = os.path.join(os.path.dirname(file), CONFIG_NAME)
    if config.get("use_dora") or config.get("lora_dropout"):
        raise ValueError(f"{where}: target_parameters with use_dora or lora_dropout: refused on parameters (their "
                         "update reaches the weight whole; PEFT refuses both there)")
    try:
        targets_found = parameter_targets(model, config["target_parameters"])
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None
    mora_type = mora_type_of(config.get("mora_type", 1))
    plan = {}
    for name, module, params in targets_found:
        for i, parameter in enumerate(params):
            key = name + ".base_layer" * (len(params) - 1 - i)
            full = f"{name}.{parameter}"
            r = layer_r(config, full)
            if key not in matrices:
                raise ValueError(f"{file}: the checkpoint's target_parameters match {full!r} in the model but it has "
                                 f"no M for it (key {KEY_PREFIX}{key}.lora_A.weight)")
            experts, n, m, _ = parameter_layout(module, parameter, f"{where}: target_parameters: {full}")
            layer = _parameter_layer(model, name, parameter)
            if layer is not None and adapter_name in layer.adapters:
                if adapter_name in layer.merged_adapters:
                    raise ValueError(f"{file}: adapter {adapter_name!r} is merged into {full!r}; unmerge it before "
                                     "loading over it")
                adapter = layer.adapters[adapter_name]
                have = (adapter.r, int(adapter.mora_type), layer.scalings[adapter_name])
                want = (r, int(mora_type), config_scaling(config, full))
                if have != want:
                    raise ValueError(f"{file}: {full!r} already has an adapter {adapter_name!r} with other settings "
                                     f"((r, mora_type, scaling) {have} here, {want} in the checkpoint); delete it "
                                     "(delete_adapter) or load under another adapter_name")
            check_loaded_matrix(f"{file}: key {KEY_PREFIX}{key}.lora_A.weight (r={r}, mora_type={int(mora_type)})",
                                matrices[key], n, m, r, mora_type, experts)
            plan[key] = ParameterTarget(name, parameter, full)
    return plan


def _check_magnitudes(file, config: dict, plan, magnitudes: dict) -> None:
    """DoRA's vectors: one of the layer's out_features for every matrix when ``use_dora``, none otherwise."""
    if not config.get("use_dora", False):
        if magnitudes:
            raise ValueError(f"{file}: holds DoRA magnitude vectors but its config has no use_dora: true")
        return
    for name, module, _, got in plan:
        base = module.base_layer if isinstance(module, AdapterMixin) else module
        out_features = check_base_layer(base).features(base)[1]
        if got is None or tuple(got.shape) != (out_features,):
            raise ValueError(f"{file}: use_dora: {KEY_PREFIX}{name}.lora_magnitude_vector must be a vector of "
                             f"the layer's {out_features} out_features, got "
                             f"{'none' if got is None else tuple(got.shape)}")


def _layer_options(config: dict, name: str) -> dict:
    """The dropout, scaling and DoRA flag a checkpoint's ``config`` gives module ``name``'s adapter (alpha_pattern
    per layer)."""
    return dict(dropout=config.get("lora_dropout", 0.0), scaling=config_scaling(config, name),
                use_dora=config.get("use_dora", False))


def _check_target(model, name, M, adapter_name, r, mora_type, options, file) -> nn.Module:
    """The module ``name`` of ``model`` if checkpoint matrix ``M`` can load into it; else the error, untouched."""
    where = f"{file}: key {KEY_PREFIX}{name}.lora_A.weight"
    module, path = model, []
    for part in name.split("."):
        if isinstance(module, AdapterMixin) or hasattr(module, "get_base_layer"):  # a MoRA (or other PEFT) layer
            raise ValueError(
                f"{where} points inside the adapter layer {'.'.join(path)!r}, not at a Linear of the model"
            )
        module = module._modules.get(part)
        path.append(part)
        if module is None:
            raise ValueError(f"{where}: the model has no module {name!r}")
    if not isinstance(module, AdapterMixin):
        try:
            check_base_layer(module)
        except TypeError as error:
            raise TypeError(f"{where}: module {name!r} cannot hold a MoRA adapter: {error}") from None
        try:
            _check_replaceable(model, name)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from None
    elif isinstance(module, MoRALinear) and adapter_name in module.adapters:
        if adapter_name in module.merged_adapters:  # W holds the old M's update: a new M would unmerge wrongly
            raise ValueError(
                f"{file}: adapter {adapter_name!r} is merged into layer {name!r}; unmerge it before loading over it"
            )
        adapter = module.adapters[adapter_name]
        have = dict(r=adapter.r, mora_type=int(adapter.mora_type), scaling=module.scalings[adapter_name],
                    dropout=getattr(module.dropouts[adapter_name], "p", 0.0),
                    use_dora=module.mora_magnitude(adapter_name) is not None)
        want = dict(r=r, mora_type=int(mora_type), **options)
        differ = [f"{k} {have[k]!r} here, {want[k]!r} in the checkpoint" for k in have if have[k] != want[k]]
        if differ:
            raise ValueError(
                f"{file}: layer {name!r} already has an adapter {adapter_name!r} with other settings "
                f"({'; '.join(differ)}); delete it (delete_adapter) or load under another adapter_name"
            )
    key = f"{where} (r={r}, mora_type={int(mora_type)})"
    # A MoRA layer (ours or PEFT's) knows its sizes; a bare Conv1D has no in_features / out_features attributes.
    base = module.base_layer if isinstance(module, AdapterMixin) else module
    in_features, out_features = check_base_layer(base).features(base)
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
    check_model(model)
    names = adapter_names_of(adapter_name, "adapter_name")
    if not names:
        raise ValueError("adapter_name: name at least one adapter (use disable_adapters to compute the base output)")
    layers = _check_known(model, names, "adapter_name")
    with atomic(model, writes=_merged_weights(layers)):  # leaving a merged adapter unmerges it
        for _, layer in layers:
            layer.set_adapter([name for name in names if name in layer.adapters])


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from every layer that holds it; not while it is merged, nor where it is a
    layer's only adapter (``merge`` or load the model anew instead). Refused: nothing is deleted."""
    check_model(model)
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a str, got {adapter_name!r}")
    layers = _layers_with(model, adapter_name)
    merged = [name for name, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter_name: adapter {adapter_name!r} is merged on layers {merged}; unmerge it first")
    only = [name for name, layer in layers if len(layer.adapters) == 1]
    if only:
        raise ValueError(
            f"adapter_name: adapter {adapter_name!r} is the only adapter of layers {only}, which cannot be left "
            "without one; merge (mora_kernels.merge) or reload the model instead"
        )
    with atomic(model, writes=_merged_weights(layers)):
        for _, layer in layers:
            layer.delete_adapter(adapter_name)


def _merged_weights(layers) -> list[torch.Tensor]:
    """The base weights that hold merged adapters: switching adapters may unmerge (write) them."""
    return [layer.merged_weight for _, layer in layers if layer.merged_adapters]


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes its base output (merged adapters are unmerged first).

    Leaving the block puts back exactly the state from before it, layer by layer: layers that were disabled stay
    disabled (so blocks nest), merged adapters are merged again, and every ``requires_grad`` flag is restored.
    """
    named = list(mora_layers(check_model(model)))
    before = [(layer, layer.disable_adapters, list(layer.merged_adapters)) for _, layer in named]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with atomic(model, writes=_merged_weights(named)):
        for layer, disabled, _ in before:
            if not disabled:
                layer.enable_adapters(False)
    try:
        yield model
    finally:
        with atomic(model, writes=[layer.merged_weight for layer, _, merged in before if merged]):
            for layer, disabled, merged in before:
                if not disabled:
                    layer.enable_adapters(True)
                    if merged:
                        layer.merge(adapter_names=merged)
            for parameter, flag in flags:
                parameter.requires_grad_(flag)


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, adapter_names: Sequence[str]):
    """Within the block row ``i`` of every batch uses adapter ``adapter_names[i]`` (``"__base__"``: none).

    A layer that does not hold a row's adapter computes its base output for that row. The selection belongs to the
    calling thread (a context variable read by the model's MoRA layers), not to the model: threads serving the same
    model with different selections at once are independent (docs/reliability.md). Deleting a selected adapter
    inside the block makes the next forward raise. A ``MoRAParameter`` (``target_parameters``) on an experts module
    that runs fused serves any selection; one that parametrizes its weight has one weight for the whole batch and
    serves a selection only where every row names the same adapter of it (or none of its adapters); any other
    selection is refused here.
    """
    check_model(model)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}")
    names = adapter_names_of(list(adapter_names), "adapter_names")
    layers = _check_known(_uncompiled(model), [name for name in names if name != BASE_ROW], "adapter_names")
    for name, layer in layers:
        # a nest that runs fused serves any selection; one that parametrizes, one adapter for the whole batch
        if isinstance(layer, MoRAParameter) and layer not in _fused_nest_of(model, name):
            try:
                layer.row_adapter(names)
            except ValueError as error:
                raise ValueError(f"{error} (layer {name!r})") from None
    with row_selection(RowSelection(names, layers)):
        yield model


def _fused_nest_of(model: nn.Module, name: str) -> list[MoRAParameter]:
    """The layers that the nest holding the ``MoRAParameter`` at ``name`` runs fused (none if it parametrizes)."""
    outermost = _uncompiled(model).get_submodule(re.sub(r"(\.base_layer)+$", "", name))
    return outermost.fused_nest() or []


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold each MoRA layer's active adapters into its base weight and put the plain base layer back; return model.

    Everything that would refuse is checked before anything changes: a base weight that another module also holds
    (tied embeddings), and a base that refuses a merge (``mora_kernels.bases``: torchao, some 4-bit CPU layouts).
    """
    plan = [(name, layer, [a for a in layer.active_adapters if a not in layer.merged_adapters])
            for name, layer in mora_layers(check_model(model))]
    folded = [(name, layer) for name, layer, todo in plan if todo]
    for name, layer in folded:
        if isinstance(layer, MoRALinear):
            try:
                check_base_layer(layer.base).check_merge(layer.base)
            except TypeError as error:
                raise TypeError(f"model: layer {name!r}: {error}") from None
    check_not_shared(model, folded, "merging")
    with atomic(model, writes=[layer.merged_weight for _, layer in folded]):
        for name, layer, todo in plan:
            if todo:
                layer.merge(adapter_names=todo)
        for name, layer, _ in reversed(plan):  # a nest of MoRAParameter from the inside out
            set_submodule(model, name, layer.base_layer)
    return model
