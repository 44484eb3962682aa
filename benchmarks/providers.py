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


def peft_lora(base: nn.Module, r: int) -> nn.Module:
    """PEFT's own LoRA layer (alpha = r, so scaling 1 as MoRA; no dropout), as users run it: ``lora.Linear`` on a
    float base, PEFT's bitsandbytes LoRA layers on a quantized one."""
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["lin"])
    model = peft.get_peft_model(_OneLinear(base), config)
    layer = model.base_model.model.lin
    if not isinstance(layer, peft.tuners.lora.LoraLayer) or type(layer).__module__.startswith("mora_kernels"):
        raise TypeError(f"expected PEFT to wrap the layer in one of its LoRA layers, got {type(layer)}")
    return model


# bitsandbytes formats of a quantized base: nf4 / fp4 with double quantization off or on ("-dq"; nf4-dq is QLoRA's),
# and LLM.int8 (int8 weights, one scale per row)
QUANT_KINDS = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")


def quantized_copy(linear: nn.Linear, kind: str) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantized as ``kind``, its bias unquantized; 4-bit layers
    compute in the weight's dtype."""
    import bitsandbytes as bnb

    if kind not in QUANT_KINDS:
        raise ValueError(f"kind must be one of {QUANT_KINDS}, got {kind!r}")
    n, m, bias = linear.in_features, linear.out_features, linear.bias is not None
    weight = linear.weight.data.clone()
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(n, m, bias=bias, has_fp16_weights=False, threshold=0.0)
        # Int8Params quantizes when it moves from the CPU to a device
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        quant_type, double = kind.split("-")[0], kind.endswith("-dq")
        layer = bnb.nn.Linear4bit(n, m, bias=bias, compute_dtype=weight.dtype, compress_statistics=double,
                                  quant_type=quant_type, device=weight.device)  # fmt: skip
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double,
                                         quant_type=quant_type, module=layer)  # fmt: skip
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to(linear.weight.device)  # bitsandbytes quantizes on the move to a device


def weight_bytes(module: nn.Module) -> int:
    """Bytes holding ``module``'s weights: each parameter and buffer storage once, plus bitsandbytes' quantization
    state (the 4-bit block absmax, nested with double quantization; the int8 row scales)."""
    tensors = [*module.parameters(), *module.buffers()]
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            tensors += [t for t in state.as_dict(packed=True).values() if isinstance(t, torch.Tensor)]
        for holder in (weight, getattr(sub, "state", None)):
            if isinstance(getattr(holder, "SCB", None), torch.Tensor):
                tensors.append(holder.SCB)
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@dataclass
class Provider:
    name: str
    family: str  # "base", "lora" or "mora": which rows share a trainable-parameter budget
    mora_type: int | None
    layer: nn.Module | None  # None when it cannot run here
    skip_reason: str | None = None
    quant: str | None = None  # the base's bitsandbytes format (QUANT_KINDS), None for the float base


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
    return _random_matrices(providers)


def build_quantized(base: nn.Linear, r: int, mora_types, device: torch.device, kind: str) -> list[Provider]:
    """The base quantized as ``kind``, PEFT's LoRA and MoRALinear on each backend around it (QLoRA / QMoRA); the
    original release has no quantized path (spec defect 4) and the fused LoRA no quantized base."""
    try:
        quantized = quantized_copy(base, kind)
    except ImportError as error:
        return [Provider(f"{family} [{kind}]", family, None, None, f"bitsandbytes is not installed ({error})", kind)
                for family in ("base", "lora", "mora")]  # fmt: skip
    providers = [Provider(f"base [{kind}]", "base", None, quantized, quant=kind)]
    try:
        providers.append(Provider(f"LoRA PEFT [{kind}]", "lora", None, peft_lora(quantized, r), quant=kind))
    except ImportError as error:
        providers.append(Provider(f"LoRA PEFT [{kind}]", "lora", None, None, f"peft is not installed ({error})", kind))
    for t in mora_types:
        for backend in MORA_BACKENDS:
            usable, reason = backend_status(backend, device)
            layer = MoRALinear(quantized, r, t, backend=backend) if usable else None
            providers.append(Provider(f"MoRA-{t} {backend} [{kind}]", "mora", t, layer, reason if not usable else None,
                                      kind))  # fmt: skip
    return _random_matrices(providers)


def _random_matrices(providers: list[Provider]) -> list[Provider]:
    generator = torch.Generator().manual_seed(0)
    for p in providers:  # non-zero adapters, as after a few steps of training (zeros could hide work in a kernel)
        if p.layer is not None and p.family == "mora":
            with torch.no_grad():
                p.layer.M.copy_(torch.randn(p.layer.M.shape, generator=generator) * 0.02)
    return providers
