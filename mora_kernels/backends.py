"""The fused backends, one record each: where their launchers live, whether they serve mixed-adapter batches, which
dtypes they compute in, what layout they need, and what they say about a device. ``ops`` chooses among them (and
the reference), ``fused`` runs the chosen one's launchers behind its ops; neither names a backend.

A backend's modules are imported on first use by plain ``import`` statements (so importing the package needs no
Triton, GPU or compiler); ``torch.compile`` traces those statements as it traces any import, without a graph break.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType

import torch

from .core import FUSED_DTYPES, padded_width, sixteen_bit_products


def _triton() -> ModuleType:
    from . import triton_mora

    return triton_mora


def _triton_mixed() -> ModuleType:
    from . import triton_mixed

    return triton_mixed


def _cuda() -> ModuleType:
    from . import cuda_mora

    return cuda_mora


@dataclasses.dataclass(frozen=True)
class Backend:
    """One fused backend.

    ``launchers()`` imports the module with the 2-D launchers ``forward`` / ``backward`` and ``status(device) ->
    (usable, reason)`` (the contract is ``fused.py``'s); ``mixed()``, where there is one, the module with
    ``mixed_forward`` / ``mixed_backward``. ``contiguous``: its kernels take dense rows (inputs are copied; in-place
    accumulation needs a contiguous base, since a copy would be written instead of base). ``compact_c``: its
    forward returns ``C(x)`` (types 1-4, kept for backward) as its kernels read it, rows padded to 16 columns and in
    the 16-bit dtype of its products where they run in one (``compressed_layout``), not ``(T, R)`` float32.
    """

    name: str
    title: str  # for messages: "the Triton backend"
    launchers: Callable[[], ModuleType]
    mixed: Callable[[], ModuleType] | None
    dtypes: tuple[torch.dtype, ...]
    contiguous: bool
    compact_c: bool

    def status(self, device: torch.device) -> tuple[bool, str]:
        """Whether this backend can run on ``device``, and why not (its module's ``status``)."""
        try:
            module = self.launchers()
        except ImportError as error:
            return False, f"cannot be imported: {error}"
        return module.status(device)

    def computes(self, *tensors) -> bool:
        """Whether every given tensor (None: absent) has a dtype this backend computes in."""
        return all(t is None or t.dtype in self.dtypes for t in tensors)

    def compressed_layout(self, R: int, x_dtype: torch.dtype, m_dtype: torch.dtype) -> tuple[int, torch.dtype]:
        """Columns and dtype of the ``C(x)`` its forward returns for x and M of these dtypes (the fake kernels'
        too)."""
        if not self.compact_c:
            return R, torch.float32
        return padded_width(R), sixteen_bit_products(x_dtype, m_dtype) or torch.float32


TRITON = Backend("triton", "Triton", _triton, _triton_mixed, FUSED_DTYPES, contiguous=False, compact_c=True)
CUDA = Backend("cuda", "CUDA", _cuda, None, FUSED_DTYPES, contiguous=True, compact_c=False)
FUSED = {backend.name: backend for backend in (TRITON, CUDA)}
DEFAULT = TRITON  # what backend="auto" runs on a GPU where tuned.json measured nothing


def mixed_unsupported(backend: Backend) -> str:
    """The message for a mixed-adapter batch sent to a backend without a mixed path."""
    able = [b for b in FUSED.values() if b.mixed is not None]
    titles = " and ".join(f"the {b.title} backend" for b in able)
    choices = " or ".join(repr(name) for name in (*(b.name for b in able), "auto"))
    return (f"backend={backend.name!r}: mixed-adapter batches (mora_mixed, adapter_per_row, adapter_names) run only "
            f"on {titles} and the reference; use backend={choices}")
