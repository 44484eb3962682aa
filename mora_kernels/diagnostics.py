"""Compile-time diagnostics of the Triton and CUDA kernels, for the CLI (``python -m mora_kernels kernels``), CI and
tuning: which launches the launchers can make, and what each compiles to for sm_80 / sm_90 without a GPU (registers,
spills, shared memory, tensor cores). Not imported by the runtime path."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import tempfile

import torch

from . import cuda_build, tuning
from .core import Geometry, MoRAType

FLOOR_KERNELS = ("compress_kernel", "decompress_adjoint_kernel", "compress_adjoint_kernel")  # triton_floor's
KERNELS = (*FLOOR_KERNELS, "_project_kernel", "_dm_kernel")  # what mora runs: the floor's and triton_mora's
MIXED_KERNELS = ("_mixed_project_kernel", "_mixed_dm_kernel")  # triton_mixed's (mora_mixed; with the floor's)
_INDEX_TYPES = {torch.int64: "i64", torch.int32: "i32"}  # index pointers (the mixed kernels' segment maps)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _LaunchRecorder:
    """Stands in for a kernel during ``launch_variants``: ``kernel[grid](*args, **kwargs)`` records the launch's
    Triton signature (pointer element types, scalars, constexpr values), num_warps and num_stages instead of running
    it."""

    def __init__(self, kernel, launches: dict):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, num_warps, num_stages=3, **kwargs):
        from .triton_floor import TL_DTYPE

        values = dict(zip(self.kernel.arg_names, args), **kwargs)
        signature, constexprs = {}, {}
        # In the kernel's own order, as ASTSource expects; annotations are strings here (``from __future__``).
        for name, param in inspect.signature(self.kernel.fn).parameters.items():
            value = values[name]
            if "constexpr" in str(param.annotation):
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                kind = _INDEX_TYPES.get(value.dtype) or TL_DTYPE[value.dtype].name
                signature[name] = "*" + kind
            else:
                signature[name] = "fp32" if isinstance(value, float) else "i32"
        key = (self.kernel.__name__, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()),
               num_warps, num_stages)
        self.launches.setdefault(key, (self.kernel, signature, constexprs, num_warps, num_stages))


def launch_variants(dtypes: str = "all", tiles: dict | None = None):
    """(kernel, signature, constexprs, num_warps, num_stages) of every distinct launch ``triton_mora``'s ``forward``
    and ``backward`` can make, and ``triton_mixed``'s ``mixed_forward`` / ``mixed_backward`` (decode: one token;
    prefill: many rows of A per adapter), found by running them: on meta tensors (nothing is computed or
    allocated), with each kernel replaced by a ``_LaunchRecorder``, over every input that changes a launch's code:
    the type (A_MODE, GROUPS, the adjoint's MODE), the dtypes of x, M and base (pointer types, the dot's mode), base
    or none, and few or many rows (the tile configuration). The launchers' own logic picks every constexpr, so this
    list cannot drift from them. Integer arguments get the generic ``i32``: at launch Triton also specializes those
    equal to 1 or divisible by 16 (unit strides, aligned sizes), code this list does not hold apart. Swaps the
    backend module's kernels while it runs: a diagnostic for a process of its own, not for a training job.

    ``dtypes="all"``: every float dtype for x, M and base. ``"defaults"``: the combinations the layer and the
    functional API make unless asked otherwise, M float32 or x's dtype and base none or x's dtype.
    ``tiles``: a tuning table entry's ``tiles`` (key -> tile) to use instead of the defaults (meta tensors have no
    GPU, so the table itself never applies here)."""
    if dtypes not in ("all", "defaults"):
        raise ValueError(f"dtypes must be 'all' or 'defaults', got {dtypes!r}")
    from . import triton_floor, triton_mixed, triton_mora

    launches = {}
    homes = {triton_floor: FLOOR_KERNELS, triton_mora: KERNELS[len(FLOOR_KERNELS):], triton_mixed: MIXED_KERNELS}
    kernels = {(module, name): getattr(module, name) for module, names in homes.items() for name in names}
    n, m, R = 64, 48, 16  # any sizes: only the row count (few or many rows of A) reaches the constexprs
    K = 4  # adapters of mora_mixed: decode is 1 token, prefill FEW_ROWS rows of A per adapter
    overrides = dict(tuning.OVERRIDES)
    try:
        for (module, name), kernel in kernels.items():
            setattr(module, name, _LaunchRecorder(kernel, launches))
        tuning.OVERRIDES.update({key: tuning.Tile(*tile) for key, tile in (tiles or {}).items()})
        for t in MoRAType:
            geo = Geometry(n, m, R, t)
            cos, sin = (torch.empty(geo.used_blocks, R, device="meta") for _ in range(2))
            if t != MoRAType.ROPE:
                cos = sin = None
            for tokens in (1, tuning.FEW_ROWS):
                for x_dtype in _FLOAT_DTYPES:
                    x = torch.empty(tokens, n, dtype=x_dtype, device="meta")
                    for m_dtype in _FLOAT_DTYPES if dtypes == "all" else {torch.float32, x_dtype}:
                        M = torch.empty(R, R, dtype=m_dtype, device="meta")
                        # None: no base, out in x's dtype
                        for out_dtype in (None, *(_FLOAT_DTYPES if dtypes == "all" else (x_dtype,))):
                            base = None if out_dtype is None else torch.empty(tokens, m, dtype=out_dtype,
                                                                              device="meta")
                            out, c = triton_mora.forward(x, M, cos, sin, base, geo, 0.5)
                            g = torch.empty_like(out)
                            saved = x if t.blockwise else c
                            triton_mora.backward(g, saved, M, cos, sin, geo, 0.5, x_dtype, True, True)
                            # The same batch as a mixed one: K stacked adapters, a token index, per-adapter factors.
                            mixed_tokens = 1 if tokens == 1 else tuning.FEW_ROWS * K
                            xs, Ms = x.new_empty(mixed_tokens, n), M.new_empty(K, R, R)
                            bases = None if base is None else base.new_empty(mixed_tokens, m)
                            index = torch.empty(mixed_tokens, dtype=torch.int64, device="meta")
                            scale = torch.empty(K, device="meta")
                            out, c = triton_mixed.mixed_forward(xs, Ms, index, scale, cos, sin, bases, geo)
                            saved = xs if t.blockwise else c
                            triton_mixed.mixed_backward(torch.empty_like(out), saved, Ms, index, scale, cos, sin, geo,
                                                        x_dtype, True, True)
    finally:
        for (module, name), kernel in kernels.items():
            setattr(module, name, kernel)
        tuning.OVERRIDES.clear()
        tuning.OVERRIDES.update(overrides)
    return list(launches.values())


def _variant_label(signature: dict, constexprs: dict, stages: int) -> str:
    pointers = " ".join(f"{name[:-4]}={kind[1:]}" for name, kind in signature.items()
                        if kind.startswith("*") and name not in ("cos_ptr", "sin_ptr"))
    flags = " ".join(f"{name}={value}" for name, value in constexprs.items() if not name.startswith("BLOCK_"))
    blocks = "x".join(str(value) for name, value in constexprs.items() if name.startswith("BLOCK_"))
    return f"{pointers} {flags} tile={blocks} stages={stages}"


def compile_launch(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int,
                   cubin_path: str) -> dict:
    """Compile one launch for ``sm_<arch>`` (no GPU needed) and read its resources from the cubin
    (``cuobjdump -res-usage``, so with Triton's own ptxas options): registers per thread, ``spill_bytes`` (the stack
    frame and local memory ptxas reserved: these kernels have no local arrays or calls, so that is where spilled
    registers live, and 0 means no spills), shared memory, and whether the PTX uses tensor cores (mma / wgmma)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.knobs import nvidia

    compiled = triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    with open(cubin_path, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([nvidia.cuobjdump.path, "-res-usage", cubin_path], capture_output=True, text=True,
                           check=True).stdout
    fields = dict((k, int(v)) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return dict(registers=fields["REG"], spill_bytes=fields["STACK"] + fields["LOCAL"],
                shared_bytes=compiled.metadata.shared,
                tensor_cores=bool(re.search(r"\b(wgmma|mma)\.", compiled.asm["ptx"])))


def compile_report(archs=(90, 80), dtypes: str = "all", tiles: str = "all") -> list[dict]:
    """Compile every launch the launchers can make (``launch_variants(dtypes)``) for each CUDA arch, without a GPU:
    one row per (kernel, variant, arch) with ``compile_launch``'s fields.

    ``tiles="defaults"``: the default tiles only; ``"all"``: also every tuned.json entry measured with this Triton
    version (so a shipped tuning never spills either). Must run in a process where TRITON_INTERPRET is unset (the
    interpreter replaces the compiler). 0.3-0.5 s per compile on a cold Triton cache (2 cores): ~2 minutes for
    ``dtypes="defaults"`` with the default tiles.
    """
    from .triton_floor import interpreting

    if interpreting():
        raise RuntimeError("compile_report needs the Triton compiler: run it in a process without TRITON_INTERPRET=1")
    if tiles not in ("all", "defaults"):
        raise ValueError(f"tiles must be 'all' or 'defaults', got {tiles!r}")
    tile_sets = [("defaults", None)]
    if tiles == "all":
        version = tuning.triton_version()
        tile_sets += [(f"tuned for {e['gpu']}", e["tiles"]) for e in tuning.load()["entries"]
                      if e["triton"] == version and e.get("tiles")]
    rows, seen = [], set()
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        for source, tile_set in tile_sets:
            for kernel, signature, constexprs, warps, stages in launch_variants(dtypes, tile_set):
                label = _variant_label(signature, constexprs, stages)
                if (kernel.__name__, label, warps) in seen:
                    continue  # a tuned tile equal to a default one is compiled once
                seen.add((kernel.__name__, label, warps))
                for arch in archs:
                    usage = compile_launch(kernel, signature, constexprs, warps, stages, arch, cubin)
                    rows.append(dict(kernel=kernel.__name__, variant=label, arch=f"sm_{arch}", num_warps=warps,
                                     tiles=source, **usage))
    return rows


SPILLS = r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"  # ptxas -v


def cuda_resource_usage(archs: tuple[str, ...] = ("80", "90")) -> list[dict]:
    """Registers, stack, spills and shared memory of every kernel, from ptxas (``nvcc --resource-usage``).

    Compiles the kernel files (they include no torch header: seconds) with the flags torch uses for the extension.
    Returns one dict per (kernel, arch): ``kernel`` (demangled), ``arch``, ``registers``, ``stack_bytes``,
    ``spill_store_bytes``, ``spill_load_bytes``, ``shared_bytes``.
    """
    home = cuda_build.configure_build_environment()
    import torch.utils.cpp_extension as cpp_extension

    flags = [*cpp_extension.COMMON_NVCC_FLAGS, *cuda_build.NVCC_FLAGS, "-std=c++17", "--resource-usage"]
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    log = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in cuda_build.SOURCES:
            if name.endswith(".cu"):
                result = subprocess.run(
                    [str(home / "bin" / "nvcc"), *flags, "-c", str(cuda_build.SOURCE_DIR / name),
                     "-o", f"{scratch}/{name}.o"],
                    capture_output=True, text=True, check=True,
                )
                log.append(result.stdout + result.stderr)
    usage, current = [], None
    for line in "\n".join(log).splitlines():
        if match := re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line):
            current = {"kernel": match.group(1), "arch": match.group(2)}
        elif current and (match := re.search(SPILLS, line)):
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
