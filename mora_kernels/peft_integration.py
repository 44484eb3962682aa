"""MoRA through PEFT (0.21) without a fork.

PEFT's method registry is closed, so MoRA rides on LoRA: ``MoRAConfig`` is a ``LoraConfig`` with the original
release's fields ``use_mora`` and ``mora_type``, and it routes PEFT's layer creation to ``MoRAPeftLinear`` through
``LoraConfig._register_custom_module`` (experimental in PEFT, and not saved with the config). Every targeted
module goes to ``MoRAPeftLinear``, which adapts float Linear and transformers' Conv1D layers (``fan_in_fan_out``, set
from the layer as PEFT's LoRA does) and bitsandbytes / torchao quantized Linears, and refuses anything else
(``mora_kernels.bases.check_base_layer``).

``get_peft_model``, ``save_pretrained``, ``merge_and_unload``, ``disable_adapter``, ``set_adapter``,
``delete_adapter`` and ``adapter_names=`` (one adapter per row) then work as for LoRA, also with adapters on
different layers (a layer skips the active adapters it does not hold). ``mora_scaling`` is the update's factor
(``lora_alpha`` is ignored, as in the original); after ReMoRA restarts (``mora_kernels.remora``) the config holds
the type M trains for and ``remora_restarts``, and loading such a checkpoint needs ``allow_restarted=True``.
Upstream PEFT drops ``use_mora`` when it reads a config, so load with ``from_pretrained`` / ``load_adapter`` here
(or pass ``config=load_config(path)`` to ``PeftModel.from_pretrained``). The saved format is the original release's
(``mora_kernels.adapters``): ``lora_A.weight`` and ``lora_B.weight`` hold the same ``(R, R)`` matrix.

Importing this module imports peft; the rest of the package does not need it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .adapters import read_config
from .core import check_dropout, check_scaling, mora_type_of
from .bases import keep_trainable
from .layer import BASE_ROW, AdapterMixin, MoRAMatrix, check_base_layer


@dataclasses.dataclass
class MoRAConfig(LoraConfig):
    """``LoraConfig`` for MoRA: ``r`` is the LoRA rank whose budget MoRA matches, ``mora_type`` 1, 2, 3, 4, 6 or 7.

    As in the original release, ``lora_alpha`` is ignored and M starts at zero; the update's factor is
    ``mora_scaling`` (1 by default, as the original; ``mora_kernels.save_adapter`` writes it when it is not 1).
    """

    use_mora: bool = dataclasses.field(default=True, metadata={"help": "Always true: this config is MoRA."})
    mora_type: int = dataclasses.field(default=1, metadata={"help": "MoRA type: 1, 2, 3, 4, 6 or 7."})
    mora_scaling: float = dataclasses.field(default=1.0, metadata={"help": "Factor on the update (not lora_alpha)."})
    remora_restarts: int = dataclasses.field(
        default=0, metadata={"help": "ReMoRA restarts folded into the base weights before this M (set by restart)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.use_mora is not True:
            raise ValueError(f"use_mora must be True for a MoRAConfig (use LoraConfig for LoRA), got {self.use_mora!r}")
        self.mora_type = int(mora_type_of(self.mora_type))
        self.lora_dropout = check_dropout(self.lora_dropout, "lora_dropout")
        self.mora_scaling = check_scaling(self.mora_scaling, "mora_scaling")
        restarts = self.remora_restarts
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
            raise ValueError(f"remora_restarts must be an int >= 0, got {restarts!r}")
        for name in ("use_dora", "lora_bias"):
            if getattr(self, name):
                raise ValueError(f"{name}=True is not supported with MoRA")
        # Every target goes to MoRAPeftLinear, which refuses what it cannot adapt: no silent plain-LoRA fallback.
        self._register_custom_module({nn.Module: MoRAPeftLinear})


class MoRAPeftLinear(AdapterMixin, nn.Module, LoraLayer):
    """PEFT's layer for MoRA: ``lora_A[name]`` is the adapter's ``MoRAMatrix``, and ``lora_B[name]`` is the same
    module (the original release's layout, so that both keys are saved)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoRAConfig, **kwargs):
        kind = check_base_layer(base_layer)
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
        self.update_layer(adapter_name, config.r, lora_alpha=config.lora_alpha, config=config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha, config, **kwargs) -> None:
        if not getattr(config, "use_mora", False):
            raise ValueError(
                f"adapter {adapter_name!r}: this layer holds MoRA adapters; a LoRA adapter cannot be added to it"
            )
        check_dropout(config.lora_dropout, "lora_dropout")
        weight = self.get_base_layer().weight
        matrix = MoRAMatrix(self.in_features, self.out_features, r, config.mora_type, torch.float32, weight.device)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = config.mora_scaling  # the original release ignores lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        matrix.restarts = config.remora_restarts
        self.lora_A[adapter_name] = matrix
        self.lora_B[adapter_name] = matrix
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- the accessors AdapterMixin needs (merged_adapters, active_adapters, disable_adapters come from PEFT)
    def mora_adapter(self, name: str) -> MoRAMatrix:
        return self.lora_A[name]

    def mora_scaling(self, name: str) -> float:
        return self.scaling[name]

    def mora_dropout(self, name: str) -> nn.Module:
        return self.lora_dropout[name]

    def mora_adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

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


def load_config(path: str | os.PathLike, allow_restarted: bool = False, **overrides) -> MoRAConfig:
    """The ``MoRAConfig`` of a saved MoRA adapter (this package's or the original release's).

    Read from ``adapter_config.json`` directly, since PEFT drops ``use_mora`` and ``mora_type``; keys that this
    PEFT's LoraConfig does not know (fields of older versions) are dropped, as PEFT does. A checkpoint saved after
    ReMoRA restarts needs ``allow_restarted=True`` (see ``mora_kernels.adapters.read_config``).
    """
    raw = {**read_config(path, allow_restarted), **overrides}
    known = {f.name for f in dataclasses.fields(MoRAConfig) if f.init and f.name != "peft_type"}
    return MoRAConfig(**{k: v for k, v in raw.items() if k in known})


def from_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    allow_restarted: bool = False,
    **kwargs,
) -> PeftModel:
    """``PeftModel.from_pretrained`` for a MoRA adapter folder; ``kwargs`` go to it."""
    config = load_config(path, allow_restarted)
    return PeftModel.from_pretrained(
        model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )


def load_adapter(
    peft_model: PeftModel,
    path: str | os.PathLike,
    adapter_name: str,
    is_trainable: bool = False,
    allow_restarted: bool = False,
):
    """``peft_model.load_adapter`` for a MoRA adapter folder (one more adapter on the same model)."""
    config = load_config(path, allow_restarted, inference_mode=not is_trainable)
    peft_model.add_adapter(adapter_name, config)
    return peft_model.load_adapter(path, adapter_name=adapter_name, is_trainable=is_trainable)
