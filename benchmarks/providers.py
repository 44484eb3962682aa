"""The layers the benchmarks compare, all built around one shared frozen base ``nn.Linear``.

Providers: the base Linear alone; LoRA as PEFT runs it (``peft.tuners.lora.Linear`` through ``get_peft_model``);
a fused LoRA (base output plus one ``addmm`` of the low-rank product: the strongest simple LoRA); MoRA the way the
original release computes it (``original.py``); and ``MoRALinear`` on each mora_kernels backend that can run on the
device (reference everywhere; triton and cuda on a GPU). LoRA has rank ``r`` and MoRA square size
``R = r_hat(n, m, r)``, so both train ``r (n + m) ~= R^2`` parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mora_kernels import MoRALinear, backend_status

from .original import OriginalMoRALinear

MORA_BACKENDS = ("reference", "triton", "cuda")


class FusedLoRALinear(nn.Module):
    """``addmm(base(x), x A^T, B^T, alpha=scaling)``: two extra GEMMs and no other pass over the output.

    A and B have the base's dtype (bf16 on a GPU), the cheapest LoRA there is in eager PyTorch.
    """

    def __init__(self, base: nn.Linear, r: int, scaling: float = 1.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        weight = base.weight
        self.A = nn.Parameter(torch.empty(r, base.in_features, device=weight.device, dtype=weight.dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch.addmm(self.base(rows), rows @ self.A.T, self.B.T, alpha=self.scaling)
        return out.view(*x.shape[:-1], out.shape[-1])


class _OneLinear(nn.Module):
    """The smallest model ``get_peft_model`` accepts: one Linear called ``lin``."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def peft_lora(base: nn.Linear, r: int) -> nn.Module:
    """PEFT's own LoRA Linear (alpha = r, so scaling 1 as MoRA; no dropout), as users run it."""
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["lin"])
    model = peft.get_peft_model(_OneLinear(base), config)
    layer = model.base_model.model.lin
    if not isinstance(layer, peft.tuners.lora.Linear):
        raise TypeError(f"expected PEFT to wrap the Linear in peft.tuners.lora.Linear, got {type(layer)}")
    return model


@dataclass
class Provider:
    name: str
    family: str  # "base", "lora" or "mora": which rows share a trainable-parameter budget
    mora_type: int | None
    layer: nn.Module | None  # None when it cannot run here
    skip_reason: str | None = None


def trainable_params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters() if p.requires_grad)


def build(base: nn.Linear, r: int, mora_types, device: torch.device) -> list[Provider]:
    """Every provider for one base layer and LoRA rank; unusable ones carry the reason they are skipped."""
    try:
        peft_provider = Provider("LoRA PEFT", "lora", None, peft_lora(base, r))
    except ImportError as error:
        peft_provider = Provider("LoRA PEFT", "lora", None, None, f"peft is not installed ({error})")
    providers = [
        Provider("base Linear", "base", None, base),
        peft_provider,
        Provider("LoRA fused addmm", "lora", None, FusedLoRALinear(base, r)),
    ]
    for t in mora_types:
        original = OriginalMoRALinear(base, r, t)
        providers.append(Provider(f"MoRA-{t} original", "mora", t, original))
        for backend in MORA_BACKENDS:
            usable, reason = backend_status(backend, device)
            name = f"MoRA-{t} {backend}"
            if not usable:
                providers.append(Provider(name, "mora", t, None, reason))
                continue
            layer = MoRALinear(base, r, t, backend=backend)
            providers.append(Provider(name, "mora", t, layer))
    generator = torch.Generator().manual_seed(0)
    for p in providers:  # non-zero adapters, as after a few steps of training (zeros could hide work in a kernel)
        if p.layer is not None and p.family == "mora":
            with torch.no_grad():
                p.layer.M.copy_(torch.randn(p.layer.M.shape, generator=generator) * 0.02)
    return providers
