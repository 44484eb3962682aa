"""CUDA C++ backend: the csrc/ extension, built just in time or ahead of time, and its autograd and fake impls.

The ops ``mora_cuda::forward`` and ``mora_cuda::backward`` are defined in C++ (``csrc/mora_ops.cpp``,
``TORCH_LIBRARY``) with CUDA implementations; this module registers their fake (meta) implementations and the autograd
formula so ``torch.compile`` and ``torch.library.opcheck`` accept them.

Passes (csrc/mora.h): forward is, for types 1-4, the compress kernel writing ``c = C(x)`` (float32, R per row) and
one GEMM whose epilogue stores each result of ``c M^T``, scaled, plus base, cast, into every output that copies it
(``y`` never exists, ``out`` is written once); for types 6/7 that GEMM alone, gathering ``C(x)`` from x (rotated for
type 6) as it loads its tiles. Forward also returns c (types 1-4), which autograd keeps for dM. Backward is one op:
``h = scaling D^T(g)`` once, then ``dx = C^T(h M)`` and/or ``dM = h^T c`` (deterministic split-K), each only if
needed, with the saved c (types 1-4) or C(x) recomputed from x (types 6/7).

Build: a plain ``pip install -e .`` compiles nothing. The extension is built ahead of time by
``MORA_KERNELS_BUILD_CUDA=1 pip install -e . --no-build-isolation`` (setup.py) or by ``build()`` here, and otherwise
just in time on first use (``torch.utils.cpp_extension.load`` with ninja, cached in ``build_directory()``).

Nothing in this module needs a GPU or a compiler at import time.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .core import Geometry, MoRAType, rope_tables

EXTENSION_NAME = "mora_cuda_ext"
SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("mora_ops.cpp", "maps.cu", "gemm.cu")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# nvcc flags on top of those torch adds; 3189 is a warning about torch's own headers.
NVCC_FLAGS = ("-O3", "-diag-suppress=3189")
CXX_FLAGS = ("-O3",)

_loaded_path: list[Path] = []  # the library that defines the ops in this process (a library loads only once)


def cuda_home() -> Path | None:
    """The CUDA toolkit root (the folder holding ``bin/nvcc`` and ``include/cuda_runtime.h``), or None.

    ``CUDA_HOME`` / ``CUDA_PATH`` when set; else the folder above the real ``nvcc``. The ``nvcc`` on PATH may be a
    wrapper script (torch then guesses its parent, one level off), so nvcc itself is asked: its dry run prints
    ``TOP=<toolkit>/bin/..``. Last, ``/usr/local/cuda``.
    """

    def is_toolkit(path) -> bool:
        return path is not None and (Path(path) / "include" / "cuda_runtime.h").is_file()

    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if is_toolkit(os.environ.get(variable)):
            return Path(os.environ[variable])
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidate = Path(nvcc).resolve().parent.parent
        if is_toolkit(candidate):
            return candidate
        try:
            dry_run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                     capture_output=True, text=True, timeout=30)
            top = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
        except (OSError, subprocess.SubprocessError):
            top = None
        if top and is_toolkit(Path(top.group(1).strip()).resolve()):
            return Path(top.group(1).strip()).resolve()
    if is_toolkit("/usr/local/cuda"):
        return Path("/usr/local/cuda")
    return None


def configure_build_environment() -> Path:
    """Point torch's extension builder at the toolkit and set build defaults; returns CUDA_HOME.

    ``TORCH_CUDA_ARCH_LIST`` defaults to A100 and H100 (``8.0;9.0``), ``MAX_JOBS`` to 2; both keep a caller's value.
    """
    if torch.version.cuda is None:
        raise RuntimeError(f"the CUDA backend needs a CUDA build of torch, this is {torch.__version__}")
    home = cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit found: set CUDA_HOME to the folder holding bin/nvcc and include/")
    os.environ["CUDA_HOME"] = str(home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", "2")
    import torch.utils.cpp_extension as cpp_extension

    # cpp_extension reads CUDA_HOME once, at its import, possibly before this function ran.
    cpp_extension.CUDA_HOME = str(home)
    return home


def source_paths() -> list[str]:
    return [str(SOURCE_DIR / name) for name in SOURCES]


def build_directory() -> Path:
    """Cache of the just-in-time build: ``$MORA_KERNELS_BUILD_DIR``, else per torch/CUDA/Python version."""
    if "MORA_KERNELS_BUILD_DIR" in os.environ:
        return Path(os.environ["MORA_KERNELS_BUILD_DIR"])
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-py{sys.version_info[0]}{sys.version_info[1]}"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mora_kernels" / tag


def _jit_library() -> Path | None:
    found = sorted(build_directory().glob(f"{EXTENSION_NAME}*.so"))
    return found[0] if found else None


def _ahead_of_time_library() -> Path | None:
    """The library built by setup.py (``MORA_KERNELS_BUILD_CUDA=1``), if present next to this file."""
    found = sorted(Path(__file__).resolve().parent.glob("_mora_cuda*.so"))
    return found[0] if found else None


def build(verbose: bool = False) -> Path:
    """Compile (or reuse the cached build of) the extension just in time and load it; returns the library path.

    Needs a CUDA build of torch, nvcc and ninja, not a GPU. The first build takes ~30-60 s on 2 cores (most of it
    the binding, mora_ops.cpp); ninja rebuilds only what changed. A library already loaded in this process stays
    loaded: after changing csrc/, build in a fresh process.
    """
    configure_build_environment()
    if not all(Path(path).is_file() for path in source_paths()):
        raise RuntimeError(f"the CUDA sources are not in {SOURCE_DIR} (an install without csrc/ needs the "
                           "ahead-of-time build: MORA_KERNELS_BUILD_CUDA=1 pip install . --no-build-isolation)")
    import torch.utils.cpp_extension as cpp_extension

    directory = build_directory()
    if _loaded_path and _loaded_path[0].parent != directory:
        # A second library would define the mora_cuda ops again, which torch refuses.
        raise RuntimeError(f"the CUDA extension is already loaded from {_loaded_path[0]} in this process; "
                           "build in a fresh process (python -m mora_kernels build)")
    directory.mkdir(parents=True, exist_ok=True)
    path = cpp_extension.load(
        name=EXTENSION_NAME,
        sources=source_paths(),
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS),
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
    )
    if not _loaded_path:
        _loaded_path.append(Path(path))
    return Path(path)


def resource_usage(archs: tuple[str, ...] = ("80", "90")) -> list[dict]:
    """Registers, stack, spills and shared memory of every kernel, from ptxas (``nvcc --resource-usage``).

    Compiles the kernel files (they include no torch header: seconds) with the flags torch uses for the extension.
    Returns one dict per (kernel, arch): ``kernel`` (demangled), ``arch``, ``registers``, ``stack_bytes``,
    ``spill_store_bytes``, ``spill_load_bytes``, ``shared_bytes``.
    """
    home = configure_build_environment()
    import torch.utils.cpp_extension as cpp_extension

    flags = [*cpp_extension.COMMON_NVCC_FLAGS, *NVCC_FLAGS, "-std=c++17", "--resource-usage"]
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    log = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in SOURCES:
            if name.endswith(".cu"):
                result = subprocess.run(
                    [str(home / "bin" / "nvcc"), *flags, "-c", str(SOURCE_DIR / name), "-o", f"{scratch}/{name}.o"],
                    capture_output=True, text=True, check=True,
                )
                log.append(result.stdout + result.stderr)
    usage, current = [], None
    for line in "\n".join(log).splitlines():
        if match := re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line):
            current = {"kernel": match.group(1), "arch": match.group(2)}
        elif current and (match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.update(stack_bytes=int(match.group(1)), spill_store_bytes=int(match.group(2)),
                           spill_load_bytes=int(match.group(3)))
        elif current and (match := re.search(r"Used (\d+) registers", line)):
            shared = re.search(r"(\d+) bytes smem", line)
            current.update(registers=int(match.group(1)), shared_bytes=int(shared.group(1)) if shared else 0)
            usage.append(current)
            current = None
    if shutil.which("c++filt"):
        names = subprocess.run(["c++filt"], input="\n".join(u["kernel"] for u in usage), capture_output=True,
                               text=True).stdout.splitlines()
        for entry, name in zip(usage, names):
            entry["kernel"] = re.sub(r"mora::\(anonymous namespace\)::", "", name)
    return usage


@functools.cache
def _loaded():
    """The ``torch.ops.mora_cuda`` namespace, loading (ahead-of-time build first) or building the library once."""
    if not _loaded_path:
        library = _ahead_of_time_library()
        if library is not None:
            torch.ops.load_library(str(library))
            _loaded_path.append(library)
        else:
            build()
    _register_python_parts()
    return torch.ops.mora_cuda


def info() -> dict:
    """Build state for ``python -m mora_kernels info``: whether built, where, and whether verified on a GPU."""
    library = _loaded_path[0] if _loaded_path else (_ahead_of_time_library() or _jit_library())
    if library is None:
        summary = "not built (builds just in time on first use, or run `python -m mora_kernels build`)"
    else:
        summary = ("built; backend='auto' runs it only where tuned.json measured it correct and faster than Triton "
                   "on this GPU")
    return {
        "built": library is not None,
        "library": None if library is None else str(library),
        "loaded": bool(_loaded_path),
        "summary": summary,
    }


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
    return True, "not built yet: builds just in time on first use (~1-2 minutes)"


# ----------------------------------------------------------------------------------------------------------------
# Fake (meta) implementations and autograd of the C++ ops.


def _fake_forward(x, M, base, cos, sin, out_features, mora_type, scaling):
    dtype = x.dtype if base is None else base.dtype
    out = x.new_empty((*x.shape[:-1], out_features), dtype=dtype)
    if MoRAType(mora_type).blockwise:
        return out, x.new_empty((0,), dtype=torch.float32)
    return out, x.new_empty((math.prod(x.shape[:-1]), M.shape[0]), dtype=torch.float32)


def _fake_backward(grad, x, c, M, cos, sin, out_features, mora_type, scaling, compute_dx, compute_dM):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if compute_dx else x.new_empty((0,))
    dM = M.new_empty(M.shape) if compute_dM else M.new_empty((0,))
    return dx, dM


def _setup_context(ctx, inputs, output):
    x, M, base, cos, sin, out_features, mora_type, scaling = inputs
    c = output[1]
    ctx.mark_non_differentiable(c)
    # Types 1-4 keep C(x) (R floats per row) for dM; types 6/7 keep only x and recompute it.
    ctx.save_for_backward(x, None if MoRAType(mora_type).blockwise else c, M, cos, sin)
    ctx.config = (out_features, mora_type, scaling)


def _backward(ctx, grad, _grad_c):
    x, c, M, cos, sin = ctx.saved_tensors
    needs_dx, needs_dM = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx = dM = None
    if needs_dx or needs_dM:
        dx, dM = torch.ops.mora_cuda.backward(grad.contiguous(), x, c, M, cos, sin, *ctx.config, needs_dx, needs_dM)
    dbase = grad if ctx.needs_input_grad[2] else None  # out = base + ..., and grad has base's dtype
    return dx if needs_dx else None, dM if needs_dM else None, dbase, None, None, None, None, None


def _register_python_parts():
    torch.library.register_fake("mora_cuda::forward", _fake_forward)
    torch.library.register_fake("mora_cuda::backward", _fake_backward)
    torch.library.register_autograd("mora_cuda::forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Backend interface (mora_kernels.ops).


def apply(x, M, geo: Geometry, rope=None, scaling: float = 1.0, base=None, inplace: bool = False):
    """``base + scaling * D(M C(x))`` by the CUDA kernels, differentiable in x, M and base.

    Args:
        x: ``(..., in_features)`` CUDA tensor, float32/float16/bfloat16 (made contiguous here).
        M: ``(R, R)``, float32/float16/bfloat16; computed in float32.
        geo: the validated geometry (``core.check_inputs``).
        rope: float32 ``(cos, sin)`` of shape ``(>= used_blocks, R)`` for type 6; ``core.rope_tables`` if None.
        scaling: factor on the update.
        base: optional ``(..., out_features)`` tensor the update is added to; sets the output dtype.
        inplace: write the result into base and return it. The kernels have no aliasing-safe in-place path yet,
            so this copies the fused result into base (one extra pass; the Triton backend writes in place).

    Returns:
        ``(..., out_features)`` in base's dtype if given, else x's.
    """
    for name, tensor in (("x", x), ("M", M), ("base", base)):
        if tensor is not None and tensor.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 for backend='cuda', got {tensor.dtype} "
                            "(backend='reference' computes float64)")
    ops = _loaded()
    cos = sin = None
    if geo.t == MoRAType.ROPE:
        cos, sin = rope if rope is not None else rope_tables(geo.R, geo.used_blocks, x.device)
        cos, sin = cos.contiguous(), sin.contiguous()
    out, _ = ops.forward(
        x.contiguous(),
        M.contiguous(),
        None if base is None else base.contiguous(),
        cos,
        sin,
        geo.m,
        int(geo.t),
        float(scaling),
    )
    return base.copy_(out) if inplace else out
