"""The base layers MoRA can sit on, and how a merge reads and writes their weight.

MoRA's unmerged forward needs only ``base(x)`` and the base's in/out features, so it runs on any layer below;
only merge, unmerge and the ReMoRA restart touch the weight, through ``read`` (a dense ``(out, in)`` weight) and
``write`` (store a dense ``(out, in)`` weight back in the layer's own format):

- ``nn.Linear`` with a plain floating-point weight ``(out, in)``: read and written as is.
- transformers' ``Conv1D`` (GPT-2): a floating-point weight stored transposed, ``(in, out)``; read and written
  transposed, so a merge adds ``dW^T`` (the original release added ``dW``: docs/design.md, D4).
- bitsandbytes ``Linear4bit`` (nf4 or fp4, double quantization on or off): read by dequantizing, written by
  quantizing again with the layer's own settings (quant type, block size, double quantization, storage dtype), as
  PEFT merges LoRA into it. A merge therefore rounds ``W + dW`` to the 4-bit grid: see ``QUANTIZED_MERGE``.
- bitsandbytes ``Linear8bitLt``: int8 weights with one scale per row (``has_fp16_weights=False``) are dequantized and
  quantized again likewise; with ``has_fp16_weights=True`` the weight is a float matrix and merges exactly.
- ``nn.Linear`` whose weight is a torchao tensor subclass (``quantize_(model, Int8WeightOnlyConfig())`` and the
  like): forward and training only. The tensor does not record the config that made it, so a merge cannot
  requantize it faithfully and is refused: dequantize the model (or reload it in float) and merge there.

Anything else (other quantized layers, sharded DTensor weights, non-float weights) is refused with a TypeError that
names it. bitsandbytes, torchao and transformers are looked up in ``sys.modules``: a layer of a library that was
never imported cannot exist, so this module imports none of them.
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from torch import nn

from .core import FLOAT_DTYPES

QUANTIZED_MERGE = (
    "W is dequantized, scaling * dW added and the sum quantized again with the layer's settings, so the merged layer "
    "equals the unmerged one only up to that rounding (each weight moves by at most half a quantization step, as "
    "large as the base's own quantization error; an update smaller than a step can be lost). The packed weight from "
    "before the merge is kept (one more copy of it while merged) and unmerge puts it back bit for bit. To keep the "
    "update exact, merge into a float copy of the base model instead"
)


def _bnb():
    return sys.modules.get("bitsandbytes")


class Dense:
    """``nn.Linear`` with a plain floating-point weight ``(out, in)``."""

    name = "nn.Linear"
    quantized = False
    transposed = False  # PEFT's fan_in_fan_out

    @staticmethod
    def features(base) -> tuple[int, int]:
        return base.in_features, base.out_features

    @staticmethod
    def check_merge(base) -> None:
        """Raise (TypeError, nothing changed) if a merge into ``base`` cannot be done faithfully; called before
        ``read``."""

    @staticmethod
    def read(base) -> torch.Tensor:
        return base.weight.data

    @staticmethod
    def write(base, weight: torch.Tensor) -> None:
        base.weight.data.copy_(weight)

    @staticmethod
    def keep(base) -> tuple:
        """Everything that holds the layer's weight now (quantized kinds), for ``restore`` to put back bit for bit
        after a merge; ``write`` replaces these objects by new ones and never changes them."""
        return (base.weight,)

    @staticmethod
    def restore(base, kept: tuple) -> None:
        (base.weight,) = kept


class TransposedConv1D(Dense):
    """transformers' ``Conv1D``: ``y = x W + b`` with W stored ``(in, out)``."""

    name = "transformers Conv1D"
    transposed = True

    @staticmethod
    def features(base) -> tuple[int, int]:
        in_features, out_features = base.weight.shape
        return in_features, out_features

    @staticmethod
    def read(base) -> torch.Tensor:
        return base.weight.data.T

    @staticmethod
    def write(base, weight: torch.Tensor) -> None:
        base.weight.data.copy_(weight.T)


