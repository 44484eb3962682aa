"""ReMoRA: every T optimizer steps, fold each MoRA update into its base weight, restart M at zero and move to the
next type (1 -> 2 -> 3 -> 4 -> 1), so that successive updates use different compress/decompress groupings.

Types 1-4 have the same square size R for a given r, so M keeps its shape and its place in the optimizer. Types 6
and 7 have no successor: they are folded in and restarted but keep their type.

Optimizer state: the state the optimizer holds for each restarted M (Adam's moments and step count, SGD's momentum
buffer, ...) is dropped, so each cycle starts like the first step of training. The learning-rate schedule is left
alone. Pass the optimizer to ``ReMoRA`` (or it comes from the Trainer with the callback) for this to happen.

Use from a plain loop::

    remora = ReMoRA(model, every=1000, optimizer=optimizer)
    for batch in data:
        loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad()
        remora.step()

or with transformers: ``Trainer(..., callbacks=[ReMoRACallback(every=1000)])`` (imported lazily, so transformers
stays optional).

Checkpoints: a restart folds the update into the base weights, so a checkpoint of M alone (``save_adapter``,
``save_pretrained``) no longer reproduces the model. ``save_adapter`` refuses it unless ``allow_restarted=True``;
both paths record ``remora_restarts`` (and the type M now trains for) in ``adapter_config.json``, and every loader
here refuses such a checkpoint unless ``allow_restarted=True``, i.e. unless the base weights it is loaded onto hold
the earlier cycles. Save the merged model (or the base weights too) to keep a run.
"""

from __future__ import annotations

import torch
from torch import nn

from .bases import check_base_layer
from .core import MoRAType, check_int
from .layer import AdapterMixin, MoRAParameter
from .rollback import atomic, check_model, check_not_shared

_NEXT = {MoRAType.SHARING: MoRAType.GROUPED, MoRAType.GROUPED: MoRAType.GROUPED_TILE,
         MoRAType.GROUPED_TILE: MoRAType.SHARING_GROUPED, MoRAType.SHARING_GROUPED: MoRAType.SHARING}


def next_type(mora_type: MoRAType) -> MoRAType:
    """1 -> 2 -> 3 -> 4 -> 1; types 6 and 7 stay as they are."""
    return _NEXT.get(MoRAType(mora_type), MoRAType(mora_type))


@torch.no_grad()
def restart(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, cycle_types: bool = True) -> int:
    """One ReMoRA restart of every MoRA layer of ``model`` (``MoRALinear`` or PEFT's); returns how many adapters.

    On a PEFT model each restarted adapter's ``MoRAConfig`` follows: its ``mora_type`` is the type M now trains
    for and its ``remora_restarts`` counts the restarts folded into the base weights, so that ``save_pretrained``
    records both.
    """
    check_optimizer(optimizer)
    for module in check_model(model).modules():
        configs = getattr(module, "peft_config", None)
        for name, config in (configs.items() if isinstance(configs, dict) else ()):
            if getattr(config, "use_mora", False) and getattr(config, "target_parameters", None):
                # its experts' M sit in parametrizations that a restart does not fold: they would keep the old type
                raise ValueError(f"model: adapter {name!r} adapts target_parameters (one M per expert, "
                                 "docs/peft.md#target-parameters), which ReMoRA does not restart; not restarted")
    layers = [(name, module) for name, module in check_model(model).named_modules()
              if isinstance(module, AdapterMixin) and not module.disable_adapters and module.active_mora_adapters()]
    if not layers:
        raise ValueError("model: no MoRA layer with an enabled adapter to restart")
    # Everything that would stop a layer half way is checked before the first layer is folded.
    merged = [name for name, module in layers if module.merged_adapters]
    if merged:
        raise ValueError(f"model: layers {merged} have merged adapters; unmerge them before a ReMoRA restart")
    for name, module in layers:
        if isinstance(module, MoRAParameter):  # as the PEFT path's target_parameters above
            raise ValueError(f"model: layer {name!r} adapts the parameter {module.parameter_name!r} (one M per "
                             "expert, apply_mora(target_parameters=...)), which ReMoRA does not restart; not restarted")
        try:
            kind = check_base_layer(module.base_layer)
        except TypeError as error:
            raise TypeError(f"model: layer {name!r}: {error}") from None
        if kind.quantized:  # the layer's own restart refuses it too; checked here so no layer restarts first
            raise TypeError(f"model: layer {name!r}: the base is a {kind.describe(module.base_layer)}; a ReMoRA "
                            "restart would round each cycle's update to its grid (restart on a float base)")
    check_not_shared(model, layers, "a ReMoRA restart (which folds the update into the base weight)")
    reset, restarted = [], {}
    with atomic(model, writes=[module.base_layer.weight for _, module in layers]):
        for _, module in layers:
            names = module.active_mora_adapters()
            reset += module.restart(next_type if cycle_types else None)
            restarted.update({name: module.mora_adapter(name) for name in names})
        for module in model.modules():
            configs = getattr(module, "peft_config", None)
            if isinstance(configs, dict):
                for name, adapter in restarted.items():
                    if hasattr(configs.get(name), "remora_restarts"):  # a MoRAConfig (importing peft is not needed)
                        configs[name].mora_type = int(adapter.mora_type)
                        configs[name].remora_restarts = adapter.restarts
    if optimizer is not None:  # only once the restart is complete: a failed one keeps the optimizer's state
        for M in reset:
            optimizer.state.pop(M, None)
    return len(reset)


def check_optimizer(optimizer) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")


class ReMoRA:
    """Call ``step()`` after each optimizer step; every ``every`` calls it runs ``restart``."""

    def __init__(self, model: nn.Module, every: int, optimizer=None, cycle_types: bool = True):
        check_int(every, "every (optimizer steps between restarts)", error=ValueError)
        check_optimizer(optimizer)
        self.model, self.every, self.optimizer, self.cycle_types = check_model(model), every, optimizer, cycle_types
        self.steps = 0

    def step(self) -> bool:
        """Count one optimizer step; returns True when this step restarted the adapters."""
        if (self.steps + 1) % self.every:
            self.steps += 1
            return False
        restart(self.model, self.optimizer, self.cycle_types)
        self.steps += 1  # a refused restart is not counted: the next step tries again
        return True


def _callback_class():
    from transformers import TrainerCallback

    class ReMoRACallback(TrainerCallback):
        """transformers ``TrainerCallback``: a ReMoRA restart every ``every`` optimizer steps (``global_step``)."""

        def __init__(self, every: int, cycle_types: bool = True):
            ReMoRA(nn.Module(), every)  # validates ``every`` the same way
            self.every, self.cycle_types = every, cycle_types

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step > 0 and state.global_step % self.every == 0:
                restart(model, optimizer, self.cycle_types)

    return ReMoRACallback


def __getattr__(name: str):
    # ReMoRACallback is built on first use so that importing this module does not import transformers.
    if name == "ReMoRACallback":
        cls = _callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
