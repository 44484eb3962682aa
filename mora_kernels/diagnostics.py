"""Compile-time diagnostics of the Triton and CUDA kernels, for the CLI (``python -m mora_kernels kernels``), CI and
tuning: which launches the launchers can make, and what each compiles to for sm_80 / sm_90 without a GPU (registers,
spills, shared memory, tensor cores). Not imported by the runtime path."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import torch

from . import cuda_build, tuning
from .core import Geometry, MoRAType

FLOOR_KERNELS = ("compress_kernel", "decompress_adjoint_kernel", "compress_adjoint_kernel")  # triton_floor's
KERNELS = (*FLOOR_KERNELS, "_project_kernel", "_dm_kernel")  # what mora runs: the floor's, triton_mora's
MIXED_KERNELS = ("_mixed_project_kernel", "_mixed_dm_kernel")  # triton_mixed's (mora_mixed; with the floor's)
_INDEX_TYPES = {torch.int64: "i64", torch.int32: "i32"}  # index pointers (the mixed kernels' segment maps)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Launch:
    """One launch a launcher made under ``recording``: the kernel (a ``triton.JITFunction``), its grid, every
    argument by name in the kernel's parameter order (tensors are the launcher's meta tensors), num_warps and
    num_stages."""

    kernel: object
    grid: tuple
    args: dict
    num_warps: int
    num_stages: int

    def generic_signature(self) -> tuple[dict, dict, dict]:
        """(signature, constexprs, attrs) with every integer a generic ``i32`` and no alignment: one entry per code
        path the launcher can choose, whatever the sizes (``launch_variants``). Except in an aligned projection
        (``triton_mora.aligned``), whose tiles rely on Triton specializing some of its ``ALIGNED_ARGS`` as divisible
        by 16 and some of its ``UNIT_ARGS`` as the constant 1 (``triton_mora.aligned_specialization``): so
        specialized here too, the rest generic."""
        from . import triton_mora

        aligned, unit = (), ()
        if self.kernel.__name__ == "_project_kernel":
            aligned, unit = triton_mora.aligned_specialization(self.args)
        signature, constexprs, attrs = {}, {}, {}
        for index, (name, is_constexpr, _) in enumerate(parameters(self.kernel)):
            value = self.args[name]
            if is_constexpr or name in unit:
                signature[name], constexprs[name] = "constexpr", value
                continue
            if isinstance(value, torch.Tensor):
                signature[name] = "*" + _pointer_type(value)
            else:
                signature[name] = "fp32" if isinstance(value, float) else "i32"
            if name in aligned:
                attrs[(index,)] = [["tt.divisibility", _DIVISIBILITY]]
        return signature, constexprs, attrs


def parameters(kernel) -> list[tuple[str, bool, bool]]:
    """(name, is constexpr, marked do_not_specialize) of each parameter of a jitted kernel, in order (also under
    the interpreter, whose kernels have no ``params``; annotations are strings there: ``from __future__``)."""
    if hasattr(kernel, "params"):
        return [(p.name, p.is_constexpr, p.do_not_specialize or p.do_not_specialize_on_alignment)
                for p in kernel.params]
    return [(name, "constexpr" in str(p.annotation), False)
            for name, p in inspect.signature(kernel.fn).parameters.items()]


def _pointer_type(tensor: torch.Tensor) -> str:
    from .triton_floor import TL_DTYPE

    return _INDEX_TYPES.get(tensor.dtype) or TL_DTYPE[tensor.dtype].name


# Triton's launch specialization (triton/runtime/jit.py: the binder calls ``specialize_impl`` per argument, the
# backend's ``parse_attr`` turns its "D" key into ``tt.divisibility``; the same rules in the Python
# ``create_specialize_impl`` of older releases and the native ``native_specialize_impl`` of 3.9):
_DIVISIBILITY = 16  # an integer that is a multiple of it, or a pointer aligned to it, gets tt.divisibility = 16
_I32 = (-2**31, 2**31 - 1)  # integers outside are i64 (u64 above 2**63 - 1)


def specialize(launch: Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``launch`` as Triton's runtime builds them when the kernel is launched with
    these values, the ``ASTSource`` arguments of that launch's compile: an integer argument equal to 1 becomes the
    constant 1; integers get ``i32`` (``i64`` / ``u64`` out of its range) and, when divisible by 16, the attribute
    ``tt.divisibility = 16``; a tensor is a pointer to its element type, with that attribute when its address is a
    multiple of 16; floats are ``fp32`` and bools ``u1``, never specialized. Tensor addresses: a meta tensor's
    ``data_ptr()`` is its storage offset in bytes (its storage starts at 0), so this assumes that the real
    allocation starts 16-byte aligned (the CUDA caching allocator aligns every block to 512 bytes) and keeps the
    launcher's own offsets (views). Parameters marked ``do_not_specialize`` (none in this package) are refused
    rather than guessed."""
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, is_constexpr, fixed) in enumerate(parameters(launch.kernel)):
        value = launch.args[name]
        if is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        if fixed:
            raise ValueError(f"{launch.kernel.__name__}: parameter {name} is marked do_not_specialize; "
                             "specialize() does not model that")
        aligned = False
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _pointer_type(value)
            aligned = value.data_ptr() % _DIVISIBILITY == 0
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if _I32[0] <= value <= _I32[1] else "u64" if 2**63 <= value < 2**64 else "i64"
            aligned = value % _DIVISIBILITY == 0
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{launch.kernel.__name__}: argument {name} is a {type(value).__name__}; expected a "
                            "tensor, int, float or bool")
        if aligned:
            attrs[(index,)] = [["tt.divisibility", _DIVISIBILITY]]
    return signature, constexprs, attrs