class Bnb4bit(Dense):
    """bitsandbytes ``Linear4bit``: W packed two 4-bit codes a byte, one absmax per block (itself 8-bit quantized
    with double quantization)."""

    name = "bitsandbytes Linear4bit"
    quantized = True

    @staticmethod
    def describe(base) -> str:
        weight = base.weight
        double = ", double quantization" if weight.compress_statistics else ""
        return f"bitsandbytes Linear4bit ({weight.quant_type}, block size {weight.blocksize}{double})"

    @staticmethod
    def check_merge(base) -> None:
        # Some builds of bitsandbytes' CPU dequantize kernel (0.50 on AVX512 CPUs, not on AVX2-only ones) block a 2-D
        # weight differently from the quantizer when a row is not a whole number of blocks: the layer's own forward
        # then misreads the weight, and no requantized W + dW could reproduce the unmerged layer. Whether this build
        # on this CPU does so is a fact of the machine, so it is probed on the layer itself rather than assumed.
        weight = base.weight
        if base.in_features % weight.blocksize and Bnb4bit.misreads_rows(base):
            raise TypeError(
                f"merge: bitsandbytes' kernels on this machine misread a 4-bit weight whose in_features "
                f"({base.in_features}) is not a multiple of its block size ({weight.blocksize}), so a merge into it "
                "cannot match the unmerged layer; merge on a GPU, or into a float copy of the base model"
            )

    @staticmethod
    def misreads_rows(base) -> bool:
        """Whether dequantizing the weight as the layer reads it, ``(out, in)``, differs from dequantizing it as the
        quantizer wrote it (one flat run of blocks); the tolerance is far above the rounding of two correct
        kernels (float32 products of the same codes and scales) and far below one quantization step."""
        functional = _bnb().functional
        data, state = Bnb4bit.packed(base)
        flat_state = copy.copy(state)
        flat_state.shape = torch.Size([state.shape.numel()])
        as_layer = functional.dequantize_4bit(data, copy.copy(state)).float()
        as_written = functional.dequantize_4bit(data, flat_state).float().reshape(as_layer.shape)
        scale = as_written.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        return bool(((as_layer - as_written).abs() > 1e-4 * scale).any())

    @staticmethod
    def packed(base):
        """The packed weight and its quantization state in bitsandbytes' storage layout."""
        weight = base.weight
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks the weight for its AVX512-BF16 CPU inference kernel on the first eval forward;
            # dequantize_4bit does not read that layout (it returns garbage), so undo the repacking first, as
            # bitsandbytes itself does before saving or moving the weight.
            data, state = _bnb().functional._convert_weight_packed_for_cpu_inverse(data, state)
        return data, state

    @staticmethod
    def read(base) -> torch.Tensor:
        return _bnb().functional.dequantize_4bit(*Bnb4bit.packed(base))

    @staticmethod
    def write(base, weight: torch.Tensor) -> None:
        old = base.weight
        # A Params4bit built from float data is quantized by .to(device), with the settings given here.
        base.weight = _bnb().nn.Params4bit(
            weight.contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=base,
        ).to(old.device)


class Bnb8bit(Dense):
    """bitsandbytes ``Linear8bitLt`` with int8 weights: ``W = CB * SCB / 127`` row by row."""

    name = "bitsandbytes Linear8bitLt"
    quantized = True

    @staticmethod
    def describe(base) -> str:
        return "bitsandbytes Linear8bitLt (int8, one scale per row)"

    @staticmethod
    def read(base) -> torch.Tensor:
        # The row scales live on the weight until the first forward moves them to the layer's matmul state.
        scales = base.weight.SCB if getattr(base.weight, "SCB", None) is not None else base.state.SCB
        return _bnb().functional.int8_vectorwise_dequant(base.weight.data, scales)

    @staticmethod
    def write(base, weight: torch.Tensor) -> None:
        device = base.weight.device
        # Int8Params quantizes when moved from the CPU (in float16, as when the layer was loaded).
        base.weight = _bnb().nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
        base.state.reset_grads()  # drop the old int8 weight and scales held by the matmul state

    # The codes and row scales live on the weight until the first forward moves them to the matmul state.
    _STATE = ("CB", "SB", "SCB", "SBt", "CBt")

    @staticmethod
    def keep(base) -> tuple:
        weight = base.weight
        return (weight, weight.CB, weight.SCB, *(getattr(base.state, name) for name in Bnb8bit._STATE))

    @staticmethod
    def restore(base, kept: tuple) -> None:
        weight, codes, scales, *state = kept
        base.weight = weight
        weight.CB, weight.SCB = codes, scales
        for name, value in zip(Bnb8bit._STATE, state):
            setattr(base.state, name, value)


