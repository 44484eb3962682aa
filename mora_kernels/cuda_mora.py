"""CUDA C++ backend: the 2-D launchers over the csrc/ kernels (``torch.ops.mora_cuda``), behind the ops of
``fused.py``. Building and loading the extension is ``cuda_build.py``'s.

Passes (csrc/mora.h): forward is, for types 1-4, the compress kernel writing ``c = C(x)`` (float32, R per row) and
one GEMM whose epilogue stores each result of ``c M^T``, scaled, plus base, cast, into every output that copies it
(``y`` never exists, ``out`` is written once, into base itself for in-place accumulation); for types 6/7 that GEMM
alone, gathering ``C(x)`` from x (rotated for type 6) as it loads its tiles. Forward also returns c (types 1-4),
which autograd keeps for dM instead of x. Backward is one op: ``h = scaling D^T(g)`` once, then ``dx = C^T(h M)``
and/or ``dM = h^T c`` (deterministic split-K), each only if needed, with the saved c (types 1-4) or C(x) recomputed
from x (types 6/7).

Nothing in this module needs a GPU or a compiler at import time.
"""

from __future__ import annotations

import shutil

import torch

from .core import FUSED_DTYPES, Geometry
from .cuda_build import cuda_home, cutlass_include_dir, info, load


def status(device: torch.device) -> tuple[bool, str]:
    """Whether this backend can run on ``device``, and why not. Cheap: never builds."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the CUDA backend runs on CUDA tensors, got device {device}"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    state = info()
    if state["built"]:
        return True, f"built at {state['library']}"
    if cuda_home() is None or shutil.which("ninja") is None:
        return False, "not built, and building needs nvcc (CUDA_HOME) and ninja"
    try:
        cutlass_include_dir()
    except RuntimeError as missing:
        return False, f"not built, and {missing}"
    return True, "not built yet: builds just in time on first use (~1-2 minutes)"


# ----------------------------------------------------------------------------------------------------------------
# Backend interface: the 2-D launchers behind mora_kernels/fused.py's ops (which register fake tensors and autograd).


def _check_dtypes(**tensors):
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype not in FUSED_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 for backend='cuda', got {tensor.dtype}")


def forward(x, M, rope, base, geo: Geometry, scaling: float, out=None):
    """``(out, c)`` as ``fused.py`` describes: x ``(T, n)``, base ``(T, m)`` or None; ``out`` (may be base) is
    written in place by the GEMM epilogue. Non-contiguous inputs are copied (the kernels take dense rows; its
    ``backends`` record says so, and ``fused`` refuses a non-contiguous ``out`` before it comes here)."""
    _check_dtypes(x=x, M=M, base=base)
    cos, sin = rope
    return load().forward(x.contiguous(), M.contiguous(), None if base is None else base.contiguous(), cos, sin,
                             geo.m, int(geo.t), float(scaling), out)


def backward(g, saved, M, rope, geo: Geometry, scaling: float, x_dtype, needs: tuple[bool, bool]):
    """``(dx, dM)`` as ``fused.py`` describes; ``saved`` is forward's ``c`` (types 1-4) or x (types 6/7)."""
    x, c = (saved.contiguous(), None) if geo.t.blockwise else (None, saved)
    (cos, sin), (need_dx, need_dM) = rope, needs
    return load().backward(g.contiguous(), x, c, M.contiguous(), cos, sin, geo.n, int(geo.t), float(scaling),
                              x_dtype, need_dx, need_dM)
