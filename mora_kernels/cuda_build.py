"""Build and load the CUDA extension (csrc/): toolkit discovery, flags, the just-in-time build (ninja, cached) and the
ahead-of-time one (setup.py). Needs a CUDA build of torch, nvcc and ninja, never a GPU; nothing here runs at import.

A plain ``pip install -e .`` compiles nothing. The extension is built ahead of time by
``MORA_KERNELS_BUILD_CUDA=1 pip install -e . --no-build-isolation`` (setup.py) or by ``build()`` here, and otherwise
just in time on first use (``torch.utils.cpp_extension.load`` with ninja, cached in ``build_directory()``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

EXTENSION_NAME = "mora_cuda_ext"
# The CUDA sources: inside the package in a wheel (pyproject.toml ships csrc/ as mora_kernels/csrc), beside it in a
# checkout (editable install or none).
_PACKAGE = Path(__file__).resolve().parent
SOURCE_DIR = next((d for d in (_PACKAGE / "csrc", _PACKAGE.parent / "csrc") if (d / "mora_ops.cpp").is_file()),
                  _PACKAGE / "csrc")
SOURCES = ("mora_ops.cpp", "maps.cu", "gemm.cu")
# nvcc flags on top of those torch adds; 3189 is a warning about torch's own headers.
NVCC_FLAGS = ("-O3", "-diag-suppress=3189")
CXX_FLAGS = ("-O3",)
DEFAULT_ARCH_LIST = "8.0;9.0"  # A100 and H100 / H200

# The CUTLASS / CuTe headers (the GEMM's tensor-core atoms and layouts) come from this wheel, a build-time dependency
# (pyproject.toml's `cuda` extra); its package `cutlass_library` ships them under source/include. A machine that
# cannot install it (the offline GPU machine) may name a CUTLASS include folder in this variable instead.
CUTLASS_DISTRIBUTION = "nvidia-cutlass"
CUTLASS_INCLUDE_VARIABLE = "MORA_KERNELS_CUTLASS_INCLUDE"

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
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", "2")
    cpp_extension = _cpp_extension()
    # cpp_extension reads CUDA_HOME once, at its import, possibly before this function ran.
    cpp_extension.CUDA_HOME = str(home)
    return home


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" notice on a machine without a
    GPU (building needs none; the notice is printed at its import)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        import torch.utils.cpp_extension as cpp_extension
    return cpp_extension


def cutlass_include_dir() -> Path:
    """The CUTLASS include folder (holding ``cute/`` and ``cutlass/``): ``$MORA_KERNELS_CUTLASS_INCLUDE`` when set,
    else the installed ``nvidia-cutlass`` wheel's.

    The wheel is found without importing its package (``cutlass_library`` imports CUDA Python bindings the build does
    not need). Raises RuntimeError naming what to install or set when neither has the headers: nothing is downloaded
    at build time.
    """
    override = os.environ.get(CUTLASS_INCLUDE_VARIABLE)
    if override:
        if not (Path(override) / "cute" / "tensor.hpp").is_file():
            raise RuntimeError(f"{CUTLASS_INCLUDE_VARIABLE}={override}: expected a CUTLASS include folder holding "
                               "cute/tensor.hpp")
        return Path(override)
    spec = importlib.util.find_spec("cutlass_library")
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in (Path(location) / "source" / "include" for location in locations):
        if (folder / "cute" / "tensor.hpp").is_file():
            return folder
    raise RuntimeError(
        "the CUDA extension needs the CUTLASS / CuTe headers of the nvidia-cutlass wheel "
        f"({'not installed' if spec is None else 'its cutlass_library has no source/include/cute'}): "
        f"pip install 'mora_kernels[cuda]' (or nvidia-cutlass), or set {CUTLASS_INCLUDE_VARIABLE} to a CUTLASS "
        "include folder")


def cutlass_version() -> str | None:
    """The version of the CUTLASS headers the build would use (``cutlass/version.h``; part of ``build_key``), or
    None when there are none."""
    try:
        text = (cutlass_include_dir() / "cutlass" / "version.h").read_text(errors="replace")
    except (RuntimeError, OSError):
        return None
    parts = [re.search(rf"^#define\s+CUTLASS_{part}\s+(\d+)", text, re.MULTILINE)
             for part in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(found.group(1) for found in parts) if all(parts) else None


def source_paths() -> list[str]:
    return [str(SOURCE_DIR / name) for name in SOURCES]


def toolkit_version(home: Path | None) -> str | None:
    """The CUDA toolkit's version from its ``cuda.h`` (``CUDA_VERSION 13000`` -> ``"13.0"``), or None."""
    try:
        text = (Path(home) / "include" / "cuda.h").read_text(errors="replace") if home is not None else ""
    except OSError:
        return None
    found = re.search(r"^#define\s+CUDA_VERSION\s+(\d+)", text, re.MULTILINE)
    return None if found is None else f"{int(found.group(1)) // 1000}.{int(found.group(1)) % 1000 // 10}"