class TorchAO(Dense):
    """``nn.Linear`` with a torchao quantized tensor as weight: forward and training; ``check_merge`` refuses."""

    name = "torchao-quantized Linear"
    quantized = True

    @staticmethod
    def describe(base) -> str:
        return f"torchao-quantized Linear ({type(base.weight).__name__} weight)"

    @staticmethod
    def check_merge(base) -> None:
        raise TypeError(
            f"merge: the base is a {TorchAO.describe(base)}; its weight does not record the quantization config that "
            "made it, so the merged weight cannot be quantized again faithfully. Merge into a float copy of the base "
            "model (load it unquantized, load the adapter, merge), or keep the adapter unmerged"
        )


# PEFT injects its layers into the model it is given before loading weights, and leaves them there when the load
# fails (plain PEFT on a MoRA folder fails so: "size mismatch"). Said where such a layer is met as a base.
LEFT_BY_PEFT = (
    "this is a PEFT LoRA layer, not a base layer: PEFT leaves its layers in the model it was given when a load "
    "fails (e.g. PeftModel.from_pretrained of a MoRA adapter without importing mora_kernels.peft_integration "
    "first); reload the base model (or put back each layer's get_base_layer())"
)


def check_base_layer(base) -> type[Dense]:
    """The kind of ``base`` (one of the classes above), or a TypeError naming what MoRA cannot adapt."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if conv1d is not None and isinstance(base, conv1d):
        _check_float_weight(base, base.weight)
        if base.weight.dim() != 2:
            raise TypeError(f"base: Conv1D weight must be 2-D (in, out), got shape {tuple(base.weight.shape)}")
        return TransposedConv1D
    if hasattr(base, "get_base_layer") and hasattr(base, "lora_A"):  # PEFT's LoRA layer: not a base
        raise TypeError(f"base: {LEFT_BY_PEFT} ({type(base).__module__}.{type(base).__name__})")
    if not isinstance(base, nn.Linear):
        raise TypeError(
            f"base must be a torch.nn.Linear, got {type(base).__module__}.{type(base).__name__}; MoRA adapts "
            "torch.nn.Linear (also bitsandbytes Linear4bit / Linear8bitLt and torchao-quantized ones) and "
            "transformers' Conv1D"
        )
    bnb = _bnb()
    if bnb is not None and isinstance(base, bnb.nn.Linear4bit):
        if not getattr(base.weight, "bnb_quantized", False):
            raise TypeError(
                "base: this bitsandbytes Linear4bit holds an unquantized weight (bitsandbytes quantizes it when the "
                "layer is moved to a device: call .to(device) first)"
            )
        return Bnb4bit
    if bnb is not None and isinstance(base, bnb.nn.Linear8bitLt) and base.weight.dtype == torch.int8:
        return Bnb8bit
    torchao = sys.modules.get("torchao.utils")
    base_tensor = getattr(torchao, "TorchAOBaseTensor", None)
    if base_tensor is not None and isinstance(base.weight, base_tensor):
        return TorchAO
    _check_float_weight(base, base.weight)
    if tuple(base.weight.shape) != (base.out_features, base.in_features):
        raise TypeError(
            f"base: weight shape {tuple(base.weight.shape)} does not match (out_features, in_features) = "
            f"({base.out_features}, {base.in_features}); packed or sharded weights are not supported"
        )
    return Dense


def _check_float_weight(base, weight) -> None:
    if type(weight) not in (torch.Tensor, nn.Parameter) or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"base: {type(base).__name__} has a {type(weight).__name__} weight of dtype {weight.dtype}; MoRA adapts "
            "floating-point nn.Linear and Conv1D layers, bitsandbytes Linear4bit / Linear8bitLt and torchao-quantized "
            "Linear; other quantized layers are not supported, nor sharded DTensor weights (merge an unsharded copy)"
        )


def keep_trainable(base) -> None:
    """Keep a bitsandbytes ``Linear4bit`` on its dequantize-then-matmul CPU path.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for a bfloat16 inference kernel at the first
    eval forward without gradients; after that a forward whose input needs gradients fails inside bitsandbytes, so
    training after an evaluation breaks. MoRA trains through its base, so the layers it adapts keep the path that
    CPUs without AVX512-BF16 (and GPUs) take. A weight repacked before adaptation is still read back by merge.
    """
    bnb = _bnb()
    if bnb is not None and isinstance(base, bnb.nn.Linear4bit):
        base.support_avx512bf16_for_cpu = False


def warn_quantized_merge(kind: type[Dense], base) -> None:
    if kind.quantized:
        warnings.warn(f"merge into a {kind.describe(base)}: {QUANTIZED_MERGE}", UserWarning, stacklevel=6)
