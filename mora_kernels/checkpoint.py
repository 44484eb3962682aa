"""The checkpoint format of the original MoRA release: read, check and write an adapter folder.

Used by the model-level API (``mora_kernels.adapters``) and by ``mora_kernels.peft_integration``.

Checkpoint format (the original release, a fork of PEFT 0.9): a folder with ``adapter_config.json``
(``"peft_type": "LORA"``, ``"r"``: the LoRA rank, ``"use_mora": true``, ``"mora_type"``, ``"target_modules"``, ...)
and ``adapter_model.safetensors`` holding, for each adapted Linear named ``<name>`` in the model,
``base_model.model.<name>.lora_A.weight`` and ``.lora_B.weight``: the same ``(R, R)`` matrix M twice. PEFT's
``target_parameters`` (one M per expert of a 3-D parameter, ``(experts, R, R)``) are keyed as PEFT keys them: by the
name of the parameter's wrapper (``<module>``, then ``<module>.base_layer``, ... where one module has several: they
nest). The original ignores ``lora_alpha`` (scaling 1); a scaling other than 1 is written as ``"mora_scaling"``,
and a checkpoint saved after ReMoRA restarts records ``"remora_restarts"``: fields only this package reads. PEFT's
``alpha_pattern`` scales single layers relative to the rest (``layer_scaling``; the original release has no
per-layer factor), and PEFT's ``rank_pattern`` gives single layers another ``r`` (``layer_r``); both are written
with one exact key per layer (``exact_pattern``). ``target_modules`` lists name suffixes (``["q_proj"]``) when they
select exactly the adapted layers, else full module names. Weights are read with safetensors (or
``torch.load(weights_only=True)`` for a ``.bin``): nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re

import torch

from .core import FLOAT_DTYPES, check_dropout, check_int, check_scaling, check_target_modules, mora_type_of
from .files import write_files

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."  # PEFT's prefix: PeftModel.base_model (LoraModel).model (the user's model)


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
    return check_config(config, file, allow_restarted, peft)


def check_config(config: dict, file: str, allow_restarted: bool = False, peft: bool = False) -> dict:
    """``read_config``'s checks of the fields of ``config`` (read from ``file``, which the errors name)."""
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
    if config.get("lora_bias"):
        raise ValueError(f"{file}: lora_bias={config['lora_bias']!r} is not supported with MoRA")
    if not isinstance(config.get("use_dora", False), bool):
        raise ValueError(f"{file}: use_dora must be true or false, got {config['use_dora']!r}")
    target_modules = config.get("target_modules")
    if target_modules is not None:
        if not isinstance(target_modules, (str, list)):
            raise ValueError(f"{file}: target_modules must be a regex str or a list of str, got {target_modules!r}")
        try:
            check_target_modules(target_modules)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{file}: {error}") from None
    target_parameters = config.get("target_parameters")
    if target_parameters is not None and (not isinstance(target_parameters, list)
                                          or not all(isinstance(t, str) for t in target_parameters)):
        raise ValueError(f"{file}: target_parameters must be a list of parameter names, got {target_parameters!r}")
    mora_type_of(config.get("mora_type", 1), f"{file}: mora_type")
    check_scaling(config.get("mora_scaling", 1.0), f"{file}: mora_scaling")
    check_alpha_pattern(config.get("alpha_pattern") or {}, config.get("lora_alpha", 8), file + ": ")
    check_rank_pattern(config.get("rank_pattern") or {}, file + ": ", ValueError)
    check_dropout(config.get("lora_dropout", 0.0), f"{file}: lora_dropout")
    restarts = check_int(config.get("remora_restarts", 0), f"{file}: remora_restarts", minimum=0, error=ValueError)
    if restarts and not allow_restarted:
        raise ValueError(
            f"{file}: saved after {restarts} ReMoRA restart(s): its M applies on top of base weights that hold the "
            "earlier cycles' updates, which this checkpoint does not contain. Load it onto those base weights and "
            "pass allow_restarted=True"
        )
    return config


def check_alpha_pattern(pattern, lora_alpha, where: str = "") -> None:
    """A valid ``alpha_pattern`` (module-name regex -> alpha) beside ``lora_alpha``, else a ValueError / TypeError."""
    if not isinstance(pattern, dict):
        raise TypeError(f"{where}alpha_pattern must be a dict of module-name patterns to alphas, got {pattern!r}")
    if not pattern:
        return
    check_scaling(lora_alpha, f"{where}lora_alpha")
    if lora_alpha == 0:
        raise ValueError(f"{where}alpha_pattern scales a layer by alpha / lora_alpha: lora_alpha must not be 0")
    for key, alpha in pattern.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}alpha_pattern: keys must be module-name patterns (str), got {key!r}")
        check_scaling(alpha, f"{where}alpha_pattern[{key!r}]")


def check_rank_pattern(pattern, where: str = "", error: type[Exception] | None = None) -> dict:
    """``pattern`` if it is a valid ``rank_pattern`` (module- or parameter-name regex -> positive int r), else a
    TypeError / ValueError naming it (``where`` says whose: a file, or nothing for an argument; ``error`` raises that
    class for both, as for a file's fields)."""
    if not isinstance(pattern, dict):
        raise (error or TypeError)(f"{where}rank_pattern must be a dict of module-name patterns to ranks r, got "
                                   f"{pattern!r}")
    for key, r in pattern.items():
        if not isinstance(key, str) or not key:
            raise (error or TypeError)(f"{where}rank_pattern: keys must be module-name patterns (non-empty str), "
                                       f"got {key!r}")
        try:
            re.compile(key)
        except re.error as problem:
            raise ValueError(f"{where}rank_pattern: key {key!r} is not a regex ({problem})") from None
        check_int(r, f"{where}rank_pattern[{key!r}]", error=error)
    return pattern


