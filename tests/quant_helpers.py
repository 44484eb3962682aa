"""Quantized copies of float layers (bitsandbytes 4-bit and 8-bit, on the CPU) for the QMoRA tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the [quant] extra (pulled by [test])")

# nf4 / fp4 with double quantization off and on, and LLM.int8 (int8 weights, one scale per row)
KINDS = ["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"]


def quantize_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantized as ``kind`` (and its bias, unquantized)."""
    n, m, bias = linear.in_features, linear.out_features, linear.bias is not None
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(n, m, bias=bias, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        quant_type, double = kind.split("-")[0], kind.endswith("-dq")
        layer = bnb.nn.Linear4bit(
            n, m, bias=bias, compute_dtype=linear.weight.dtype, compress_statistics=double, quant_type=quant_type
        )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data.clone(), requires_grad=False, compress_statistics=double, quant_type=quant_type,
            module=layer,
        )
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to(linear.weight.device)  # bitsandbytes quantizes on the move to a device


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
