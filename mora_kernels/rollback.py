"""Safe model edits: ``atomic(model)`` restores what a failed model-level operation had changed, and
``check_not_shared`` refuses to write into a base weight that another part of the model also holds.

Every model-level entry point (``apply_mora``, ``replace_linears``, ``load_adapter`` on both paths, ``set_adapter``,
``delete_adapter``, ``merge``, ReMoRA's ``restart``) first checks everything it can foresee and then changes the
model inside ``atomic``, so that a failure it could not foresee (out of memory, an error inside PEFT, an interrupt)
leaves the model exactly as it was: the module tree, every module's attributes (adapter registries, active and merged
adapters, hooks, ``peft_config`` and its configs), every ``requires_grad`` flag, and, bit for bit, the tensors the
operation writes in place.

Tensors are restored only if they are declared: the MoRA matrices of the model (small) always, and the base weights
that the operation folds updates into (``writes``). Their copies are kept on the host, so a merge on a GPU does not
double the GPU memory of the adapted weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterable
from itertools import chain

import torch
from torch import nn

_CONTAINERS = (dict, list, set)


def check_model(model, argument: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argument} must be a torch.nn.Module, got {type(model).__module__}.{type(model).__name__}")
    return model


def _is_config(value) -> bool:
    """Config objects held by modules and mutated by edits: PEFT's dataclass configs, transformers' configs."""
    if isinstance(value, (nn.Module, torch.Tensor, type)):
        return False
    return dataclasses.is_dataclass(value) or (hasattr(value, "to_dict") and hasattr(value, "__dict__"))


class _Snapshot:
    def __init__(self, model: nn.Module, writes: Iterable[torch.Tensor]):
        self.modules = []
        configs = {}
        for module in model.modules():
            attributes = dict(module.__dict__)
            contents = {key: _copy(value) for key, value in attributes.items() if isinstance(value, _CONTAINERS)}
            self.modules.append((module, attributes, contents))
            for value in attributes.values():
                for item in value.values() if isinstance(value, dict) else (value,):
                    if _is_config(item):  # small; deep, since an edit may change a set or list inside one
                        configs[id(item)] = (item, copy.deepcopy(vars(item)))
        self.configs = list(configs.values())
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        tensors = {id(t): t for t in writes}
        for module in model.modules():
            names = getattr(module, "mora_adapter_names", None)
            if callable(names):  # a MoRA layer (MoRALinear or PEFT's): its matrices may be written (load, restart)
                tensors.update({id(w): w for w in (module.mora_adapter(n).weight for n in names())})
        # Detached host copies: restoring must not depend on the device memory that may just have run out.
        self.tensors = [(t, t.detach().to("cpu", copy=True)) for t in tensors.values() if t.device.type != "meta"]

    def restore(self) -> None:
        for module, attributes, contents in self.modules:
            for key in [key for key in module.__dict__ if key not in attributes]:
                del module.__dict__[key]
            module.__dict__.update(attributes)
            for key, saved in contents.items():
                _refill(attributes[key], saved)
        for config, attributes in self.configs:
            vars(config).clear()
            vars(config).update(attributes)
        for parameter, flag in self.flags:
            parameter.requires_grad_(flag)
        with torch.no_grad():
            for tensor, saved in self.tensors:
                tensor.data.copy_(saved)


def _copy(container):
    return type(container).copy(container) if isinstance(container, (dict, set)) else list(container)


def _refill(container, saved) -> None:
    """Put ``saved``'s items back into the same container object (other objects may hold a reference to it)."""
    if isinstance(container, list):
        container[:] = saved
    else:
        container.clear()
        container.update(saved)


@contextlib.contextmanager
def atomic(model: nn.Module, writes: Iterable[torch.Tensor] = ()):
    """Run the block as one edit of ``model``: on any exception, restore the model (see the module doc), re-raise."""
    snapshot = _Snapshot(check_model(model), writes)
    try:
        yield model
    except BaseException:
        snapshot.restore()
        raise


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
        weight = layer.merged_weight  # the base layer's weight, or the adapted parameter (MoRAParameter)
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
