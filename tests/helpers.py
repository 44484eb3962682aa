"""Shared test helpers: the golden cases, float32 rounding bounds and the plain low-precision baseline."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mora_kernels import reference
from mora_kernels.core import Geometry, MoRAType, rope_tables

DATA = Path(__file__).parent / "data"


@lru_cache(maxsize=1)
def golden():
    """(index, arrays) of tests/data/mora_cases.npz, a copy of the project's float64 golden cases."""
    z = np.load(DATA / "mora_cases.npz")
    return json.loads(bytes(z["index.json"])), {k: z[k] for k in z.files if k != "index.json"}


def golden_ids():
    return [case["id"] for case in golden()[0]]


def golden_case(case_id: str):
    """(case, tensors): the case's index entry and its float64 arrays by name (x, M, g, y, dx, dM, dW)."""
    index, arrays = golden()
    case = next(c for c in index if c["id"] == case_id)
    tensors = {k.split("/", 1)[1]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(case_id + "/")}
    return case, tensors


def fused_targets(*targets: tuple[str, str]):
    """pytest params ``(backend, device)`` of the fused backends, each skipped with the reason where it cannot run:
    Triton on cpu needs the interpreter (TRITON_INTERPRET=1, conftest.py's default); on cuda, both backends need a
    GPU (Triton: compute capability >= 8.0 and TRITON_INTERPRET not "1", else the interpreter would run there too;
    CUDA: the extension built or buildable). The cuda ones are marked ``gpu`` (benchmarks/gpu_suite.sh runs those)."""
    import pytest

    from mora_kernels import ops

    params = []
    for backend, device in targets:
        usable, reason = ops.backend_status(backend, device)
        if usable and backend == "triton" and device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
            usable, reason = False, "TRITON_INTERPRET=1 would run the interpreter on the GPU, not the compiled kernels"
        marks = [pytest.mark.skipif(not usable, reason=f"{backend} on {device}: {reason}")]
        if device == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return params


def abs_terms(x, M, g, geo: Geometry, scaling):
    """Sums of the absolute values of the terms behind each element of out, dx and dM (float64, x's device).

    A float32 sum of N terms is off by at most gamma_N = N u / (1 - N u) times the sum of their absolute values
    (Higham), so these times ``float32_error`` bound a kernel's rounding error elementwise, whatever its order of
    summation. For type 6 a rotated value is ``v_j cos + (+-v_j') sin`` with |cos|, |sin| <= 1, bounded by
    ``|v_j| + |v_j'|``: the bound uses type 7 on absolute values with each block's halves added (``roll`` by R/2),
    forward and adjoint alike.
    """
    x, M, g = x.double().abs(), M.double().abs(), g.double().abs()
    rope = geo.t == MoRAType.ROPE
    geo7 = Geometry(geo.n, geo.m, geo.R, MoRAType.DECOUPLED) if rope else geo
    c = reference.compress(x, geo7)
    if rope:
        c = c + c.roll(geo.R // 2, -1)
    out = reference.decompress(c @ M.T, geo7) * abs(scaling)
    h = reference.decompress_adjoint(g, geo7) * abs(scaling)
    w = h @ M
    if rope:
        w = w + w.roll(geo.R // 2, -1)
    dx = reference.compress_adjoint(w, geo7)
    dM = h.reshape(-1, geo.R).T @ c.reshape(-1, geo.R)
    return out, dx, dM


def float32_terms(geo: Geometry, rows: int) -> int:
    """N of gamma_N for the longest chain of float32 roundings behind any element of out, dx or dM: the block or
    group sums of compress and of both adjoints (at most B + copies + folds terms), the R products of the dot, the
    reduction of dM over the rows of A (tokens, times used blocks for types 6/7), the rotation, scaling and the
    base add, and the rounding of float64 inputs to float32 (one each for x, M, g): 8 for the last ones."""
    copies = geo.m // geo.R + 2
    rows_of_a = rows * (geo.used_blocks if geo.t.blockwise else 1)
    return geo.blocks + copies + (geo.blocks + 1) + geo.R + rows_of_a + 8


# What rounding the operands adds to each product of the Triton kernels' float32-operand dots, relative to its
# magnitude, by PyTorch's float32 matmul precision (triton_floor.DotMode.of; proofs there): 3xTF32 drops
# small*small' and the tensor core truncates the smalls to TF32; TF32 and bfloat16 round both operands (unit
# roundoff u = 2^-11, 2^-8: (1 + u)^2 - 1). The interpreter rounds operands as the GPU does and is exact float32
# otherwise (no truncation), so this holds on both.
PRODUCT_ERROR = {"highest": 5 * 2.0**-22, "high": (2 + 2.0**-11) * 2.0**-11, "medium": (2 + 2.0**-8) * 2.0**-8}


def product_error(backend: str, x_dtype: torch.dtype, m_dtype: torch.dtype) -> float:
    """``PRODUCT_ERROR`` of the precision the fused backend's products run at for these dtypes now: the CUDA GEMM
    runs every product as 3xTF32 whatever the dtypes and the mode ("highest"'s); Triton's float32-operand dots
    follow ``torch.get_float32_matmul_precision()``, and its products of x and M both float16 or both bfloat16 are
    exact in float32 (0: the low-precision rule's cases, not this bound's)."""
    if backend == "cuda":
        return PRODUCT_ERROR["highest"]
    if x_dtype == m_dtype and x_dtype in (torch.float16, torch.bfloat16):
        return 0.0
    return PRODUCT_ERROR[torch.get_float32_matmul_precision()]


def float32_error(geo: Geometry, rows: int, tensor_cores: bool = False, products: float = 0.0) -> float:
    """Bound on a float32 kernel's error relative to ``abs_terms``: the float32 sums' gamma_N plus ``products``,
    what rounding the dot's operands adds per product (``PRODUCT_ERROR``; 0 for exact float32 products).

    On the CPU (the interpreter's numpy dot, exact float32 on the already rounded operands) and for float32 FMA
    code: u = 2^-24. Tensor cores may align and truncate rather than round when they accumulate (Fasi, Higham,
    Mikaitis and Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021), so u = 2^-23 there.
    Plain TF32 errs by up to 2^-11 per product, ~2^-12 sqrt(R) of a typical product in a sum of R random-sign ones,
    above the "highest" bound (~R^2 2^-23 of one) for the R <= ~100 of most tests: they would catch a TF32 dot.
    """
    u = 2.0**-23 if tensor_cores else 2.0**-24
    N = float32_terms(geo, rows)
    return N * u / (1 - N * u) + products


def plain_torch(x, M, g, geo: Geometry, scaling, base=None):
    """(out, dx, dM) of the reference's maps run entirely in x's dtype, M cast to it: what plain PyTorch computes
    for MoRA in a 16-bit dtype, the baseline of the low-precision rule (kernel error <= 2x / 3x plain error)."""
    rope = rope_tables(geo.R, geo.used_blocks, x.device) if geo.t == MoRAType.ROPE else None
    M = M.to(x.dtype)
    c = reference.compress(x, geo, rope)
    out = reference.decompress(c @ M.T, geo) * scaling
    out = out if base is None else base + out.to(base.dtype)
    h = reference.decompress_adjoint(g.to(x.dtype), geo) * scaling
    dM = h.reshape(-1, geo.R).T @ c.reshape(-1, geo.R)
    dx = reference.compress_adjoint(h @ M, geo, rope)
    return out, dx, dM