def pattern_key(pattern, name: str) -> str | None:
    """The key of ``pattern`` (``rank_pattern`` / ``alpha_pattern``) that decides for module or parameter ``name``,
    or None: PEFT's ``get_pattern_key`` rule, the first key whose regex matches the end of ``name`` at a dot
    boundary. (This module does not import PEFT, an optional dependency; tests compare the two.)"""
    return next((key for key in pattern if re.match(rf"(.*\.)?({key})$", name)), None)


def pattern_value(pattern: dict, name: str, default):
    """The value ``pattern`` gives module or parameter ``name`` (``pattern_key``), else ``default``."""
    key = pattern_key(pattern, name)
    return default if key is None else pattern[key]


def exact_pattern(values: dict[str, object]) -> dict[str, object]:
    """A pattern (``rank_pattern`` / ``alpha_pattern``) giving each module or parameter name of ``values`` its
    value under ``pattern_key``'s rule: every name escaped, and longer names first, since a key also matches the
    names it is a dot suffix of (``a.b`` matches ``c.a.b``) and the first matching key decides."""
    return {re.escape(name): values[name] for name in sorted(values, key=lambda name: -name.count("."))}


def layer_r(config: dict, name: str) -> int:
    """The ``r`` of module (or parameter) ``name`` under a checkpoint's ``config``: ``rank_pattern``'s, else ``r``."""
    return pattern_value(config.get("rank_pattern") or {}, name, config["r"])


def layer_scaling(mora_scaling: float, alpha: float, lora_alpha: float) -> float:
    """The update's factor on a layer whose alpha (``alpha_pattern``'s, else ``lora_alpha``) is ``alpha``.

    MoRA ignores ``lora_alpha`` as a factor (the original release; the factor is ``mora_scaling``), but a pattern
    keeps LoRA's meaning relative to the other layers: LoRA scales a layer by alpha / r, so alpha_pattern multiplies
    that layer's update by alpha / lora_alpha (for LoRA too, at equal r). A layer without a pattern gets
    ``mora_scaling`` exactly (alpha is lora_alpha).
    """
    return mora_scaling if alpha == lora_alpha else mora_scaling * alpha / lora_alpha


def config_scaling(config: dict, name: str) -> float:
    """The factor of module ``name``'s update under a checkpoint's ``config`` (``mora_scaling``, ``alpha_pattern``).

    ``alpha_pattern``'s keys match by ``pattern_key`` (PEFT's rule).
    """
    lora_alpha = config.get("lora_alpha", 8)
    alpha = pattern_value(config.get("alpha_pattern") or {}, name, lora_alpha)
    return layer_scaling(config.get("mora_scaling", 1.0), alpha, lora_alpha)


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


def read_matrices(path: str | os.PathLike, other_keys: bool = False) -> tuple[dict[str, torch.Tensor],
                                                                            dict[str, torch.Tensor]]:
    """``({module name in the model: M}, {module name: DoRA's magnitude vector})`` from the checkpoint's weights,
    read once; lora_A and lora_B must be equal; the vectors (PEFT's key ``<module>.lora_magnitude_vector``) are empty
    without DoRA.

    ``other_keys``: keys of the model (``base_model.model.``) that are not MoRA matrices (PEFT's ``modules_to_save``
    copies, biases) are left to the caller (the PEFT loaders; PEFT checks them) instead of refused."""
    file = weights_file(path)
    state = _read_weights(file)
    matrices, seconds, magnitudes = {}, {}, {}
    for key, tensor in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{file}: keys must be str, got {key!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            got = tensor.layout if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{file}: {key}: expected a dense tensor, got {got}")
        for part, into in ((".lora_A.weight", matrices), (".lora_B.weight", seconds),
                           (".lora_magnitude_vector", magnitudes)):
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
        if M.dim() not in (2, 3) or M.shape[-1] != M.shape[-2]:  # (experts, R, R): one M per expert
            raise ValueError(f"{file}: {name}.lora_A.weight must be a square (R, R) matrix (or (experts, R, R)), got "
                             f"{tuple(M.shape)}")
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
    for name, magnitude in magnitudes.items():
        if name not in matrices:
            raise ValueError(f"{file}: a DoRA magnitude vector for {name!r}, which has no M")
        if magnitude.dim() != 1 or (magnitude.dtype in FLOAT_DTYPES and not torch.isfinite(magnitude).all()):
            raise ValueError(f"{file}: {KEY_PREFIX}{name}.lora_magnitude_vector must be a finite vector, got "
                             f"shape {tuple(magnitude.shape)}")
    return matrices, magnitudes


def write_checkpoint(path: str | os.PathLike, config: dict, matrices: dict[str, torch.Tensor],
                     magnitudes: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``config`` and ``{module name: M}`` in the original release's format (safetensors), whole or not at all;
    DoRA's ``{module name: magnitude vector}`` under PEFT's key ``<module>.lora_magnitude_vector``.

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
    for name, magnitude in (magnitudes or {}).items():
        state[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = magnitude.detach().to("cpu").contiguous()
    try:
        config_bytes = (json.dumps(config, indent=2, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as error:
        raise ValueError(f"save_adapter: the config cannot be written as JSON ({error}); nothing written") from None
    weights_bytes = save(state, metadata={"format": "pt"})
    os.makedirs(path, exist_ok=True)
    write_files({os.path.join(path, WEIGHTS_NAME): weights_bytes, os.path.join(path, CONFIG_NAME): config_bytes})
