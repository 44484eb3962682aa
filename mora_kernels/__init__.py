"""mora_kernels: exact, fused MoRA (high-rank parameter-efficient fine-tuning) for PyTorch."""

from .core import MoRAType, r_hat
from .layer import MoRALinear, replace_linears
from .ops import backend_status, delta_weight, mora

__version__ = "0.1.0"

__all__ = ["MoRALinear", "MoRAType", "backend_status", "delta_weight", "mora", "r_hat", "replace_linears"]
