"""Quantized copies of float layers (bitsandbytes 4-bit and 8-bit, on the CPU) for the QMoRA tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the [quant] extra (pulled by [test])")

from benchmarks.providers import QUANT_KINDS as KINDS  # noqa: E402, F401  (after the skip; re-exported)
from benchmarks.providers import quantized_copy as quantize_linear  # noqa: E402


def quantize(model: nn.Module, suffixes, kind: str) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` whose names end in one of ``suffixes`` by quantized copies."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rpartition(".")[2] in suffixes:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_linear(module, kind))
    return model


def float_compute(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes' 4-bit CPU inference on its dequantize-then-matmul path: on a CPU with AVX512-BF16 it
    otherwise repacks the weight on the first eval forward and multiplies in bfloat16, which adds a bf16 rounding
    (~4e-3 relative) that has nothing to do with the weight's quantization error the tests measure."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The float ``(out, in)`` weight a bitsandbytes layer computes with, straight from bitsandbytes."""
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales)
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def stored(layer: nn.Module) -> list[torch.Tensor]:
    """Every tensor that holds a quantized layer's weight (codes and scales), copied, to check it did not move."""
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return [weight.data.clone(), scales.clone()]
    return [weight.data.clone()] + [t.clone() for t in weight.quant_state.as_dict(packed=True).values()
                                    if isinstance(t, torch.Tensor)]