class _LaunchRecorder:
    """Stands in for a kernel under ``recording``: ``kernel[grid](*args, **kwargs)`` appends a ``Launch`` instead
    of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, num_warps, num_stages=3, **kwargs: self.launches.append(
            Launch(self.kernel, tuple(grid), dict(zip(self.kernel.arg_names, args), **kwargs), num_warps, num_stages))


@contextlib.contextmanager
def recording(tiles: dict | None = None):
    """Within the block, every launch of the Triton backend's kernels (``KERNELS``, ``MIXED_KERNELS``) is recorded
    into the yielded list instead of run: call the launchers on meta tensors (nothing computed or allocated).
    ``tiles``: a tuning table entry's ``tiles`` (key -> tile) to use instead of the defaults (meta tensors have no
    GPU, so the table itself never applies here). Swaps the backend modules' kernels while it runs: a diagnostic
    for a process of its own, not for a training job."""
    from . import triton_floor, triton_mixed, triton_mora

    launches = []
    homes = {triton_floor: FLOOR_KERNELS, triton_mora: KERNELS[len(FLOOR_KERNELS):], triton_mixed: MIXED_KERNELS}
    kernels = {(module, name): getattr(module, name) for module, names in homes.items() for name in names}
    overrides = dict(tuning.OVERRIDES)
    try:
        for (module, name), kernel in kernels.items():
            setattr(module, name, _LaunchRecorder(kernel, launches))
        tuning.OVERRIDES.update({key: tuning.Tile(*tile) for key, tile in (tiles or {}).items()})
        yield launches
    finally:
        for (module, name), kernel in kernels.items():
            setattr(module, name, kernel)
        tuning.OVERRIDES.clear()
        tuning.OVERRIDES.update(overrides)


def launch_variants(dtypes: str = "all", tiles: dict | None = None):
    """(kernel, signature, constexprs, num_warps, num_stages, attrs) of every distinct launch ``triton_mora.forward``
    and ``triton_mora.backward`` can make, and ``triton_mixed``'s ``mixed_forward`` / ``mixed_backward`` (decode: one
    token; prefill: many rows of A per adapter), found by running them under ``recording`` over every input that changes
    a launch's code: the type (A_MODE, GROUPS, the adjoint's MODE), the dtypes of x, M and base (pointer types, the
    dot's mode), PyTorch's float32 matmul precision (the dot's mode for float32 operands: each of
    ``MATMUL_PRECISIONS``), base or none, and few or many rows (the tile configuration). The launchers' own logic picks
    every constexpr, so this list cannot drift from them. Integer arguments get the generic ``i32``: at launch Triton
    also specializes those equal to 1 or divisible by 16 (unit strides, aligned sizes), code this list does not hold
    apart (``specialize`` derives that for given sizes; ``sass_report`` compiles the benchmark's launches so), except
    for the aligned projections, whose tiles need it (``Launch.generic_signature``; ``attrs``: the ``ASTSource``
    attributes, empty elsewhere).

    ``dtypes="all"``: every float dtype for x, M and base. ``"defaults"``: the combinations the layer and the
    functional API make unless asked otherwise, M float32 or x's dtype and base none or x's dtype.
    ``tiles``: as ``recording``'s."""
    if dtypes not in ("all", "defaults"):
        raise ValueError(f"dtypes must be 'all' or 'defaults', got {dtypes!r}")
    from . import triton_mixed, triton_mora
    from .triton_floor import MATMUL_PRECISIONS, float32_matmul_precision

    # Any sizes: only the row count (few or many rows of A) reaches the constexprs, the power of two that divides
    # the projection's sizes and row strides where Triton does not see it (``triton_mora.vector_width``: 8, 4 and 1
    # in the last three geometries), and for x's blocks (types 6/7) whether the projection is aligned
    # (``triton_mora.aligned``: in the first, R, n, m and the strides multiples of 16, one copy per column), which
    # chooses its tiles and its specialization.
    sizes = {"aligned": (64, 48, 16), "eights": (72, 40, 24), "fours": (60, 44, 12), "unaligned": (62, 46, 14)}
    K = 4  # adapters of mora_mixed: decode is 1 token, prefill FEW_ROWS rows of A per adapter
    with recording(tiles) as launches:
        for precision, t, size in itertools.product(MATMUL_PRECISIONS, MoRAType, sizes):
            n, m, R = sizes[size]
            with float32_matmul_precision(precision):  # DotMode.of reads it: each mode's float32 dots
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
                                out, c = triton_mora.forward(x, M, (cos, sin), base, geo, 0.5)
                                g = torch.empty_like(out)
                                saved = x if t.blockwise else c
                                triton_mora.backward(g, saved, M, (cos, sin), geo, 0.5, x_dtype, (True, True))
                                # The same batch as a mixed one: K stacked adapters, a token index, per-adapter factors.
                                mixed_tokens = 1 if tokens == 1 else tuning.FEW_ROWS * K
                                xs, Ms = x.new_empty(mixed_tokens, n), M.new_empty(K, R, R)
                                bases = None if base is None else base.new_empty(mixed_tokens, m)
                                index = torch.empty(mixed_tokens, dtype=torch.int64, device="meta")
                                scale = torch.empty(K, device="meta")
                                out, c = triton_mixed.mixed_forward(xs, Ms, (index, scale), (cos, sin), bases, geo)
                                saved = xs if t.blockwise else c
                                g = torch.empty_like(out)
                                triton_mixed.mixed_backward(g, saved, Ms, (index, scale), (cos, sin), geo, x_dtype,
                                                            (True, True))

    variants = {}
    for launch in launches:
        signature, constexprs, attrs = launch.generic_signature()
        key = (launch.kernel.__name__, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()),
               tuple(attrs), launch.num_warps, launch.num_stages)
        variants.setdefault(key, (launch.kernel, signature, constexprs, launch.num_warps, launch.num_stages, attrs))
    return list(variants.values())


def _variant_label(signature: dict, constexprs: dict, stages: int) -> str:
    pointers = " ".join(f"{name[:-4]}={kind[1:]}" for name, kind in signature.items()
                        if kind.startswith("*") and name not in ("cos_ptr", "sin_ptr"))
    flags = " ".join(f"{name}={value}" for name, value in constexprs.items() if not name.startswith("BLOCK_"))
    blocks = "x".join(str(value) for name, value in constexprs.items() if name.startswith("BLOCK_"))
    return f"{pointers} {flags} tile={blocks} stages={stages}"


def compile_launch(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int,
                   cubin_path: str, attrs: dict | None = None) -> dict:
    """Compile one launch for ``sm_<arch>`` (no GPU needed) and read its resources from the cubin
    (``cuobjdump -res-usage``, so with Triton's own ptxas options): registers per thread, ``spill_bytes`` (the stack
    frame and local memory ptxas reserved: these kernels have no local arrays or calls, so that is where spilled
    registers live, and 0 means no spills), shared memory, and whether the PTX uses tensor cores (mma / wgmma).
    ``attrs``: ``specialize``'s, to compile what a launch with given sizes compiles; the compile lands in Triton's
    cache (``TRITON_CACHE_DIR``) like a launch's."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.knobs import nvidia

    compiled = triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs, attrs),
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
            for kernel, signature, constexprs, warps, stages, attrs in launch_variants(dtypes, tile_set):
                label = _variant_label(signature, constexprs, stages) + (" aligned" if attrs else "")
                if (kernel.__name__, label, warps) in seen:
                    continue  # a tuned tile equal to a default one is compiled once
                seen.add((kernel.__name__, label, warps))
                for arch in archs:
                    usage = compile_launch(kernel, signature, constexprs, warps, stages, arch, cubin, attrs)
                    rows.append(dict(kernel=kernel.__name__, variant=label, arch=f"sm_{arch}", num_warps=warps,
                                     tiles=source, **usage))
    return rows


SPILLS = r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"  # ptxas -v


def cuobjdump() -> str:
    """A ``cuobjdump``: the toolkit's, else the one the Triton wheel ships (a toolkit without it, as on this
    project's CI machines, still compiles)."""
    home = cuda_build.cuda_home()
    if home is not None and (home / "bin" / "cuobjdump").is_file():
        return str(home / "bin" / "cuobjdump")
    try:
        from triton.knobs import nvidia
    except ImportError:
        raise RuntimeError("reading the CUDA kernels' SASS needs cuobjdump: neither the CUDA toolkit "
                           f"({home}) nor an installed Triton (pip install 'mora_kernels[triton]') has one") from None
    return nvidia.cuobjdump.path


TENSOR_CORE_OPCODES = ("HMMA", "HGMMA")  # mma.sync (sm_80, and sm_90) and wgmma (sm_90) in SASS


SASS_OPCODES = (*TENSOR_CORE_OPCODES, "FFMA", "LDGSTS")  # LDGSTS: cp.async, global -> shared without registers


def sass_opcode_counts(listing: str) -> dict[str, dict[str, int]]:
    """Per kernel (mangled name) of a ``cuobjdump -sass`` listing: how many instructions of each of ``SASS_OPCODES``
    it holds (static counts over the whole kernel)."""
    counts, current = {}, None
    for line in listing.splitlines():
        if match := re.match(r"\s*Function : (\S+)", line):
            current = counts.setdefault(match.group(1), dict.fromkeys(SASS_OPCODES, 0))
        elif current is not None and (match := re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)[.\s;]", line)):
            if match.group(1) in current:
                current[match.group(1)] += 1
    return counts


def cuda_resource_usage(archs: tuple[str, ...] = ("80", "90")) -> list[dict]:
    """Registers, stack, spills and shared memory of every kernel, from ptxas (``nvcc --resource-usage``), and its
    tensor-core instructions, from its SASS (``cuobjdump -sass``).

    Compiles the kernel files (they include no torch header: seconds, the GEMM's CuTe headers a few more) with the
    flags torch uses for the extension. Returns one dict per (kernel, arch): ``kernel`` (demangled), ``arch``,
    ``registers``, ``stack_bytes``, ``spill_store_bytes``, ``spill_load_bytes``, ``shared_bytes``, and ``sass``:
    the static count of each of ``SASS_OPCODES`` in the kernel.
    """
    home = cuda_build.configure_build_environment()
    import torch.utils.cpp_extension as cpp_extension

    flags = [*cpp_extension.COMMON_NVCC_FLAGS, *cuda_build.NVCC_FLAGS, "-std=c++17", "--resource-usage",
             "-I", str(cuda_build.cutlass_include_dir())]
    log, sass = [], {}
    for arch in archs:
        with tempfile.TemporaryDirectory() as scratch:
            for name in cuda_build.SOURCES:
                if name.endswith(".cu"):
                    result = subprocess.run(
                        [str(home / "bin" / "nvcc"), *flags, "-gencode", f"arch=compute_{arch},code=sm_{arch}",
                         "-c", str(cuda_build.SOURCE_DIR / name), "-o", f"{scratch}/{name}.o"],
                        capture_output=True, text=True, check=True,
                    )
                    log.append(result.stdout + result.stderr)
                    listing = subprocess.run([cuobjdump(), "-sass", f"{scratch}/{name}.o"], capture_output=True,
                                             text=True, check=True).stdout
                    sass.update({(kernel, arch): counts for kernel, counts in sass_opcode_counts(listing).items()})
    usage, current = [], None
    for line in "\n".join(log).splitlines():
        if match := re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line):
            current = {"kernel": match.group(1), "arch": match.group(2)}
        elif current and (match := re.search(SPILLS, line)):
            current.update(stack_bytes=int(match.group(1)), spill_store_bytes=int(match.group(2)),
                           spill_load_bytes=int(match.group(3)))
        elif current and (match := re.search(r"Used (\d+) registers", line)):
            shared = re.search(r"(\d+) bytes smem", line)
            current.update(registers=int(match.group(1)), shared_bytes=int(shared.group(1)) if shared else 0,
                           sass=sass[current["kernel"], current["arch"]])
            usage.append(current)
            current = None
    if shutil.which("c++filt"):
        names = subprocess.run(["c++filt"], input="\n".join(u["kernel"] for u in usage), capture_output=True,
                               text=True).stdout.splitlines()
        for entry, name in zip(usage, names):
            entry["kernel"] = re.sub(r"mora::\(anonymous namespace\)::", "", name)
    return usage
