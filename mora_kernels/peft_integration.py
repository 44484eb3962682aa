"""MoRA through PEFT (0.21) without a fork.

PEFT's method registry is closed, so MoRA rides on LoRA: ``MoRAConfig`` is a ``LoraConfig`` with the original
release's fields ``use_mora`` and ``mora_type``, and it routes PEFT's layer creation to ``MoRAPeftLinear`` through
``LoraConfig._register_custom_module`` (experimental in PEFT, and not saved with the config). Every targeted
module goes to ``MoRAPeftLinear``, which adapts float Linear and transformers' Conv1D layers (``fan_in_fan_out``, set
from the layer as PEFT's LoRA does) and bitsandbytes / torchao quantized Linears, and refuses anything else
(``mora_kernels.bases.check_base_layer``); every parameter named by ``target_parameters`` (mixture-of-experts
weights) goes to ``ParamWrapper``, a weight parametrization with one M per expert (docs/peft.md#target-parameters).

``get_peft_model``, ``save_pretrained``, ``merge_and_unload``, ``disable_adapter``, ``set_adapter``,
``delete_adapter`` and ``adapter_names=`` (one adapter per row) then work as for LoRA, also with adapters on
different layers (a layer skips the active adapters it does not hold). ``mora_scaling`` is the update's factor
(``lora_alpha`` is ignored, as in the original); after ReMoRA restarts (``mora_kernels.remora``) the config holds
the type M trains for and ``remora_restarts``, and loading such a checkpoint needs ``allow_restarted=True``.
Upstream PEFT reads a MoRA folder's config as a ``LoraConfig`` (its registry knows LoRA only), dropping
``use_mora``; once this module is imported, PEFT's own loaders (``PeftModel.from_pretrained``,
``PeftModel.load_adapter``, ``AutoPeftModel*.from_pretrained``, transformers' ``load_adapter``) build a
``MoRAConfig`` for a folder whose config has ``use_mora`` true and load it exactly, with their own arguments.
``from_pretrained`` / ``load_adapter`` here add a check of the whole checkpoint against the model before it changes,
and ``allow_restarted``. The saved format is the original release's
(``mora_kernels.checkpoint``): ``lora_A.weight`` and ``lora_B.weight`` hold the same ``(R, R)`` matrix.
Which LoRA features work and which are refused (and why) is listed in docs/peft.md (its table) and tested side by
side with LoRA in tests/test_peft_parity.py.

Importing this module imports peft and wraps three of ``LoraModel``'s methods, for every ``LoraModel`` of the
process, once (LoRA adapters still run PEFT's own code): ``add_weighted_adapter`` (for MoRA adapters: the exact
sum, or PEFT's TIES / DARE / magnitude pruning applied to M where M is determined by its update),
``_create_and_replace`` (refuses MoRA and LoRA adapters on one layer) and ``_check_merge_allowed`` (a MoRA layer
whose base refuses a merge refuses before any layer is merged); and one of PEFT's config classmethods,
``PeftConfigMixin.from_peft_type`` (a saved config with ``use_mora`` true becomes a ``MoRAConfig``; every other
config is PEFT's own). ``import mora_kernels`` alone does not import this module (importing peft takes seconds and
imports triton). The rest of the package does not need peft.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import warnings

import torch
from peft import LoraConfig, PeftModel
from peft.config import PeftConfigMixin
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.lora import ParamWrapper as LoraParamWrapper
from peft.tuners.tuners_utils import check_adapters_to_merge, check_target_module_exists
from peft.utils import _freeze_adapter, merge_utils
from torch import nn

from . import experts as fused_experts
from .adapters import checked_plan
from .bases import LEFT_BY_PEFT, check_base_layer, keep_trainable
from .checkpoint import CONFIG_NAME, check_alpha_pattern, check_config, check_rank_pattern, layer_scaling, read_config
from .core import check_dropout, check_int, check_scaling, mora_type_of
from .layer import BASE_ROW, AdapterMixin, MoRAMatrix, dora_magnitude, parameter_update, with_delta
from .rollback import atomic, check_model


@dataclasses.dataclass
class MoRAConfig(LoraConfig):
    """``LoraConfig`` for MoRA: ``r`` is the LoRA rank whose budget MoRA matches, ``mora_type`` 1, 2, 3, 4, 6 or 7.

    As in the original release, ``lora_alpha`` is ignored and M starts at zero; the update's factor is
    ``mora_scaling`` (1 by default, as the original; ``mora_kernels.save_adapter`` writes it when it is not 1).
    ``init_lora_weights=False`` starts M random instead (for tests, as LoRA's): uniform in +-1/sqrt(3 in_features),
    which gives dW LoRA's variance at ``False``, 1/(9 in_features) per entry, for every type. ``rank_pattern``
    works as for LoRA; ``alpha_pattern`` multiplies a matched layer's update by its alpha / ``lora_alpha`` (LoRA's
    effect at equal r); LoRA options that MoRA has no meaning for are refused (see ``UNSUPPORTED``).
    """

    use_mora: bool = dataclasses.field(default=True, metadata={"help": "Always true: this config is MoRA."})
    mora_type: int = dataclasses.field(default=1, metadata={"help": "MoRA type: 1, 2, 3, 4, 6 or 7."})
    mora_scaling: float = dataclasses.field(default=1.0, metadata={"help": "Factor on the update (not lora_alpha)."})
    remora_restarts: int = dataclasses.field(
        default=0, metadata={"help": "ReMoRA restarts folded into the base weights before this M (set by restart)."}
    )

    def __post_init__(self):
        # MoRA's refusals first: LoraConfig's own checks of an option MoRA refuses would only mislead.
        for name, why in UNSUPPORTED.items():
            value = getattr(self, name)
            if value:
                raise ValueError(f"{name}={value!r} is not supported with MoRA: {why}")
        if self.init_lora_weights not in (True, False):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported with MoRA: its initialisations are "
                "built for LoRA's A and B; use True (M = 0, the original release) or False (a small random M)"
            )
        super().__post_init__()
        if self.use_mora is not True:
            raise ValueError(f"use_mora must be True for a MoRAConfig (use LoraConfig for LoRA), got {self.use_mora!r}")
        self.mora_type = int(mora_type_of(self.mora_type))
        self.lora_dropout = check_dropout(self.lora_dropout, "lora_dropout")
        self.mora_scaling = check_scaling(self.mora_scaling, "mora_scaling")
        check_alpha_pattern(self.alpha_pattern, self.lora_alpha)
        check_rank_pattern(self.rank_pattern)
        restarts = self.remora_restarts
        check_int(restarts, "remora_restarts", minimum=0, error=ValueError)
        # Every target goes to a MoRA layer, which refuses what it cannot adapt: no silent plain-LoRA fallback.
        self._register_custom_module({nn.Module: _mora_layer})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, allow_restarted=False, **kwargs):
        """The ``MoRAConfig`` saved in a local folder (``load_config``; ``kwargs`` override its fields).

        PEFT's own ``from_pretrained`` builds a ``LoraConfig`` and drops ``use_mora`` and ``mora_type``.
        """
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"MoRAConfig.from_pretrained: unknown argument(s) {unknown} (only local folders are read)")
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        return load_config(path, allow_restarted, **kwargs)


_ALPHA_UNUSED = "MoRA ignores lora_alpha (the update's factor is mora_scaling)"
_LORA_VARIANT = "a variant of LoRA's A and B"
# LoraConfig fields that mean nothing for MoRA: set, they would be silently ignored, so they are refused.
UNSUPPORTED = {
    "use_qalora": _LORA_VARIANT,
    "use_bdlora": _LORA_VARIANT,
    "alora_invocation_tokens": _LORA_VARIANT,
    "arrow_config": _LORA_VARIANT,
    "velora_config": _LORA_VARIANT,
    "monteclora_config": _LORA_VARIANT,
    "kasa_config": _LORA_VARIANT,
    "lora_bias": "MoRA trains M only",
    "use_rslora": _ALPHA_UNUSED,
}


def _mora_layer(target: nn.Module, adapter_name: str, config: MoRAConfig, parameter_name: str | None = None,
                **kwargs) -> nn.Module:
    """PEFT's custom-module dispatch for MoRA: a parameter named by ``target_parameters`` (PEFT passes its name)
    goes to ``ParamWrapper``, every module to ``MoRAPeftLinear``."""
    if parameter_name is not None:
        return ParamWrapper(target, adapter_name, parameter_name=parameter_name, config=config, **kwargs)
    return MoRAPeftLinear(target, adapter_name, config, **kwargs)


class _MoRAPeftLayer:
    """What both PEFT layers of MoRA share: ``lora_A[name]`` is the adapter's ``MoRAMatrix`` and ``lora_B[name]``
    the same module (the original release's layout, so that both keys are saved)."""

    def mora_adapter(self, name: str) -> MoRAMatrix:
        return self.lora_A[name]

    def mora_scaling(self, name: str) -> float:
        return self.scaling[name]

    # PEFT's LoRA sets these from lora_alpha / r, which MoRA does not use: here they start from the adapter's own
    # scaling (mora_scaling, times alpha_pattern's factor), as diffusers' set_adapters(weights) expects.
    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.lora_A:
            self.scaling[adapter] = scale * self.lora_A[adapter].base_scaling

    def unscale_layer(self, scale: float | None = None) -> None:
        for name in [name for name in self.active_adapters if name in self.lora_A]:
            if scale is None:
                self.scaling[name] = self.lora_A[name].base_scaling
            else:
                self.scaling[name] /= scale

    def _new_matrix(self, adapter_name: str, r: int, lora_alpha, config, weight: torch.Tensor,
                    experts: int | None = None) -> MoRAMatrix:
        """A new adapter's M (zero, or random with ``init_lora_weights=False``) and its factor, stored under PEFT's
        keys; ``weight`` is the adapted weight (M's dtype and device follow it)."""
        # As LoRA's A and B: made in a 16-bit base's dtype, which PEFT's autocast_adapter_dtype (on by default)
        # lifts to float32, the original release's dtype for M; float32 (not float64) on wider bases, as the
        # original and its checkpoints (the forward computes in float64 for a float64 base all the same).
        dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
        matrix = MoRAMatrix(self.in_features, self.out_features, r, config.mora_type, dtype, weight.device, experts)
        if config.init_lora_weights is False:
            with torch.no_grad():
                bound = 1 / math.sqrt(3 * self.in_features)
                matrix.weight.uniform_(-bound, bound)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        # The original release ignores lora_alpha; alpha_pattern (PEFT passes this layer's alpha as lora_alpha)
        # scales a layer relative to the others as in LoRA, by alpha / config.lora_alpha (docs/peft.md#alpha-pattern).
        matrix.base_scaling = layer_scaling(config.mora_scaling, lora_alpha, config.lora_alpha)
        self.scaling[adapter_name] = matrix.base_scaling
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        matrix.restarts = config.remora_restarts
        self.lora_A[adapter_name] = matrix
        self.lora_B[adapter_name] = matrix
        return matrix

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # PEFT calls this after a low_cpu_mem_usage load; its cast to the base's dtype would round a float32 M
        # through bfloat16 before autocast lifts it back. M (and DoRA's vector) keep their dtype and move only.
        device = self._adapted_weight().device if device is None else device
        for modules in (self.lora_A, self.lora_magnitude_vector):
            if adapter_name in modules:
                modules[adapter_name].to(device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # lora_A and lora_B are one module here: loading both would silently keep lora_B's tensor.
        for name in self.lora_A:
            a, b = (state_dict.get(f"{prefix}{part}.{name}.weight") for part in ("lora_A", "lora_B"))
            if a is not None and b is not None and not torch.equal(a, b):
                raise ValueError(
                    f"{prefix}lora_A.{name}.weight and lora_B.{name}.weight differ; a MoRA checkpoint holds the "
                    "same M under both keys"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _check_mora_config(config, adapter_name: str) -> None:
    if not getattr(config, "use_mora", False):
        raise ValueError(
            f"adapter {adapter_name!r}: this layer holds MoRA adapters; a LoRA adapter cannot be added to it"
        )


class MoRAPeftLinear(_MoRAPeftLayer, AdapterMixin, nn.Module, LoraLayer):
    """PEFT's layer for MoRA on a module: ``lora_A[name]`` is the adapter's ``MoRAMatrix``, and ``lora_B[name]`` is
    the same module (the original release's layout, so that both keys are saved)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: MoRAConfig, r=None, lora_alpha=None, **kwargs
    ):
        try:
            kind = check_base_layer(base_layer)
        except TypeError as error:  # PEFT passes the module's name as target_name
            name = kwargs.get("target_name")
            raise TypeError(f"target_modules: module {name!r} cannot be adapted: {error}") from None
        if config.fan_in_fan_out != kind.transposed:
            # PEFT's LoRA rule: the layer decides (Conv1D stores (in, out)); warn and correct the config likewise.
            warnings.warn(
                f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module is a {kind.name}; setting "
                f"fan_in_fan_out to {kind.transposed}"
            )
            config.fan_in_fan_out = kind.transposed
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = kind.transposed
        keep_trainable(self.get_base_layer())
        self.backend = "auto"
        self._active_adapter = adapter_name
        # PEFT passes this layer's r from rank_pattern (config.r elsewhere)
        r = config.r if r is None else r
        self.update_layer(adapter_name, r, lora_alpha=config.lora_alpha if lora_alpha is None else lora_alpha,
                          config=config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha, config, **kwargs) -> None:
        _check_mora_config(config, adapter_name)
        check_dropout(config.lora_dropout, "lora_dropout")
        matrix = self._new_matrix(adapter_name, r, lora_alpha, config, self.get_base_layer().weight)
        self.use_dora[adapter_name] = bool(config.use_dora)
        if config.use_dora:  # PEFT's own place and key for DoRA's vector: lora_magnitude_vector.<name>.weight
            self.lora_magnitude_vector[adapter_name] = dora_magnitude(self.get_base_layer(), matrix,
                                                                      self.scaling[adapter_name])
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- the accessors AdapterMixin needs (merged_adapters, active_adapters, disable_adapters come from PEFT;
    # mora_adapter and mora_scaling from _MoRAPeftLayer)
    def mora_dropout(self, name: str) -> nn.Module:
        return self.lora_dropout[name]

    def mora_adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def mora_magnitude(self, name: str) -> nn.Parameter | None:
        return self.lora_magnitude_vector[name].weight if name in self.lora_magnitude_vector else None

    def _adapted_weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        # PEFT's habits: warn about merged adapters and skip them; skip adapters that sit on other layers.
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]
        if names:
            super().merge(safe_merge, names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        super().unmerge()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * dW`` laid out as the base weight (PEFT's convention): ``(in, out)`` for a Conv1D."""
        delta = self.lora_A[adapter].delta_weight(self.scaling[adapter])
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            # PEFT checked the names against the model's adapters; rows of adapters held elsewhere use the base here.
            adapter_names = [name if name in self.lora_A else BASE_ROW for name in adapter_names]
        if self.disable_adapters and self.merged:
            self.unmerge()
        return self._adapted(x, self.base_layer(x, *args, **kwargs), adapter_names)

    def __repr__(self) -> str:
        return "mora." + super().__repr__()


class ParamWrapper(_MoRAPeftLayer, LoraParamWrapper):
    """PEFT's layer for MoRA on a parameter named by ``target_parameters``: a weight parametrization, as PEFT's
    ``lora.ParamWrapper`` (its subclass; PEFT finds an existing wrapper, to add an adapter or nest another, by the
    class name ``ParamWrapper``). While the wrapped module runs, its parameter reads ``W + s dW(M)``.

    A 3-D parameter holds ``E`` experts, ``(E, out, in)``, or ``(E, in, out)`` where the module says
    ``is_transposed`` (PEFT's reading); its adapter's M is ``(E, R, R)`` and expert e's weight becomes
    ``W_e + s dW(M_e)``. A 2-D parameter ``(out, in)`` gets one ``(R, R)`` M, as a Linear. The update reaches the
    weight whole, so the module's routing is untouched and M_e gets the gradient of the tokens routed to expert e.
    On the experts modules ``mora_kernels.experts`` supports, where this wrapper and those inside it are MoRA's on
    the expert projections, the forward runs fused instead: the routed rows go through one ``mora_mixed`` per
    parameter and adapter, no weight is parametrized, no ``s dW`` is built, and ``adapter_names=`` (one adapter per
    sequence) works. ``fuse = False`` on a wrapper keeps it, and the wrappers around it, on the parametrization
    (wrappers inside a parametrizing one still run fused, on its parametrized weight). Refused as for PEFT's LoRA:
    ``lora_dropout`` (it would act on x, which the weight never sees), ``fan_in_fan_out``, ``use_dora``, and on the
    parametrization ``adapter_names=`` (one weight serves the whole batch).
    """

    def update_layer(self, adapter_name: str, r: int, lora_alpha, config, **kwargs) -> None:
        _check_mora_config(config, adapter_name)
        self.backend = getattr(self, "backend", "auto")  # the fused path's mora_mixed backend, as MoRAPeftLinear's
        self.fuse = getattr(self, "fuse", True)  # False: the parametrization, even where the fused path could run
        if config.lora_dropout:  # PEFT's own refusal, checked in __init__ only for the first adapter
            raise ValueError(f"lora_dropout={config.lora_dropout!r}: a parameter's update cannot drop x's entries; "
                             "use 0 with target_parameters")
        # PEFT's reading of the parameter's layout: (E, in, out) where the module says is_transposed, else
        # (E, out, in); in_features and out_features from __init__ take the first, so they are swapped once.
        self._experts_out_first = self._param_ndim == 3 and not getattr(self.get_base_layer(), "is_transposed", False)
        if self._experts_out_first and not self._did_swap_in_out_features:
            self.in_features, self.out_features = self.out_features, self.in_features
            self._did_swap_in_out_features = True
        experts = self.num_experts if self._param_ndim == 3 else None
        self._new_matrix(adapter_name, r, lora_alpha, config, self.get_param(), experts)
        self.use_dora[adapter_name] = False
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _adapted_weight(self) -> torch.Tensor:
        return self.get_param()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        chain = self._fused_chain()
        if chain is None:
            return super().forward(x, *args, **kwargs)
        # The experts' own forward with every wrapper's adapters inside it (mora_kernels.experts): this wrapper
        # and the ParamWrappers it wraps (PEFT nests one per parameter) are applied here, in one pass, and the inner
        # wrappers' forward never runs, so nothing is parametrized and no s dW is built.
        adapter_names = kwargs.pop("adapter_names", None)
        experts = self.get_base_layer()
        for wrapper in chain:  # what PEFT's forward does for each wrapper on its way down
            if wrapper.disable_adapters and wrapper.merged:
                wrapper.unmerge()
        hidden, index, weights = fused_experts.routing_of(experts, (x, *args), kwargs)
        updates = {w.parameter_name: w._experts_updates(adapter_names, hidden.shape[0]) for w in chain}
        updates = {name: terms for name, terms in updates.items() if terms}
        if not updates:
            return experts(x, *args, **kwargs)
        return fused_experts.experts_forward(experts, hidden, index, weights, updates, self.backend)

    def _fused_chain(self) -> list[ParamWrapper] | None:
        """This wrapper and the ParamWrappers below it, when all are MoRA's on the expert projections of an experts
        module that ``mora_kernels.experts`` supports; None otherwise (then the parametrization runs)."""
        chain, module = [], self
        while isinstance(module, LoraParamWrapper):
            if not isinstance(module, ParamWrapper) or module._param_ndim != 3 or not module.fuse:
                return None
            chain.append(module)
            module = module.base_layer
        return chain if fused_experts.unsupported(module, [w.parameter_name for w in chain]) is None else None

    def _experts_updates(self, adapter_names, tokens: int) -> list[fused_experts.Update]:
        """This wrapper's terms for ``experts_forward``: each active adapter (PEFT's rule: nothing when disabled or
        merged), or with ``adapter_names`` (one per sequence of the batch, whose tokens the MoE block flattened in
        order) one term per group of adapters sharing geometry and dtype, each token using its sequence's."""
        if self.disable_adapters or (adapter_names is None and self.merged):
            return []
        if adapter_names is not None and self.merged:
            raise ValueError("adapter_names: a batch with an adapter per row needs every adapter unmerged first")
        active = [name for name in self.active_adapters if name in self.lora_A]
        return fused_experts.terms(self.lora_A, self.scaling, active, adapter_names, tokens, self.get_param().device)

    def get_delta_weight(self, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scaling * dW`` laid out as the parameter (PEFT's convention), in float32 or float64 (``dtype`` float64
        or M float64): ``(E, out, in)`` or ``(E, in, out)`` by expert, ``(out, in)`` for a 2-D parameter."""
        param = self.get_param()
        delta = self.lora_A[adapter_name].delta_weight(self.scaling[adapter_name], dtype or param.dtype)
        if self._param_ndim == 3 and not self._experts_out_first:
            delta = delta.transpose(-2, -1)
        return delta.to(param.device)

    @contextlib.contextmanager
    def _activate_lora(self, active_adapters: list[str]):
        # PEFT's, with the sum of the active adapters' s dW always materialized (PEFT's factored proxy for one
        # adapter is LoRA's B A), through the package's parametrization (layer.parameter_update: cast to the
        # parameter's dtype but for float8, added in the wider dtype as PEFT's proxy adds it).
        adapters = [name for name in active_adapters if name in self.lora_A]
        if not adapters:
            yield
            return
        delta = sum(self.get_delta_weight(name) for name in adapters)
        with parameter_update(self.get_base_layer(), self.parameter_name, delta):
            yield

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """``W += s dW`` per adapter, computed in float32 (float64 for a float64 parameter) and rounded once to the
        parameter's dtype; ``safe_merge`` refuses a non-finite result and leaves W untouched."""
        for name in [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]:
            self._add_delta(name, 1.0, safe_merge)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            self._add_delta(self.merged_adapters.pop(), -1.0, False)

    def _add_delta(self, name: str, sign: float, finite_only: bool) -> None:
        param = self.get_param()
        delta = sign * self.get_delta_weight(name)
        param.data.copy_(with_delta(param.data, delta, finite_only, f"adapter {name!r} on {self.parameter_name}"))

    def __repr__(self) -> str:
        return "mora." + super().__repr__().removeprefix("lora.")


def load_config(path: str | os.PathLike, allow_restarted: bool = False, **overrides) -> MoRAConfig:
    """The ``MoRAConfig`` of a saved MoRA adapter (this package's or the original release's).

    Read from ``adapter_config.json`` directly, since PEFT drops ``use_mora`` and ``mora_type``; keys that this
    PEFT's LoraConfig does not know (fields of older versions) are dropped, as PEFT does. A checkpoint saved after
    ReMoRA restarts needs ``allow_restarted=True`` (see ``mora_kernels.checkpoint.read_config``).
    """
    raw = {**read_config(path, allow_restarted, peft=True), **overrides}
    return _config_from(raw, os.path.join(path, CONFIG_NAME))


def _config_from(raw: dict, where: str) -> MoRAConfig:
    """``MoRAConfig`` of the checked fields ``raw`` (of ``where``, which errors name)."""
    if not raw.get("target_modules") and not raw.get("target_parameters"):
        # PEFT injects by target_modules / target_parameters, not by the checkpoint's keys
        raise ValueError(f"{where}: target_modules and target_parameters are both missing or empty")
    known = {f.name for f in dataclasses.fields(MoRAConfig) if f.init and f.name != "peft_type"}
    try:
        return MoRAConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError, NotImplementedError) as error:  # LoraConfig's own checks do not name the file
        raise ValueError(f"{where}: {error}") from None


def from_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    allow_restarted: bool = False,
    **kwargs,
) -> PeftModel:
    """``PeftModel.from_pretrained`` for a MoRA adapter folder; ``kwargs`` go to it (``low_cpu_mem_usage``,
    ``autocast_adapter_dtype``, ...).

    The checkpoint is checked against ``model`` first (``lora_A == lora_B`` too, bit for bit); a failure inside PEFT
    puts ``model`` back as it was.
    """
    config = load_config(path, allow_restarted)
    _checked_before_load(check_model(model), path, config, allow_restarted, adapter_name)
    with atomic(model):
        return PeftModel.from_pretrained(
            model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
        )


def load_adapter(
    peft_model: PeftModel,
    path: str | os.PathLike,
    adapter_name: str,
    is_trainable: bool = False,
    allow_restarted: bool = False,
    low_cpu_mem_usage: bool = False,
    autocast_adapter_dtype: bool = True,
    **kwargs,
):
    """``peft_model.load_adapter`` for a MoRA adapter folder (one more adapter on the same model); ``kwargs`` go to
    it. All or nothing: the checkpoint is checked (``lora_A == lora_B`` too) before the model changes, and a failure
    inside PEFT puts the model back as it was."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    config = load_config(path, allow_restarted, inference_mode=not is_trainable)
    _checked_before_load(peft_model.base_model.model, path, config, allow_restarted, adapter_name)
    with atomic(peft_model):
        peft_model.add_adapter(
            adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype
        )
        return peft_model.load_adapter(
            path, adapter_name=adapter_name, is_trainable=is_trainable, low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype, **kwargs
        )


def _checked_before_load(model: nn.Module, path, config: MoRAConfig, allow_restarted: bool, adapter_name: str):
    """The whole checkpoint checked against the model's Linear targets before it changes. With target_parameters
    (its keys name the parameters' wrappers, which exist only once PEFT has injected them) each M's shape is
    checked as it loads (``MoRAMatrix.check_loaded``), and a refusal puts the model back (``atomic``)."""
    if not config.target_parameters:
        checked_plan(model, path, read_config(path, allow_restarted, peft=True), adapter_name, other_keys=True)


# --- LoraModel methods that would go wrong for MoRA adapters (lora_A and lora_B are one module holding M). PEFT's
# registry is closed, so they are wrapped here: LoRA adapters still run PEFT's own code (only checked not to land on
# a MoRA layer).
def _is_mora(config) -> bool:
    return getattr(config, "use_mora", False) is True


def _one_kind_per_layer(create_and_replace):
    """MoRA and LoRA adapters cannot share a layer: PEFT would call a LoRA layer's own ``update_layer`` with a
    MoRAConfig and silently add plain LoRA (the other order reaches ``MoRAPeftLinear.update_layer``, which refuses).
    On the first layer of an injection every layer the config targets is checked, so a refusal changes nothing."""

    @functools.wraps(create_and_replace)
    def wrapper(self, lora_config, adapter_name, target, *args, **kwargs):
        layers = [(key, module) for key, module in self.model.named_modules() if isinstance(module, LoraLayer)]
        first = not any(adapter_name in module.lora_A for _, module in layers)  # this injection's first layer
        if first and lora_config.target_modules is not None:
            for key, module in layers:
                _check_kind(module, lora_config, adapter_name, key, check_target_module_exists(lora_config, key))
        _check_kind(target, lora_config, adapter_name, kwargs.get("current_key"), True)
        return create_and_replace(self, lora_config, adapter_name, target, *args, **kwargs)

    return wrapper


def _bases_mergeable_first(check_merge_allowed):
    """``merge_adapter`` and ``merge_and_unload`` merge layer by layer after this check: a MoRA layer whose base
    refuses a merge (``mora_kernels.bases``: torchao, bitsandbytes 4-bit rows of partial blocks on a CPU) refuses here,
    before any layer changes."""

    @functools.wraps(check_merge_allowed)
    def wrapper(self):
        check_merge_allowed(self)
        for module in self.model.modules():
            if isinstance(module, MoRAPeftLinear):
                base = module.get_base_layer()
                check_base_layer(base).check_merge(base)

    return wrapper


def _check_kind(module, config, adapter_name: str, key, targeted) -> None:
    held = isinstance(module, _MoRAPeftLayer)
    if targeted and isinstance(module, LoraLayer) and held != _is_mora(config):
        # a LoRA layer met by a MoRA config is most often one left by a failed plain-PEFT load of this adapter
        left = "" if held else f"; if it was not added on purpose: {LEFT_BY_PEFT}"
        raise ValueError(
            f"adapter {adapter_name!r}: layer {key!r} holds {'MoRA' if held else 'LoRA'} adapters; MoRA and LoRA "
            f"adapters cannot share a layer (target other layers){left}"
        )


# combination_type -> (PEFT's merge of stacked task tensors, the options it takes). MoRA's task tensor on a layer is
# s_i M_i, the coordinates of s_i dW_i (what LoRA's get_delta_weight gives) in M's space, and the weights w_i enter
# PEFT's merge as they enter its "*_svd" merges of LoRA's delta weights: after pruning and sign election. The
# linear types need no option: dW is linear in M, so they are all the exact sum sum_i w_i s_i M_i.
_MERGES = {
    "svd": (merge_utils.task_arithmetic, ()),
    "linear": (merge_utils.task_arithmetic, ()),
    "cat": (merge_utils.task_arithmetic, ()),
    "ties": (merge_utils.ties, ("density", "majority_sign_method")),
    "dare_linear": (merge_utils.dare_linear, ("density",)),
    "dare_ties": (merge_utils.dare_ties, ("density", "majority_sign_method")),
    "magnitude_prune": (merge_utils.magnitude_prune, ("density",)),
}


def _weighted_mora(add_weighted_adapter):
    """``add_weighted_adapter`` for MoRA adapters of one type, r and rank_pattern (the same M shape and maps on
    every layer), through PEFT's own merges (``peft.utils.merge_utils``) applied to M: on each layer the task tensors
    are ``s_i M_i`` (``s_i`` the adapter's ``mora_scaling``), merged with the weights ``w_i``, and the result ``T``
    becomes ``M = T / s`` (``s`` the first adapter's ``mora_scaling``), so the new adapter's update is ``dW(T)``.
    ``linear``, ``cat`` and ``svd`` give the exact ``sum_i w_i s_i dW_i`` (dW is linear in M), the sum LoRA's
    ``cat`` (exact) and ``svd`` / ``linear`` (approximations) aim at. ``ties``, ``dare_linear``, ``dare_ties`` and
    ``magnitude_prune`` prune and elect signs entry by entry, which is a merge of the updates only where M is
    determined by its update: on a layer with ``R > min(in, out)`` they are refused (docs/design.md#one-to-one).
    Refused too: the ``*_svd`` pruning types (they prune dW's entries, then refit low-rank factors MoRA has not),
    options a type does not use, mixes of MoRA and LoRA adapters, of types, r, rank_pattern, and ReMoRA restarts.
    With one adapter PEFT merges ``linear`` whatever the type; so does this. Everything is checked before the model
    changes; the merges run in float64 and round once to M's dtype."""

    @functools.wraps(add_weighted_adapter)
    def wrapper(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None, svd_clamp=None,
                svd_full_matrices=True, svd_driver=None, density=None, majority_sign_method="total"):
        configs = [self.peft_config.get(name) for name in adapters] if isinstance(adapters, (list, tuple)) else []
        if not any(_is_mora(config) for config in configs):
            return add_weighted_adapter(
                self, adapters, weights, adapter_name, combination_type=combination_type, svd_rank=svd_rank,
                svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, density=density,
                majority_sign_method=majority_sign_method,
            )
        weights = _check_weights(weights, len(adapters))
        if not all(_is_mora(config) for config in configs):
            raise ValueError(f"adapters: {list(adapters)} mixes MoRA and LoRA (or unknown) adapters; combine one kind")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name: an adapter {adapter_name!r} exists already")
        merge, options = _merge_of(combination_type, density, majority_sign_method)
        settings = {(int(c.mora_type), c.r, tuple(sorted(c.rank_pattern.items())), c.remora_restarts) for c in configs}
        if len(settings) != 1:
            raise ValueError(
                f"adapters: MoRA adapters combine exactly only with one mora_type, r and rank_pattern (the same M "
                f"shape and maps on every layer) and no ReMoRA restarts; got (type, r, rank_pattern, restarts) "
                f"{sorted(settings)}"
            )
        ((_, r, _, restarts),) = settings
        if restarts:
            raise ValueError("adapters: after ReMoRA restarts an adapter's M is not its whole update; not combined")
        dora = [name for name, config in zip(adapters, configs) if config.use_dora]
        if dora:
            raise ValueError(f"adapters: {dora} use DoRA, whose update is not linear in M (each row is rescaled to its "
                             "magnitude); a weighted combination of M would not combine the updates")
        if svd_rank not in (None, r) or svd_clamp is not None:
            raise ValueError(
                f"svd_rank={svd_rank!r}, svd_clamp={svd_clamp!r}: a MoRA combination is computed on M at the "
                f"adapters' r={r} (no SVD); leave them at None"
            )
        scaling = configs[0].mora_scaling
        if scaling == 0:
            raise ValueError(f"adapters: {adapters[0]!r} has mora_scaling 0, so no M gives the weighted sum")
        if len(adapters) == 1:  # PEFT's rule for LoRA: one adapter is merged "linear" whatever the type
            merge, options = merge_utils.task_arithmetic, {}
        # PEFT's own checks (unknown adapters, shared modules_to_save); its target union is replaced below.
        self._check_add_weighted_adapter(adapters=adapters, combination_type="linear", svd_rank=None)
        layers = []
        for key, layer in self.model.named_modules():
            if isinstance(layer, MoRAPeftLinear) and any(name in layer.lora_A for name in adapters):
                held = [(w, layer.scaling[name], layer.lora_A[name]) for name, w in zip(adapters, weights)
                        if name in layer.lora_A]
                geometries = {m.geo for _, _, m in held}
                if len(geometries) != 1:
                    raise ValueError(f"adapters: they have different square sizes or types on layer {key!r}")
                (geo,) = geometries
                if merge is not merge_utils.task_arithmetic and not geo.one_to_one:
                    raise ValueError(
                        f"combination_type={combination_type!r} is refused on layer {key!r} (mora_type {int(geo.t)}, "
                        f"in_features={geo.n}, out_features={geo.m}, R={geo.R}): with R > min(in_features, "
                        "out_features) different M give the same update, so pruning M's entries is not a merge of "
                        "the updates (docs/design.md#one-to-one). Use 'linear' (exact), or a smaller r on this layer "
                        "(rank_pattern)"
                    )
                layers.append((key, held))
        # Merged after every check (DARE draws its masks from torch's RNG, layer by layer in module order).
        combined = {}
        for key, held in layers:
            tasks = [s * m.weight.detach().double() for _, s, m in held]  # float64: one rounding to M's dtype
            ws = torch.tensor([w for w, _, _ in held], dtype=torch.float64, device=tasks[0].device)
            combined[key] = merge(tasks, ws, **options) / scaling
        # the new adapter sits exactly on the layers that hold one of the adapters (a regex of their full names)
        self.peft_config[adapter_name] = dataclasses.replace(
            configs[0], target_modules="|".join(map(re.escape, sorted(combined))), layers_to_transform=None,
            layers_pattern=None, exclude_modules=None, init_lora_weights=True,
            alpha_pattern={},  # the per-layer factors are in the combined M: every layer of it has the factor s
        )
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        _freeze_adapter(self.model, adapter_name)
        with torch.no_grad():
            for key, M in combined.items():
                matrix = self.model.get_submodule(key).lora_A[adapter_name]
                matrix.weight.copy_(M)

    return wrapper


def _merge_of(combination_type, density, majority_sign_method):
    """PEFT's merge for ``combination_type`` and its checked options (PEFT itself raises a TypeError for
    ``density=None``, only warns for ``density > 1``, and checks the sign method only when it gets there)."""
    if not isinstance(combination_type, str) or combination_type not in _MERGES:
        pruned = combination_type.removesuffix("_svd") if isinstance(combination_type, str) else None
        hint = (f" ('*_svd' types prune dW's entries and refit LoRA's two factors, which MoRA has not; use "
                f"{pruned!r}: it prunes M, which determines the update)" if pruned in _MERGES else "")
        raise ValueError(
            f"combination_type={combination_type!r} is not supported for MoRA adapters: expected one of "
            f"{sorted(_MERGES)}{hint}"
        )
    merge, takes = _MERGES[combination_type]
    if "density" in takes:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(
                f"density={density!r}: combination_type={combination_type!r} needs the fraction of M's entries to "
                "keep, a number in (0, 1]"
            )
    elif density is not None:
        raise ValueError(
            f"density={density!r}: combination_type={combination_type!r} prunes nothing (the exact sum); leave it "
            "at None"
        )
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={majority_sign_method!r}: expected 'total' or 'frequency'")
    if majority_sign_method != "total" and "majority_sign_method" not in takes:
        raise ValueError(
            f"majority_sign_method={majority_sign_method!r}: combination_type={combination_type!r} elects no sign "
            "(only 'ties' and 'dare_ties' do); leave it at 'total'"
        )
    values = {"density": float(density) if density is not None else None, "majority_sign_method": majority_sign_method}
    return merge, {name: values[name] for name in takes}


def _check_weights(weights, count: int) -> list[float]:
    if not isinstance(weights, (list, tuple)) or len(weights) != count:
        raise ValueError(f"weights must be a list of {count} numbers (one per adapter), got {weights!r}")
    return [check_scaling(w, "weights") for w in weights]


def _mora_configs_as_mora(from_peft_type):
    """PEFT builds every saved adapter config through ``PeftConfigMixin.from_peft_type(**fields)``: its
    ``PeftConfig`` / ``LoraConfig.from_pretrained`` end there, and ``PeftModel.from_pretrained``,
    ``PeftModel.load_adapter``, ``AutoPeftModel*.from_pretrained`` and transformers' ``load_adapter`` read the
    folder with them. The class comes from ``peft_type`` alone: ``LoraConfig`` for a MoRA adapter (peft_type
    LORA), which drops ``use_mora`` and ``mora_type``, and the load then fails on the ``(R, R)`` shapes. Fields with
    ``use_mora`` true (this package's and the original release's configs) build a ``MoRAConfig`` here, checked as
    ``load_config`` checks a file; every other config runs PEFT's own code."""

    @functools.wraps(from_peft_type)
    def wrapper(cls, **kwargs):
        if kwargs.get("peft_type") != "LORA" or kwargs.get("use_mora") is not True:
            return from_peft_type(cls, **kwargs)
        where = f"{CONFIG_NAME} (a MoRA adapter, use_mora true)"
        try:
            return _config_from(check_config(dict(kwargs), where, peft=True), where)
        except ValueError as error:
            if not kwargs.get("remora_restarts"):
                raise
            raise ValueError(
                f"{error} (PEFT's loaders cannot pass it: load with "
                "mora_kernels.peft_integration.from_pretrained(model, path, allow_restarted=True))"
            ) from None

    return classmethod(wrapper)


if not getattr(LoraModel.add_weighted_adapter, "_mora", False):  # once, even if this module is reloaded
    LoraModel.add_weighted_adapter = _weighted_mora(LoraModel.add_weighted_adapter)
    LoraModel._create_and_replace = _one_kind_per_layer(LoraModel._create_and_replace)
    LoraModel._check_merge_allowed = _bases_mergeable_first(LoraModel._check_merge_allowed)
    PeftConfigMixin.from_peft_type = _mora_configs_as_mora(PeftConfigMixin.__dict__["from_peft_type"].__func__)
    LoraModel.add_weighted_adapter._mora = True