def build_key() -> dict:
    """Everything that changes the compiled library: Python, torch and its CUDA, the toolkit, the arch list, the
    flags and the sources' bytes. A build is reused only under the same key."""
    sources = hashlib.sha256()  # every file of csrc/: the compiled sources and the headers they include
    for path in sorted(SOURCE_DIR.iterdir()) if SOURCE_DIR.is_dir() else ():
        if path.is_file():
            sources.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return {
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "toolkit": toolkit_version(cuda_home()),
        "cutlass": cutlass_version(),
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST),
        "flags": [*CXX_FLAGS, "|", *NVCC_FLAGS],
        "sources": sources.hexdigest(),
    }


def build_directory(key: dict | None = None) -> Path:
    """Cache folder of the just-in-time build for ``key`` (default: this machine's ``build_key()``): a folder named
    by the key's hash under ``$MORA_KERNELS_BUILD_DIR``, else under ``~/.cache/mora_kernels`` (``XDG_CACHE_HOME``)."""
    key = build_key() if key is None else key
    root = os.environ.get("MORA_KERNELS_BUILD_DIR") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mora_kernels")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    readable = f"torch{key['torch']}-cuda{key['torch_cuda']}-py{key['python'].replace('.', '')}"
    return Path(root) / f"{readable}-{digest}"


def _jit_library() -> Path | None:
    found = sorted(build_directory().glob(f"{EXTENSION_NAME}*.so"))
    return found[0] if found else None


def _ahead_of_time_library() -> Path | None:
    """The library built by setup.py (``MORA_KERNELS_BUILD_CUDA=1``), if present next to this file."""
    found = sorted(Path(__file__).resolve().parent.glob("_mora_cuda*.so"))
    return found[0] if found else None


def build(verbose: bool = False) -> Path:
    """Compile (or reuse the cached build of) the extension just in time and load it; returns the library path.

    Needs a CUDA build of torch, nvcc, ninja and the nvidia-cutlass wheel's headers, not a GPU. The first build
    takes minutes on 2 cores (most of it the binding, mora_ops.cpp, which includes torch's headers); a build is
    reused only under the same ``build_key()``. A library already loaded in this process stays loaded: after
    changing csrc/, build in a fresh process.
    """
    configure_build_environment()
    if not all(Path(path).is_file() for path in source_paths()):
        raise RuntimeError(f"the CUDA sources are not in {SOURCE_DIR}: this install of mora_kernels lacks its csrc/ "
                           "folder (a wheel ships it as mora_kernels/csrc); reinstall the package")
    include = cutlass_include_dir()
    cpp_extension = _cpp_extension()
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
        extra_include_paths=[str(include)],
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
    )
    if not _loaded_path:
        _loaded_path.append(Path(path))
    return Path(path)


@functools.cache
def load():
    """The ``torch.ops.mora_cuda`` namespace, loading (ahead-of-time build first) or building the library once."""
    if not _loaded_path:
        library = _ahead_of_time_library()
        if library is not None:
            torch.ops.load_library(str(library))
            _loaded_path.append(library)
        else:
            build()
    return torch.ops.mora_cuda


def info() -> dict:
    """Build state for ``python -m mora_kernels info``: whether a library for this torch, toolkit, arch list and
    sources (``build_key()``) is built, and where."""
    library = _loaded_path[0] if _loaded_path else (_ahead_of_time_library() or _jit_library())
    if library is None:
        summary = "not built (builds just in time on first use, or run `python -m mora_kernels build`)"
    else:
        summary = ("built; backend='auto' runs it only where tuned.json measured it correct and faster than Triton "
                   f"on this GPU ({library})")
    return {
        "built": library is not None,
        "library": None if library is None else str(library),
        "loaded": bool(_loaded_path),
        "summary": summary,
    }
