"""mora_kernels: exact, fused MoRA (high-rank parameter-efficient fine-tuning) for PyTorch."""

from .core import MoRAType, r_hat
from .ops import backend_status, mora

__version__ = "0.1.0"

__all__ = ["MoRAType", "backend_status", "mora", "r_hat"]
