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
from itertools import chain

import torch
from torch import nn

from . import ops
from .files import write_files
from .core import FLOAT_DTYPES, check_dropout, check_float_dtype, check_int, check_scaling, mora_type_of, r_hat
from .layer import (
    BASE_ROW,
    AdapterMixin,
    MoRALinear,
    RowSelection,
    _check_replaceable,
    adapter_names_of,
    check_adapter_name,
    check_base_layer,
    check_loaded_matrix,
    check_target_modules,
    matches,
    row_selection,
    set_submodule,
    targets,
)
from .rollback import atomic, check_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."  # PEFT's prefix: PeftModel.base_model (LoraModel).model (the user's model)


# --- the checkpoint format (also used by mora_kernels.peft_integration)
def read_config(path: str | os.PathLike, allow_restarted: bool = False, peft: bool = False) -> dict:
    """``adapter_config.json`` of a MoRA checkpoint, checked: peft_type LORA, use_mora true, valid r and mora_type.

    ``peft``: read for the PEFT loaders, which also load trained biases (``bias`` 'all' / 'lora_only': PEFT saves
    and loads their keys); this package's own loader has no such keys and refuses them.

    A checkpoint saved after ReMoRA restarts (``remora_restarts`` > 0) is refused unless ``allow_restarted``: its
    M applies on top of base weights that hold the earlier cycles, which the checkpoint does not contain.
    """
    file = os.path.join(check_path(path), CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"path: no {CONFIG_NAME} in {os.fspath(path)!r}")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except UnicodeDecodeError as error:
        raise ValueError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: malformed JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except RecursionError:
        raise ValueError(f"{file}: JSON nested too deeply") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object (the adapter's config), got a JSON {type(config).__name__}")
    if config.get("peft_type") != "LORA" or config.get("use_mora") is not True:
        raise ValueError(
            f"{file}: not a MoRA adapter (expected peft_type 'LORA' and use_mora true, got peft_type "
            f"{config.get('peft_type')!r}, use_mora {config.get('use_mora')!r})"
        )
    check_int(config.get("r"), f"{file}: r", error=ValueError)
    bias = config.get("bias", "none")
    if peft and bias not in ("none", "all", "lora_only"):
        raise ValueError(f"{file}: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    if not peft and bias != "none":  # trained biases are keys this loader does not read
        raise ValueError(f"{file}: bias must be 'none' for a MoRA adapter, got {bias!r}")
    # LoRA variants that change what the weights mean. (fan_in_fan_out only says the targets are Conv1D layers, whose
    # transposed weight the layers handle themselves: mora_kernels.bases.)
    for field in ("use_dora", "lora_bias"):
        if config.get(field):
            raise ValueError(f"{file}: {field}={config[field]!r} is not supported with MoRA")
    target_modules = config.get("target_modules")
    if target_modules is not None:
        if not isinstance(target_modules, (str, list)):
            raise ValueError(f"{file}: target_modules must be a regex str or a list of str, got {target_modules!r}")
        try:
            check_target_modules(target_modules)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{file}: {error}") from None
    mora_type_of(config.get("mora_type", 1), f"{file}: mora_type")
    check_scaling(config.get("mora_scaling", 1.0), f"{file}: mora_scaling")
    check_dropout(config.get("lora_dropout", 0.0), f"{file}: lora_dropout")
    restarts = check_int(config.get("remora_restarts", 0), f"{file}: remora_restarts", minimum=0, error=ValueError)
    if restarts and not allow_restarted:
        raise ValueError(
            f"{file}: saved after {restarts} ReMoRA restart(s): its M applies on top of base weights that hold the "
            "earlier cycles' updates, which this checkpoint does not contain. Load it onto those base weights and "
            "pass allow_restarted=True"
        )
    return config


def check_path(path) -> str | os.PathLike:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (an adapter folder), got {type(path).__name__}")
    return path


def weights_file(path: str | os.PathLike) -> str:
    """The checkpoint's weights file: ``adapter_model.safetensors``, else the legacy ``adapter_model.bin``."""
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        file = os.path.join(check_path(path), name)
        if os.path.isfile(file):
            return file
    raise FileNotFoundError(f"path: no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {os.fspath(path)!r}")


def _read_weights(file: str) -> dict:
    """The file's ``{key: tensor}``, or a ValueError naming the file (never an unpickling hint)."""
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(file)
        except Exception as error:  # zero-byte, truncated or random files: safetensors' own error types
            raise ValueError(f"{file}: not a readable safetensors file ({error})") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's message would suggest weights_only=False, i.e. running the pickle's code
        raise ValueError(
            f"{file}: not a readable file of plain tensors ({type(error).__name__}); it is read with "
            "torch.load(weights_only=True) and nothing in it is unpickled"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a dict of tensors by key, got a {type(state).__name__}")
    return state


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as stored: same dtype, shape and bits (``torch.equal`` says a NaN differs from itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def read_matrices(path: str | os.PathLike, other_keys: bool = False) -> dict[str, torch.Tensor]:
    """``{module name in the model: M}`` from the checkpoint's weights; lora_A and lora_B must be equal.

    ``other_keys``: keys of the model (``base_model.model.``) that are not MoRA matrices (PEFT's ``modules_to_save``
    copies, biases) are left to the caller (the PEFT loaders; PEFT checks them) instead of refused."""
    file = weights_file(path)
    state = _read_weights(file)
    matrices, seconds = {}, {}
    for key, tensor in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{file}: keys must be str, got {key!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            got = tensor.layout if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{file}: {key}: expected a dense tensor, got {got}")
        for part, into in ((".lora_A.weight", matrices), (".lora_B.weight", seconds)):
            if key.startswith(KEY_PREFIX) and key.endswith(part):
                name = key[len(KEY_PREFIX) : -len(part)]
                if "" in name.split("."):  # the root module, or an empty name part ("a..b")
                    raise ValueError(f"{file}: key {key!r} names no module of the model (empty module name)")
                into[name] = tensor
                break
        else:
            if not (other_keys and key.startswith(KEY_PREFIX)):
                raise ValueError(
                    f"{file}: unexpected key {key!r} (expected {KEY_PREFIX}<module>.lora_A/lora_B.weight)"
                )
    for name, M in matrices.items():
        if M.dim() != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"{file}: {name}.lora_A.weight must be a square (R, R) matrix, got {tuple(M.shape)}")
        if name in seconds and not _same_bits(seconds[name], M):
            raise ValueError(f"{file}: {name}: lora_A and lora_B differ; a MoRA checkpoint holds M twice")
        if M.dtype in FLOAT_DTYPES and not torch.isfinite(M).all():
            raise ValueError(
                f"{file}: {KEY_PREFIX}{name}.lora_A.weight holds NaN or inf; it would make every output non-finite"
            )
    if set(seconds) - set(matrices):
        raise ValueError(f"{file}: lora_B without lora_A for {sorted(set(seconds) - set(matrices))}")
    if not matrices:
        raise ValueError(f"{file}: holds no MoRA matrix")
    return matrices


def write_checkpoint(path: str | os.PathLike, config: dict, matrices: dict[str, torch.Tensor]) -> None:
    """Write ``config`` and ``{module name: M}`` in the original release's format (safetensors), whole or not at all.

    Both files are serialized before the folder is touched (an unserializable config value fails first), then
    written next to their names and moved into place together (``files.write_files``): after any failure the
    folder still holds the checkpoint that was there, bit for bit; a symbolic link in it is replaced, not followed.
    """
    from safetensors.torch import save

    state = {}
    for name, M in matrices.items():
        M = M.detach().to("cpu").contiguous()
        state[f"{KEY_PREFIX}{name}.lora_A.weight"] = M
        state[f"{KEY_PREFIX}{name}.lora_B.weight"] = M.clone()  # safetensors refuses shared storage
    try:
        config_bytes = (json.dumps(config, indent=2, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as error:
        raise ValueError(f"save_adapter: the config cannot be written as JSON ({error}); nothing written") from None
    weights_bytes = save(state, metadata={"format": "pt"})
    os.makedirs(path, exist_ok=True)
    write_files({os.path.join(path, WEIGHTS_NAME): weights_bytes, os.path.join(path, CONFIG_NAME): config_bytes})


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

    The adapter-level entry point (``layer.replace_linears`` is the bare layer swap, which freezes nothing else and
    knows no adapter names).

    ``target_modules``: a list of module names or name suffixes (``["q_proj", "v_proj"]``), or one regex matched
    against full names, as in PEFT. A Linear is replaced by a ``MoRALinear`` whose adapter ``adapter_name`` is
    active; on a layer that is already a ``MoRALinear`` the adapter is added inactive (``set_adapter`` to use it).
    """
    # Everything is checked before any layer changes (each layer checks again); what cannot be foreseen is rolled
    # back by atomic.
    check_model(model)
    check_adapter_name(adapter_name)
    check_scaling(scaling)
    check_dropout(dropout)
    check_float_dtype(dtype, "dtype")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    found = targets(model, target_modules)
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear of the model")
    taken = [name for name, module in found if isinstance(module, MoRALinear) and adapter_name in module.adapters]
    if taken:
        raise ValueError(
            f"adapter_name: adapter {adapter_name!r} already exists on {taken}; delete it or choose another name"
        )
    for name, module in found:
        try:
            base = module.base_layer if isinstance(module, AdapterMixin) else module
            r_hat(*check_base_layer(base).features(base), r, mora_type)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{error} (layer {name!r})") from None
    options = dict(dropout=dropout, scaling=scaling, dtype=dtype)
    with atomic(model):
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
    check_path(path)
    model = _uncompiled(check_model(model))
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
    returned, model = model, _uncompiled(check_model(model))
    config = read_config(path, allow_restarted)
    r, mora_type = config["r"], mora_type_of(config.get("mora_type", 1))
    options = dict(dropout=config.get("lora_dropout", 0.0), scaling=config.get("mora_scaling", 1.0))
    plan = checked_plan(model, path, config, adapter_name)
    with atomic(model):
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
        _train_only_active_matrices(model)
    return returned


def checked_plan(model: nn.Module, path, config: dict, adapter_name: str,
                 other_keys: bool = False) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """``(module name, module, M)`` for each matrix of the checkpoint at ``path`` (whose ``config`` was read with
    ``read_config``), once every one of them was checked against ``model``; else the error, model untouched.

    ``model`` is the model whose module names the checkpoint's keys use: the user's model on both paths (for a
    ``PeftModel``, its ``base_model.model``).
    """
    check_adapter_name(adapter_name)
    file = weights_file(path)
    matrices = read_matrices(path, other_keys)
    r, mora_type = config["r"], mora_type_of(config.get("mora_type", 1))
    options = dict(dropout=config.get("lora_dropout", 0.0), scaling=config.get("mora_scaling", 1.0))
    plan = [(name, _check_target(model, name, M, adapter_name, r, mora_type, options, file), M)
            for name, M in matrices.items()]
    # PEFT narrows target_modules with these fields, which this check does not model: then the keys alone decide.
    narrowed = any(config.get(field) for field in ("layers_to_transform", "layers_pattern", "exclude_modules"))
    try:
        wanted = [] if narrowed else targets(model, config.get("target_modules") or [])
    except (TypeError, ValueError) as error:
        raise type(error)(f"{os.path.join(path, CONFIG_NAME)}: {error}") from None
    missing = [name for name, _ in wanted if name not in matrices]
    if missing:
        raise ValueError(
            f"{file}: the checkpoint's target_modules match {missing} in the model but it has no M for them"
        )
    return plan


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
                    dropout=getattr(module.dropouts[adapter_name], "p", 0.0))
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
    return [layer.base_layer.weight for _, layer in layers if layer.merged_adapters]


def _memory(tensor: torch.Tensor) -> tuple[tuple, int, int]:
    """``((device, storage address), first byte, end byte)`` of the memory a tensor's elements span."""
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    span = sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride())) + 1
    return (tensor.device, tensor.untyped_storage().data_ptr()), start, start + span * size


def check_not_shared(model: nn.Module, layers, operation: str) -> None:
    """Refuse to write into a base weight that another module (or another name) of ``model`` also holds.

    Tied weights (``lm_head`` and ``embed_tokens``) or any Parameter held twice would change the other holder
    too: merging an update there silently changes, for instance, the embedding.
    """
    holders = {}
    tensors = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        # Plain tensors only: a sharded (DTensor) or quantized weight has no single storage, and is never merged.
        if type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type != "meta" and tensor.numel():
            holders.setdefault(_memory(tensor)[0], []).append((name, tensor))
    for layer_name, layer in layers:
        weight = layer.base_layer.weight
        if weight.device.type == "meta" or not weight.numel():
            continue
        storage, start, end = _memory(weight)
        own = layer_name + "." if layer_name else ""
        # Views of one storage that touch other bytes (slices of a fused weight) are not shared.
        others = [name for name, tensor in holders.get(storage, [])
                  if not (tensor is weight and name.startswith(own))
                  and _memory(tensor)[1] < end and start < _memory(tensor)[2]]
        if others:
            raise ValueError(
                f"model: the base weight of layer {layer_name!r} is shared with {others} (tied weights); {operation} "
                "would change them too. Untie it first (layer.base_layer.weight = "
                "nn.Parameter(layer.base_layer.weight.detach().clone())) or keep the adapter unmerged"
            )


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
        with atomic(model, writes=[layer.base_layer.weight for layer, _, merged in before if merged]):
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
    inside the block makes the next forward raise.
    """
    check_model(model)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}")
    names = adapter_names_of(list(adapter_names), "adapter_names")
    layers = _check_known(_uncompiled(model), [name for name in names if name != BASE_ROW], "adapter_names")
    with row_selection(RowSelection(names, layers)):
        yield model


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
        try:
            check_base_layer(layer.base).check_merge(layer.base)
        except TypeError as error:
            raise TypeError(f"model: layer {name!r}: {error}") from None
    check_not_shared(model, folded, "merging")
    with atomic(model, writes=[layer.base.weight for _, layer in folded]):
        for name, layer, todo in plan:
            if todo:
                layer.merge(adapter_names=todo)
            set_submodule(model, name, layer.base)
    return model
