"""mora_kernels: exact, fused MoRA (high-rank parameter-efficient fine-tuning) for PyTorch.

Every name loads on first use, so importing the package imports nothing heavy; ``peft_integration`` (needs peft) and
``remora`` (its Trainer callback needs transformers) are modules imported on demand.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

# The public names load on first use (PEP 562), so that `import mora_kernels` and `python -m mora_kernels --help`
# do not import torch; `from mora_kernels import mora` or `mora_kernels.MoRALinear` import what they need.
_PUBLIC = {
    "adapter_per_row": "adapters",
    "apply_mora": "adapters",
    "delete_adapter": "adapters",
    "disable_adapters": "adapters",
    "export_lora": "export",
    "load_adapter": "adapters",
    "merge": "adapters",
    "save_adapter": "adapters",
    "set_adapter": "adapters",
    "MoRAType": "core",
    "r_hat": "core",
    "MoRALinear": "layer",
    "MoRAMatrix": "layer",
    "MoRAParameter": "layer",
    "replace_linears": "adapters",
    "backend_status": "ops",
    "delta_weight": "ops",
    "mora": "ops",
    "mora_mixed": "ops",
}

if TYPE_CHECKING:  # what the names are, for tools that read the code
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
    from .layer import MoRALinear, MoRAMatrix, MoRAParameter
    from .ops import backend_status, delta_weight, mora, mora_mixed


def __getattr__(name: str):
    """A public name (imported from its module) or a submodule (``mora_kernels.ops``), loaded on first use."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


__version__ = "0.1.0"

__all__ = [
    "MoRALinear",
    "MoRAMatrix",
    "MoRAParameter",
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
