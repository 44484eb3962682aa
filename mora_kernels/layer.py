"""``MoRALinear``: a frozen ``nn.Linear`` plus a trainable MoRA update, and ``replace_linears`` to swap them in."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from . import ops, reference
from .core import FLOAT_DTYPES, Geometry, MoRAType, mora_type_of, r_hat, rope_tables


def check_base_layer(base) -> None:
    """Refuse what MoRALinear cannot adapt exactly: anything but a plain floating-point ``nn.Linear``.

    Quantized layers (bitsandbytes, torchao, GPTQ, ...) subclass or imitate ``nn.Linear`` with packed integer
    weights; merging a float update into them is wrong (spec defect 4), so they are refused by name.
    """
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__module__}.{type(base).__name__}")
    weight = base.weight
    if type(weight) not in (torch.Tensor, nn.Parameter) or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"base: {type(base).__name__} has a {type(weight).__name__} weight of dtype {weight.dtype}; MoRALinear "
            "adapts only plain floating-point nn.Linear layers (quantized layers are not supported)"
        )
    if tuple(weight.shape) != (base.out_features, base.in_features):
        raise TypeError(
            f"base: weight shape {tuple(weight.shape)} does not match (out_features, in_features) = "
            f"({base.out_features}, {base.in_features}); packed or sharded weights are not supported"
        )


class MoRALinear(nn.Module):
    """``y = base(x) + scaling * D(M C(dropout(x)))`` with a frozen ``base`` and a trainable square ``M``.

    Args:
        base: the ``nn.Linear`` to adapt (frozen here; its bias is kept).
        r: the LoRA rank whose parameter budget MoRA matches; ``R = r_hat(in, out, r, mora_type)``.
        mora_type: 1, 2, 3, 4, 6 (original release) or 7 / ``"decoupled"``.
        dropout: dropout probability on the adapter's input (training mode only).
        scaling: factor on the update (the original release uses 1.0 and ignores lora_alpha).
        dtype: dtype of ``M``; float32 by default, as the original, whatever the base's dtype.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"`` (see ``mora_kernels.mora``).

    ``M`` starts at zero, so the layer first computes exactly ``base(x)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        mora_type: int | str = 1,
        dropout: float = 0.0,
        scaling: float = 1.0,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ):
        super().__init__()
        check_base_layer(base)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float64, float32, float16 or bfloat16, got {dtype}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.mora_type = mora_type_of(mora_type)
        self.r = r
        self.in_features = base.in_features
        self.out_features = base.out_features
        R = r_hat(self.in_features, self.out_features, r, self.mora_type)
        self.geo = Geometry(self.in_features, self.out_features, R, self.mora_type)
        self.base = base
        base.requires_grad_(False)
        self.M = nn.Parameter(torch.zeros(R, R, dtype=dtype, device=base.weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = float(scaling)
        self.backend = backend
        self.merged = False
        # Derived tables, never saved: recomputed in float32 for the right R on every move (see _apply).
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self._refresh_rope()

    @property
    def R(self) -> int:
        return self.geo.R

    def _refresh_rope(self) -> None:
        if self.mora_type == MoRAType.ROPE:
            self.rope_cos, self.rope_sin = rope_tables(self.geo.R, self.geo.used_blocks, self.M.device)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would cast the tables; recompute them in float32 on the new device instead
        # (spec defect 3: tables frozen on one device or computed in bf16).
        result = super()._apply(fn, recurse)
        self._refresh_rope()
        return result

    @property
    def rope(self):
        return (self.rope_cos, self.rope_sin) if self.mora_type == MoRAType.ROPE else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (..., in_features={self.in_features}), got {shape}")
        result = self.base(x)
        if self.merged:
            return result
        # The base output is ours: when autograd records nothing (inference), add the update into it in place.
        inplace = not ops.needs_autograd(x, self.M, result)
        return ops.apply(self.dropout(x), self.M, self.geo, self.rope, self.scaling, result, self.backend, inplace)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * dW`` of shape ``(out_features, in_features)`` in float32 (float64 if M is)."""
        return reference.delta_weight(self.M, self.geo, self.rope) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """``W += scaling * dW``; the forward then runs the base layer alone."""
        if self.merged:
            raise RuntimeError("merge: the update is already merged into the base weight")
        weight = self.base.weight
        delta = self.delta_weight()
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W -= scaling * dW`` (exact in float32/float64 weights; rounds in bf16/fp16, as any merge does)."""
        if not self.merged:
            raise RuntimeError("unmerge: the update is not merged")
        weight = self.base.weight
        delta = self.delta_weight()
        weight.copy_((weight.to(delta.dtype) - delta).to(weight.dtype))
        self.merged = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "M"
        if key in state_dict and tuple(state_dict[key].shape) != (self.R, self.R):
            raise ValueError(
                f"{key}: expected shape ({self.R}, {self.R}) because r_hat(in_features={self.in_features}, "
                f"out_features={self.out_features}, r={self.r}, mora_type={int(self.mora_type)}) = {self.R}; "
                f"got {tuple(state_dict[key].shape)}. Was it saved with another r or mora_type?"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, R={self.R}, "
            f"mora_type={int(self.mora_type)}, scaling={self.scaling}, merged={self.merged}, backend={self.backend!r}"
        )


def matches(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches names or name suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def replace_linears(
    model: nn.Module, target_modules: str | Iterable[str], r: int, mora_type: int | str = 1, **kwargs
) -> list[str]:
    """Replace each ``nn.Linear`` of ``model`` whose name matches ``target_modules`` by a ``MoRALinear``.

    ``kwargs`` go to ``MoRALinear`` (dropout, scaling, dtype, backend). Returns the replaced names; raises
    ValueError if nothing matched, since a silent no-op would train nothing.
    """
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and matches(name, target_modules):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if isinstance(parent, MoRALinear):
                continue  # already adapted
            setattr(parent, child, MoRALinear(module, r, mora_type, **kwargs))
            replaced.append(name)
    if not replaced:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear of the model")
    return replaced
