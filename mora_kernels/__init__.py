"""mora_kernels: exact, fused MoRA (high-rank parameter-efficient fine-tuning) for PyTorch.

``peft_integration`` (needs peft) and ``remora`` (its Trainer callback needs transformers) are imported on demand.
"""

from .adapters import (
    adapter_per_row,
    apply_mora,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge,
    replace_linears,
    save_adapter,
    set_adapter,
)
from .core import MoRAType, r_hat
from .export import export_lora
from .layer import MoRALinear, MoRAMatrix
from .ops import backend_status, delta_weight, mora, mora_mixed

__version__ = "0.1.0"

__all__ = [
    "MoRALinear",
    "MoRAMatrix",
    "MoRAType",
    "adapter_per_row",
    "apply_mora",
    "backend_status",
    "delete_adapter",
    "delta_weight",
    "disable_adapters",
    "export_lora",
    "load_adapter",
    "merge",
    "mora",
    "mora_mixed",
    "r_hat",
    "replace_linears",
    "save_adapter",
    "set_adapter",
]
