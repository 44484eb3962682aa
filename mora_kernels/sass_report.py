"""Static report of the Triton kernels that the benchmark's launches compile, read from their own machine code
(``python -m mora_kernels kernels --report``): no GPU needed, docs/static_report.md explains how to read it.

What is compiled: the launches the launchers make for the benchmark shapes (``CASES``: Llama-2-7B q_proj 4096 x 4096
and up_proj 4096 -> 11008; 8192 tokens (prefill) and 64 (decode); type 6 r = 8 and type 1 r = 256; x and base
bfloat16; M bfloat16 and float32; forward and backward, single adapter and K = 8 mixed adapters), recorded by
``diagnostics.recording`` on meta tensors and specialized as Triton's runtime specializes a real launch
(``diagnostics.specialize``: integers equal to 1 become constants, multiples of 16 and 16-byte aligned pointers get
``tt.divisibility = 16``), compiled for sm_90 and sm_80 (into Triton's cache, as a launch's compile).

What is read from the SASS (``cuobjdump -sass`` of the Triton wheel), per kernel (``analyze_sass``):

- the main loop: the innermost backward branch (``BRA`` to a lower address) whose body holds tensor-core
  instructions, else the loop with the most global memory instructions; one iteration is one K-step of Triton's
  ``for`` loop (ptxas does not unroll these runtime-bounded loops: one HGMMA group per BLOCK_K in the listings);
- per region (before the loop, in it, after it) and per loop after it: tensor-core instructions (HGMMA = wgmma,
  HMMA = mma.sync) with their shape, global loads ``LDG`` and stores ``STG`` by width in bytes per thread
  (``.U16`` 2, none 4, ``.64`` 8, ``.128`` 16), async copies ``LDGSTS`` (cp.async) by width, TMA (``UTMALDG`` ...),
  waits (``WARPGROUP.DEPBAR.LE gsb0, N``: N = 0 waits for every wgmma in flight; ``DEPBAR.LE SB0, N`` waits until at
  most N cp.async groups are pending);
- exposed loads: an ``LDG`` of the main loop whose destination register is read later in the same iteration
  (before the backward branch) is issued and consumed in the same K-step: its latency is paid every step. Register
  reads are matched by name, ``Rn.64`` covering two registers and a tensor-core operand four (an approximation that
  errs towards "exposed").

Occupancy (``occupancy``), sm_90 limits (H100 and H200 share the SM): 65536 registers per SM allocated per warp in
units of 256, 228 KB shared memory per SM of which 1 KB is reserved per CTA, 64 warps and 32 CTAs per SM.

The time model (``model_launch``), for the sm_90 code on an H100 SXM and an H200 (``GPUS``), per launch, is the
largest of four bounds; every figure it uses is in ``GPUS`` and ``LATENCY_NS``:

1. HBM: the launch's unique bytes (each tensor argument read or written once, in full) / the HBM rate;
2. L2: the bytes its global instructions request (per instruction: width x 32 lanes x warps, all lanes active,
   times how often it runs: grid x loop trips) / the L2 rate;
3. tensor cores: the FLOPs its MMA instructions issue (HGMMA m x n x k per warpgroup, HMMA per warp, so redundant
   3xTF32 products count) / the peak for that input type; mma.sync on sm_90 at ``MMA_SYNC_FRACTION`` of wgmma's;
4. latency (Little's law): each CTA's chain of memory round trips, in waves of (CTAs per SM x SMs) CTAs: one
   latency for the prologue's loads; per main-loop iteration one latency when a load is exposed, else latency /
   prefetch depth (cp.async groups in flight: the ``DEPBAR.LE SB0, N`` count + 1), plus the CTA's own MMA time when
   every MMA is followed by a full wait (no overlap), and the SM's tensor cores shared by its CTAs; one latency per
   iteration of the epilogue's loop (which loads base and stores out) and one for the rest of the epilogue.

Loop trips come from the launch's own arguments by ``TRIP_COUNTS``, one rule per kernel (the report says so where a
kernel has none rather than guess). The model ignores instruction issue limits other than the tensor cores,
shared-memory bandwidth, L2 hit rates below 100 % for re-read data, and launch overhead (bytes_model adds 4 us per
launch); it is a yardstick for what the machine code allows, not a measurement.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from . import backends, diagnostics
from .core import Geometry, MoRAType, r_hat, rope_tables
from .files import write_files

# ---------------------------------------------------------------------------------------------------------------------
# The benchmark's launches
# ---------------------------------------------------------------------------------------------------------------------

SHAPES = {"q_proj": (4096, 4096), "up_proj": (4096, 11008)}  # Llama-2-7B (in_features, out_features)
TOKENS = {"prefill": 8192, "decode": 64}
TYPES = ((MoRAType.ROPE, 8), (MoRAType.SHARING, 256))  # (type, LoRA rank r)
M_DTYPES = (torch.bfloat16, torch.float32)
X_DTYPE = torch.bfloat16  # x and base
MIXED_K = 8
OPS = ("forward", "backward", "mixed forward", "mixed backward")


@dataclasses.dataclass(frozen=True)
class Case:
    shape: str
    tokens: str
    t: MoRAType
    r: int
    m_dtype: torch.dtype
    op: str

    @property
    def geometry(self) -> Geometry:
        n, m = SHAPES[self.shape]
        return Geometry(n, m, r_hat(n, m, self.r, self.t), self.t)

    @property
    def label(self) -> str:
        return (f"{self.shape} {self.tokens} type {int(self.t)} r={self.r} R={self.geometry.R} "
                f"M {str(self.m_dtype).removeprefix('torch.')} {self.op}")


def cases() -> list[Case]:
    return [Case(shape, tokens, t, r, m_dtype, op) for shape in SHAPES for tokens in TOKENS for t, r in TYPES
            for m_dtype in M_DTYPES for op in OPS]


def _saved_c(case: Case) -> tuple[int, torch.dtype]:
    """Columns and dtype of the ``C(x)`` the Triton forward saves for ``case`` (types 1-4)."""
    return backends.TRITON.compressed_layout(case.geometry.R, X_DTYPE, case.m_dtype)


def record(case: Case) -> list[diagnostics.Launch]:
    """The launches ``case`` makes, through the public launchers under ``diagnostics.recording`` (meta tensors)."""
    from . import triton_mixed, triton_mora

    geo, T = case.geometry, TOKENS[case.tokens]
    meta = dict(device="meta")
    cos = sin = None
    if geo.t == MoRAType.ROPE:
        cos, sin = rope_tables(geo.R, geo.used_blocks, device="meta")
    x = torch.empty(T, geo.n, dtype=X_DTYPE, **meta)
    base = torch.empty(T, geo.m, dtype=X_DTYPE, **meta)
    g = torch.empty(T, geo.m, dtype=X_DTYPE, **meta)
    columns, c_dtype = _saved_c(case)
    c = torch.empty(0 if geo.t.blockwise else T, columns, dtype=c_dtype, **meta)
    saved = x if geo.t.blockwise else c
    with diagnostics.recording() as launches:
        if case.op.startswith("mixed"):
            M = torch.empty(MIXED_K, geo.R, geo.R, dtype=case.m_dtype, **meta)
            index = torch.empty(T, dtype=torch.int64, **meta)
            scale = torch.empty(MIXED_K, dtype=torch.float32, **meta)
            if case.op == "mixed forward":
                triton_mixed.mixed_forward(x, M, (index, scale), (cos, sin), base, geo)
            else:
                triton_mixed.mixed_backward(g, saved, M, (index, scale), (cos, sin), geo, X_DTYPE, (True, True))
        else:
            M = torch.empty(geo.R, geo.R, dtype=case.m_dtype, **meta)
            if case.op == "forward":
                triton_mora.forward(x, M, (cos, sin), base, geo, 0.5)
            else:
                triton_mora.backward(g, saved, M, (cos, sin), geo, 0.5, X_DTYPE, (True, True))
    return launches


def roofline_bytes(case: Case) -> int:
    """The op's floor, as issue 17 defines it: forward reads x and base once and writes out once; backward reads g
    and what forward saved (x for types 6/7, C(x) for types 1-4, in the Triton forward's dtype) once and writes dx
    once; and M (K of them for the mixed ops) read once, dM written once: negligible in prefill, most of the floor
    in decode."""
    geo, T = case.geometry, TOKENS[case.tokens]
    elem = X_DTYPE.itemsize
    adapters = (MIXED_K if case.op.startswith("mixed") else 1) * geo.R * geo.R * case.m_dtype.itemsize
    if case.op.endswith("forward"):
        return T * (geo.n + 2 * geo.m) * elem + adapters
    columns, c_dtype = _saved_c(case)
    saved = T * geo.n * elem if geo.t.blockwise else T * columns * c_dtype.itemsize
    return T * geo.m * elem + saved + T * geo.n * elem + 2 * adapters


def roofline_flops(case: Case) -> int:
    """``2 T R^2`` per product with M (types 1-4), ``2 T Bu R^2`` (types 6/7); backward has two (dx and dM)."""
    geo, T = case.geometry, TOKENS[case.tokens]
    products = 2 * T * (geo.used_blocks if geo.t.blockwise else 1) * geo.R * geo.R
    return products if case.op.endswith("forward") else 2 * products


# ---------------------------------------------------------------------------------------------------------------------
# Loop trips of each kernel, from its launch's arguments
# ---------------------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mixed_dm_rows(a: dict) -> int:
    # Rows of one split of one adapter's segment, tokens spread evenly over the K adapters (the benchmark's batch).
    return _cdiv(_cdiv(a["n_rows"] // a["K"], a["splits"]), a["BLOCK_K"]) * a["BLOCK_K"]


# kernel -> args -> (main loop trips, trips of the epilogue's loop): the ``for`` loops of each kernel's source.
TRIP_COUNTS = {
    # type 6's gathered loop walks each half of R in its own BLOCK_K steps (triton_floor.gathered_product)
    "_project_kernel": lambda a: (2 * _cdiv(a["R"] // 2, a["BLOCK_K"]) if a["A_MODE"] == 2
                                  else _cdiv(a["R"], a["BLOCK_K"]), a["copies"]),
    "_mixed_project_kernel": lambda a: (_cdiv(a["R"], a["BLOCK_K"]), a["copies"]),
    # x's blocks (types 6/7): every block of the split's tokens
    "_dm_kernel": lambda a: ((1 if a["A_MODE"] == 0 else a["Bu"]) * _cdiv(a["per_split"], a["BLOCK_K"]), 0),
    "_mixed_dm_kernel": lambda a: (_mixed_dm_rows(a) // a["BLOCK_K"], 0),
    "compress_kernel": lambda a: (a["n"] // a["R"] + 1 if a["GROUPS"] else a["B"], 0),
    "decompress_adjoint_kernel": lambda a: (a["copies"], 0),
    "compress_adjoint_kernel": lambda a: (0 if a["MODE"] == 0 else a["folds"], 0),
}

# ---------------------------------------------------------------------------------------------------------------------
# SASS
# ---------------------------------------------------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_REG = re.compile(r"\bR(\d+)(\.64)?\b")
_WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
_TMA = ("UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP", "UTMAREDG")
_SOURCES_ONLY = ("STG", "STS", "ST", "STL", "RED", "LDGSTS", "BRA", "EXIT", "UTMASTG", "UTMALDG")


@dataclasses.dataclass
class Instruction:
    address: int
    opcode: str  # with its modifiers: LDG.E.U16
    operands: str

    @property
    def name(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def width(self) -> int:
        """Bytes per thread of a global load, store or async copy."""
        return next((_WIDTHS[m] for m in self.opcode.split(".")[1:] if m in _WIDTHS), 4)

    def registers(self) -> list[tuple[int, int]]:
        """(first, count) of every register operand; a tensor-core operand is taken as four registers."""
        span = 4 if self.name in ("HGMMA", "HMMA") else 1
        return [(int(n), 2 if wide else span) for n, wide in _REG.findall(self.operands)]

    def written(self) -> tuple[int, int] | None:
        """(first, count) of the register this instruction writes, if any."""
        if self.name in _SOURCES_ONLY:
            return None
        regs = _REG.findall(self.operands.split(",")[0])
        if not regs:
            return None
        count = max(1, self.width // 4) if self.name == "LDG" else 2 if ".WIDE" in self.opcode else 1
        return int(regs[0][0]), count

    def read(self) -> list[tuple[int, int]]:
        regs = self.registers()
        return regs if self.written() is None else regs[1:]


def parse_sass(text: str) -> list[Instruction]:
    """Instructions of a ``cuobjdump -sass`` listing (one kernel), in address order."""
    return [Instruction(int(m[1], 16), m[3], m[4].strip()) for m in _LINE.finditer(text)]


def _branch_target(inst: Instruction) -> int | None:
    found = re.search(r"0x([0-9a-f]+)\s*$", inst.operands)
    return int(found[1], 16) if inst.name == "BRA" and found else None


def loops(instructions: list[Instruction]) -> list[tuple[int, int]]:
    """(start, end) addresses of every backward branch's body (a branch to itself, the trap at the end, is none)."""
    found = []
    for inst in instructions:
        target = _branch_target(inst)
        if target is not None and target < inst.address:
            found.append((target, inst.address))
    return found


def _is_memory(inst: Instruction) -> bool:
    return inst.name in ("LDG", "STG", "LDGSTS") or inst.name in _TMA


def _count(instructions: list[Instruction], warps: int) -> dict:
    """What a region holds: tensor-core instructions (per opcode) and FLOPs per CTA, global loads / stores / async
    copies by width, TMA instructions, waits and barriers, and the bytes its memory instructions move per CTA."""
    def by_width(name):
        counts = {}
        for inst in instructions:
            if inst.name == name:
                counts[str(inst.width)] = counts.get(str(inst.width), 0) + 1
        return dict(sorted(counts.items(), key=lambda item: int(item[0])))

    mma, flops = {}, {}
    for inst in instructions:
        if inst.name in ("HGMMA", "HMMA"):
            mma[inst.opcode] = mma.get(inst.opcode, 0) + 1
            kind = "tf32" if ".TF32" in inst.opcode else "16bit"
            flops[kind] = flops.get(kind, 0) + mma_flops(inst.opcode, warps)
    waits = {}
    for inst in instructions:
        if inst.opcode.startswith("WARPGROUP.DEPBAR") or inst.opcode.startswith("DEPBAR"):
            key = f"{inst.opcode} {inst.operands}"
            waits[key] = waits.get(key, 0) + 1
    threads = 32 * warps
    moved = sum(inst.width * threads for inst in instructions if inst.name in ("LDG", "STG", "LDGSTS"))
    return dict(
        tensor_core=mma, mma_flops_per_cta=flops,
        global_loads=by_width("LDG"), global_stores=by_width("STG"), async_copies=by_width("LDGSTS"),
        tma=sum(inst.name in _TMA for inst in instructions), waits=waits,
        barriers=sum(inst.opcode.startswith("BAR.SYNC") for inst in instructions),
        bytes_per_cta=moved,
        load_bytes_per_cta=sum(inst.width * threads for inst in instructions if inst.name in ("LDG", "LDGSTS")),
        sync_load_bytes_per_cta=sum(inst.width * threads for inst in instructions if inst.name == "LDG"),
        async_load_bytes_per_cta=sum(inst.width * threads for inst in instructions if inst.name == "LDGSTS"),
    )


def mma_flops(opcode: str, warps: int) -> int:
    """FLOPs one tensor-core instruction does for a CTA of ``warps`` warps: ``HGMMA.MxNxK`` is one m x n x k product
    per warpgroup (4 warps), ``HMMA.<m><n><k>`` (16816: m16 n8 k16) one per warp."""
    shape = opcode.split(".")[1]
    if opcode.startswith("HGMMA"):
        m, n, k = map(int, shape.split("x"))
        return 2 * m * n * k * max(1, warps // 4)
    m, n, k = int(shape[:2]), int(shape[2]), int(shape[3:])
    return 2 * m * n * k * warps


def exposed_loads(body: list[Instruction]) -> int:
    """``LDG`` of a loop body whose destination is read later in the same iteration (see the module docstring)."""
    exposed = 0
    for i, inst in enumerate(body):
        if inst.name != "LDG":
            continue
        first, count = inst.written()
        mine = set(range(first, first + count))
        for later in body[i + 1:]:
            if any(mine & set(range(r, r + n)) for r, n in later.read()):
                exposed += 1
                break
            out = later.written()
            if out and mine & set(range(out[0], out[0] + out[1])):
                break
    return exposed


def analyze_sass(text: str, warps: int) -> dict:
    """The report's reading of one kernel's SASS (module docstring): regions, main loop, epilogue loop."""
    instructions = parse_sass(text)
    if not instructions:
        raise ValueError("no SASS instructions found in the listing")
    found = loops(instructions)

    def inside(start, end):
        return [inst for inst in instructions if start <= inst.address <= end]

    with_mma = [lp for lp in found if any(i.name in ("HGMMA", "HMMA") for i in inside(*lp))]
    main = min(with_mma, key=lambda lp: lp[1] - lp[0]) if with_mma else max(
        (lp for lp in found if any(map(_is_memory, inside(*lp)))),
        key=lambda lp: sum(map(_is_memory, inside(*lp))), default=None)
    end = instructions[-1].address
    if main is None:  # straight-line code run once: all of it is reported as the epilogue
        everything = _count(instructions, warps)
        return dict(main_loop=None, loops=len(found), prologue=_count([], warps), main=None, epilogue=everything,
                    epilogue_loop=None, epilogue_rest=everything, prefetch_depth=1)
    body = inside(*main)
    epilogue = inside(main[1] + 1, end)
    later = [lp for lp in found if lp[0] > main[1] and any(map(_is_memory, inside(*lp)))]
    epi_loop = max(later, key=lambda lp: sum(map(_is_memory, inside(*lp))), default=None)
    rest = [i for i in epilogue if epi_loop is None or not epi_loop[0] <= i.address <= epi_loop[1]]
    main_counts = _count(body, warps)
    main_counts["exposed_loads"] = exposed_loads(body)
    pending = [int(m[1], 16) for i in body if i.opcode.startswith("DEPBAR")
               for m in [re.search(r"SB0,\s*0x([0-9a-f]+)", i.operands)] if m]
    groups = max(1, sum(i.name == "LDGDEPBAR" for i in body))  # cp.async groups committed per iteration
    return dict(
        main_loop=[hex(main[0]), hex(main[1])], loops=len(found),
        prologue=_count(inside(0, main[0] - 1), warps), main=main_counts, epilogue=_count(epilogue, warps),
        epilogue_loop=_count(inside(*epi_loop), warps) if epi_loop else None, epilogue_rest=_count(rest, warps),
        # iterations of cp.async in flight: the wait lets N groups (of ``groups`` per iteration) stay pending, so the
        # data consumed was issued N / groups + 1 iterations ahead; Triton prefetches at most num_stages - 1
        prefetch_depth=min(pending) // groups + 1 if pending else 1,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Occupancy and the time model
# ---------------------------------------------------------------------------------------------------------------------

SM90 = dict(registers=65536, register_unit=256, shared_bytes=228 * 1024, reserved_shared_per_cta=1024,
            shared_unit=128, warps=64, ctas=32)


def occupancy(registers: int, shared_bytes: int, warps: int, sm: dict = SM90) -> dict:
    """CTAs and warps per SM from the three limits (registers per warp rounded up to the allocation unit, shared
    memory with the per-CTA reservation, warps and CTAs), and which one binds."""
    per_warp = _cdiv(max(registers, 1) * 32, sm["register_unit"]) * sm["register_unit"]
    smem = _cdiv(shared_bytes, sm["shared_unit"]) * sm["shared_unit"] + sm["reserved_shared_per_cta"]
    limits = {"registers": sm["registers"] // per_warp // warps, "shared memory": sm["shared_bytes"] // smem,
              "warps": sm["warps"] // warps, "CTAs": sm["ctas"]}
    ctas = min(limits.values())
    return dict(ctas_per_sm=ctas, warps_per_sm=ctas * warps, limited_by=min(limits, key=limits.get))


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    hbm_bytes_per_s: float
    l2_bytes_per_s: float
    tensor_flops: dict  # "16bit" / "tf32" -> dense FLOP/s of wgmma
    source: str


# H200: the project's GPU machine, its own measurements (copy rate, bf16 matmul); TF32 at half the bf16 rate as on
# NVIDIA's spec sheets (494.7 / 989.4). H100 SXM: NVIDIA's public spec sheet. Both: 132 SMs; L2 ~7 TB/s is an
# estimate (Chips and Cheese measured ~5.5 TB/s on an H100 PCIe, 114 SMs at 1.755 GHz; scaled to 132 SMs at 1.98).
GPUS = {
    "H100": GPU("H100 SXM", 132, 3.35e12, 7e12, {"16bit": 989.4e12, "tf32": 494.7e12},
                "NVIDIA spec: 3.35 TB/s HBM3, 989.4 TFLOP/s bf16 dense, 494.7 TF32 dense"),
    "H200": GPU("H200", 132, 4.3e12, 7e12, {"16bit": 790e12, "tf32": 395e12},
                "measured on the project's H200: 4.3 TB/s device copy, 790 TFLOP/s bf16 (8192^3 matmul)"),
}
LATENCY_NS = (600, 800)  # global memory round trip under load: the report gives the model at both ends
MMA_SYNC_FRACTION = 0.5  # mma.sync (HMMA) on sm_90 against wgmma's rate: an assumption, stated in docs


def _tensor_seconds(flops: dict, gpu: GPU, opcodes: dict) -> float:
    fraction = MMA_SYNC_FRACTION if any(op.startswith("HMMA") for op in opcodes) else 1.0
    return sum(f / (gpu.tensor_flops[kind] * fraction) for kind, f in flops.items())


def unique_bytes(launch: diagnostics.Launch) -> int:
    """Every distinct tensor argument read or written once in full (a tensor passed twice, e.g. as an unused
    cos/sin, counts once)."""
    seen = {}
    for value in launch.args.values():
        if isinstance(value, torch.Tensor):
            seen[id(value)] = value.numel() * value.element_size()
    return sum(seen.values())


def bytes_in_flight(kernel: dict) -> int | None:
    """Bytes a full SM keeps in flight in the main loop (Little's law's numerator): per CTA the loop's synchronous
    loads once and its cp.async loads once per iteration of prefetch, times the CTAs per SM."""
    sass, main = kernel["sass"], kernel["sass"]["main"]
    if main is None:
        return None
    depth = min(sass["prefetch_depth"], max(1, kernel["num_stages"] - 1))
    return kernel["occupancy"]["ctas_per_sm"] * (main["sync_load_bytes_per_cta"] + depth * main[
        "async_load_bytes_per_cta"])


def model_launch(launch: diagnostics.Launch, kernel: dict, gpu: GPU, latency_ns: float) -> dict:
    """Modelled seconds of one launch of the analysed ``kernel`` on ``gpu`` (module docstring), with each bound."""
    rule = TRIP_COUNTS.get(launch.kernel.__name__)
    if rule is None:
        return dict(seconds=None, why=f"no loop-trip rule for {launch.kernel.__name__} (TRIP_COUNTS)")
    main_trips, epi_trips = rule(launch.args)
    sass, occ = kernel["sass"], kernel["occupancy"]
    ctas = math.prod(launch.grid)
    waves = _cdiv(ctas, occ["ctas_per_sm"] * gpu.sms)
    latency = latency_ns * 1e-9
    pro, main, rest, epi_loop = sass["prologue"], sass["main"], sass["epilogue_rest"], sass["epilogue_loop"]
    if main is None:  # no loop: the epilogue is the whole kernel, run once
        main, main_trips = _count([], launch.num_warps), 0
    # every region with how often a CTA runs it (MMA outside the loop: iterations Triton's pipeliner peeled)
    regions = [(pro, 1), (main, main_trips), (rest, 1)] + ([(epi_loop, epi_trips)] if epi_loop else [])
    per_cta_bytes = sum(region["bytes_per_cta"] * runs for region, runs in regions)
    flops = {}
    for region, runs in regions:
        for kind, f in region["mma_flops_per_cta"].items():
            flops[kind] = flops.get(kind, 0) + ctas * runs * f
    opcodes = {op for region, _ in regions for op in region["tensor_core"]}
    # within a CTA a step's memory wait and its MMA do not overlap when the MMA consumes that step's own loads, or
    # when every wgmma is waited for in full (WARPGROUP.DEPBAR.LE gsb0, 0x0) before the step ends
    serial = bool(main["tensor_core"]) and (bool(main.get("exposed_loads")) or any(
        w.startswith("WARPGROUP.DEPBAR") and w.endswith(" 0x0") for w in main["waits"]))
    mem_iter = 0.0
    if main.get("exposed_loads"):
        mem_iter = latency
    elif main["load_bytes_per_cta"]:
        mem_iter = latency / min(sass["prefetch_depth"], max(1, launch.num_stages - 1))
    # one CTA's MMA time per iteration alone on its SM's tensor cores (the SM's CTAs share them: loop_wave)
    mma_own = _tensor_seconds(main["mma_flops_per_cta"], gpu, main["tensor_core"]) * gpu.sms
    chain = mem_iter + mma_own if serial else max(mem_iter, mma_own)
    loop_wave = main_trips * max(chain, occ["ctas_per_sm"] * mma_own)
    epilogue_wave = (epi_trips * latency if epi_loop and epi_loop["load_bytes_per_cta"] else 0.0) + (
        latency if rest["bytes_per_cta"] else 0.0)
    prologue_wave = latency if pro["load_bytes_per_cta"] else 0.0
    bounds = {
        "hbm": unique_bytes(launch) / gpu.hbm_bytes_per_s,
        "l2": ctas * per_cta_bytes / gpu.l2_bytes_per_s,
        "tensor": _tensor_seconds(flops, gpu, opcodes),
        "latency": waves * (prologue_wave + loop_wave + epilogue_wave),
    }
    bound = max(bounds, key=bounds.get)
    in_flight = bytes_in_flight(kernel)
    return dict(seconds=bounds[bound], bound=bound, bounds=bounds, waves=waves, ctas=ctas, main_trips=main_trips,
                epilogue_trips=epi_trips, unique_bytes=unique_bytes(launch), requested_bytes=ctas * per_cta_bytes,
                flops=sum(flops.values()), bytes_in_flight_per_sm=in_flight)


# ---------------------------------------------------------------------------------------------------------------------
# Compiling, and the report
# ---------------------------------------------------------------------------------------------------------------------

ARCHS = (90, 80)


def _key(launch: diagnostics.Launch, specialization) -> str:
    signature, constexprs, attrs = specialization
    return json.dumps([launch.kernel.__name__, signature, {k: str(v) for k, v in constexprs.items()},
                       sorted(str(k[0]) for k in attrs), launch.num_warps, launch.num_stages])


def _describe(launch: diagnostics.Launch, specialization) -> dict:
    signature, constexprs, attrs = specialization
    params = diagnostics.parameters(launch.kernel)
    return dict(
        constants_1=[name for name, is_constexpr, _ in params if signature[name] == "constexpr" and not is_constexpr],
        divisible_by_16=[params[k[0]][0] for k in sorted(attrs)],
        constexprs={name: str(constexprs[name]) for name, is_constexpr, _ in params if is_constexpr},
    )


def compile_kernel(launch: diagnostics.Launch, specialization, arch: int, folder: str) -> dict:
    """Compile one specialized launch for ``sm_<arch>`` and read it: resources, occupancy, ``analyze_sass``."""
    from triton.knobs import nvidia

    signature, constexprs, attrs = specialization
    cubin = os.path.join(folder, "kernel.cubin")
    usage = diagnostics.compile_launch(launch.kernel, signature, constexprs, launch.num_warps, launch.num_stages,
                                       arch, cubin, attrs)
    text = subprocess.run([nvidia.cuobjdump.path, "-sass", cubin], capture_output=True, text=True,
                          check=True).stdout
    return dict(kernel=launch.kernel.__name__, arch=f"sm_{arch}", num_warps=launch.num_warps,
                num_stages=launch.num_stages, **_describe(launch, specialization), **usage,
                occupancy=occupancy(usage["registers"], usage["shared_bytes"], launch.num_warps),
                sass=analyze_sass(text, launch.num_warps))


def _specialized(case: Case):
    """(launch, specialization, key) of each launch ``case`` makes, as ``build`` and ``resource_usage`` compile it."""
    for launch in record(case):
        specialization = diagnostics.specialize(launch)
        yield launch, specialization, _key(launch, specialization)


def resource_usage(archs=ARCHS) -> list[dict]:
    """Registers, spills and shared memory of each distinct launch of ``cases()``, compiled with its specialization
    for each of ``archs``: what ``build`` compiles, without reading the SASS (its tools differ between Triton
    versions), so that the tests check the benchmark's real launches for spills on every supported Triton."""
    rows, seen = [], set()
    with tempfile.TemporaryDirectory() as folder:
        for case in cases():
            for launch, specialization, key in _specialized(case):
                if key in seen:
                    continue
                seen.add(key)
                signature, constexprs, attrs = specialization
                for arch in archs:
                    usage = diagnostics.compile_launch(launch.kernel, signature, constexprs, launch.num_warps,
                                                       launch.num_stages, arch, os.path.join(folder, "kernel.cubin"),
                                                       attrs)
                    rows.append(dict(case=case.label, kernel=launch.kernel.__name__, arch=f"sm_{arch}", **usage))
    return rows


def build(selected: list[Case] | None = None, archs=ARCHS, progress=print, bytes_model=None) -> dict:
    """Record, specialize, compile and model every case (default ``cases()``): the report as a dict.
    ``bytes_model``: the benchmark's ``bytes_model`` module, to set its figures beside this model's."""
    import triton

    from .triton_floor import interpreting

    if interpreting():
        raise RuntimeError("the report needs the Triton compiler: run it in a process without TRITON_INTERPRET=1")
    kernels, rows = {}, []
    with tempfile.TemporaryDirectory() as folder:
        for case in selected or cases():
            launches = []
            for launch, specialization, key in _specialized(case):
                for arch in archs:
                    if (key, arch) not in kernels:
                        progress(f"compile sm_{arch} {launch.kernel.__name__} ({len(kernels) + 1})")
                        kernels[key, arch] = dict(id=len(kernels), **compile_kernel(launch, specialization, arch,
                                                                                    folder))
                sm90 = kernels.get((key, 90))
                launches.append(dict(
                    kernel=launch.kernel.__name__, grid=list(launch.grid), num_warps=launch.num_warps,
                    kernel_ids={f"sm_{a}": kernels[key, a]["id"] for a in archs},
                    model={name: {f"{lat}ns": model_launch(launch, sm90, gpu, lat) for lat in LATENCY_NS}
                           for name, gpu in GPUS.items()} if sm90 else None))
            rows.append(_case_row(case, launches, bytes_model_row(case, bytes_model) if bytes_model else None))
    return dict(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        triton=triton.__version__, torch=torch.__version__, archs=[f"sm_{a}" for a in archs],
        gpus={name: dataclasses.asdict(gpu) for name, gpu in GPUS.items()}, latency_ns=list(LATENCY_NS),
        mma_sync_fraction=MMA_SYNC_FRACTION, sm_limits=SM90,
        littles_law_bytes_per_sm={name: [gpu.hbm_bytes_per_s / gpu.sms * lat * 1e-9 for lat in LATENCY_NS]
                                  for name, gpu in GPUS.items()},
        kernels=sorted(kernels.values(), key=lambda k: k["id"]), cases=rows)


def _case_row(case: Case, launches: list[dict], other: dict | None) -> dict:
    geo = case.geometry
    row = dict(label=case.label, shape=case.shape, tokens=TOKENS[case.tokens], type=int(case.t), r=case.r, R=geo.R,
               m_dtype=str(case.m_dtype).removeprefix("torch."), op=case.op, launches=launches,
               roofline_bytes=roofline_bytes(case), roofline_flops=roofline_flops(case))
    kind = "16bit" if case.m_dtype != torch.float32 else "tf32"
    row["model"] = {}
    for name, gpu in GPUS.items():
        # the floor: bytes at the HBM rate, or the products at the tensor-core peak (float32 M: 3xTF32, 3 products)
        flops_s = row["roofline_flops"] * (3 if kind == "tf32" else 1) / gpu.tensor_flops[kind]
        floor = max(row["roofline_bytes"] / gpu.hbm_bytes_per_s, flops_s)
        times = {}
        for lat in LATENCY_NS:
            parts = [launch["model"][name][f"{lat}ns"]["seconds"] if launch["model"] else None for launch in launches]
            times[f"{lat}ns"] = None if None in parts else sum(parts)
        row["model"][name] = dict(roofline_s=floor, seconds=times, x_roofline={
            k: (v / floor if v is not None else None) for k, v in times.items()})
    row["bytes_model"] = other
    if other is not None:
        row["bytes_model"]["why_different"] = _why_different(row, other)
    return row


_BOUND_REASON = {
    "latency": "loads issued and consumed in the same K-step (or too few bytes in flight) leave the kernel "
               "latency-bound (Little's law), which a roofline model cannot see",
    "l2": "its instructions request more bytes than the tensors hold (tiles re-read per row tile, rotation tables "
          "per row), and that traffic through L2 binds",
    "tensor": "the tensor-core instructions the machine code issues (redundant 3xTF32 products, mma.sync's lower "
              "rate) bind, not the ideal FLOP count",
    "hbm": "the launch is at its HBM bound",
}


def _why_different(row: dict, other: dict) -> str:
    """One sentence per difference between this model's H200 figures and bytes_model's for one op."""
    ours_bytes = sum(launch["model"]["H200"][f"{LATENCY_NS[0]}ns"]["unique_bytes"] for launch in row["launches"])
    why = []
    if ours_bytes > 1.05 * other["bytes"]:
        why.append(f"bytes: {ours_bytes / 1e6:.0f} MB over {len(row['launches'])} launches against "
                   f"{other['bytes'] / 1e6:.0f} MB for its {other['launches_counted']} fused op(s): the intermediates "
                   "between kernels (C(x), h, w, dM partials) go through memory")
    slowest = max(row["launches"], key=lambda launch: launch["model"]["H200"][f"{LATENCY_NS[0]}ns"]["seconds"])
    bound = slowest["model"]["H200"][f"{LATENCY_NS[0]}ns"]["bound"]
    ours_s = row["model"]["H200"]["seconds"][f"{LATENCY_NS[0]}ns"]
    if ours_s > 1.2 * other["model_s"]["H200"]:
        why.append(f"time: the slowest launch ({slowest['kernel']}) is {bound}-bound: {_BOUND_REASON[bound]}")
    elif ours_s < 0.8 * other["model_s"]["H200"]:
        why.append("time: bytes_model adds 4 us per launch and costs float32 products at 133 TFLOP/s (3xTF32 at a "
                   "derated TF32 rate); this model counts the instructions at the full TF32 rate and no launch cost")
    return "; ".join(why) or "agree within 20 %"


def _us(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.0f}"


def _widths(counts: dict) -> str:
    return " ".join(f"{count}x{width}B" for width, count in counts.items()) or "-"


def render_markdown(report: dict) -> str:
    """report.md: the cases against the roofline, then every compiled kernel's machine-code facts."""
    lo, hi = (f"{lat}ns" for lat in LATENCY_NS)
    lines = [
        "# Static report: the benchmark's Triton kernels, read from their machine code",
        "",
        f"Triton {report['triton']}, torch {report['torch']}, {report['created']}; compiled for "
        f"{', '.join(report['archs'])} with each launch's own specialization, no GPU. How it is made and what every "
        "column means: docs/static_report.md (the model's assumptions are in mora_kernels/sass_report.py).",
        "",
        f"Model: the largest of HBM, L2, tensor-core and latency bounds per launch, at a memory latency of "
        f"{LATENCY_NS[0]} and {LATENCY_NS[1]} ns; roofline: x, base, out (backward: g, saved, dx) once at the HBM "
        "rate, or the products at the tensor-core peak (float32 M: 3xTF32, three TF32 products). "
        + "; ".join(f"{name}: {gpu['source']}" for name, gpu in report["gpus"].items()) + ". Little's law wants "
        + ", ".join(f"{name} {v[0] / 1024:.0f}-{v[1] / 1024:.0f} KB" for name, v in
                    report["littles_law_bytes_per_sm"].items()) + " in flight per SM.",
        "",
    ]
    for gpu in report["gpus"]:
        lines += [f"## Cases on the {gpu} (us)", "",
                  "| case | launches | model | roofline | x roofline | slowest launch: bound (its HBM / L2 / tensor / "
                  f"latency bounds at {LATENCY_NS[0]} ns) | bytes_model | why the models differ |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in report["cases"]:
            model = row["model"][gpu]
            slowest = max(row["launches"], key=lambda launch: launch["model"][gpu][lo]["seconds"] or 0)
            bound = slowest["model"][gpu][lo]
            other = row["bytes_model"]
            ratio = model["x_roofline"]
            lines.append(
                f"| {row['label']} | {len(row['launches'])} | {_us(model['seconds'][lo])}-{_us(model['seconds'][hi])}"
                f" | {_us(model['roofline_s'])} | {ratio[lo]:.1f}-{ratio[hi]:.1f} | {slowest['kernel']}: "
                f"{bound.get('bound', bound.get('why'))} ({' / '.join(map(_us, bound.get('bounds', {}).values()))})"
                f" | {_us(other['model_s'][gpu]) if other else '-'} | "
                f"{other['why_different'] if other and gpu == 'H200' else ''} |")
        lines.append("")
    lines += ["## Kernels", "",
              "Per main-loop iteration (one K-step): tensor-core instructions, global loads (LDG) and async copies "
              "(cp.async) as count x bytes per thread, loads consumed in the same step, waits. Epilogue: after the "
              "loop. In flight: bytes per SM in the main loop at the occupancy shown (CTAs per SM, what limits it).",
              "", "| id | kernel | arch | warps/stages | regs | spill | smem KB | CTAs/SM (limit) | MMA / K-step | "
              "loop LDG | loop cp.async | exposed | waits in loop | epilogue LDG | epilogue STG | in flight KB/SM | "
              "specialization |", "|" + "---|" * 17]
    for k in report["kernels"]:
        sass, main = k["sass"], k["sass"]["main"] or {}
        epi = sass["epilogue"]
        flight = bytes_in_flight(k)
        spec = f"=1: {','.join(k['constants_1']) or '-'}; %16: {len(k['divisible_by_16'])} args; " + " ".join(
            f"{n}={v}" for n, v in k["constexprs"].items() if n not in ("UPCAST",))
        mma = " ".join(f"{c}x{op}" for op, c in main.get("tensor_core", {}).items()) or "-"
        waits = " ".join(f"{c}x[{w}]" for w, c in main.get("waits", {}).items()) or "-"
        flight = "-" if flight is None else f"{flight / 1024:.1f}"
        lines.append(
            f"| {k['id']} | {k['kernel']} | {k['arch']} | {k['num_warps']}/{k['num_stages']} | {k['registers']} | "
            f"{k['spill_bytes']} | {k['shared_bytes'] / 1024:.1f} | {k['occupancy']['ctas_per_sm']} "
            f"({k['occupancy']['limited_by']}) | {mma} | {_widths(main.get('global_loads', {}))} | "
            f"{_widths(main.get('async_copies', {}))} | {main.get('exposed_loads', '-')} | {waits} | "
            f"{_widths(epi['global_loads'])} | {_widths(epi['global_stores'])} | {flight} | {spec} |")
    return "\n".join(lines) + "\n"


def write(report: dict, folder: Path) -> None:
    """``report.json`` and ``report.md`` into ``folder`` (created; refuses to overwrite an existing report), both
    written whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "report.md"):
        if (folder / name).exists():
            raise FileExistsError(f"{folder / name} exists: choose another --output-dir or remove it")
    write_files({folder / "report.json": (json.dumps(report, indent=1) + "\n").encode(),
                 folder / "report.md": render_markdown(report).encode()})


def bytes_model_row(case: Case, bytes_model) -> dict | None:
    """benchmarks/bytes_model.py's figures for the same op (its fused Triton ops, one op = one launch that reads
    each input and writes each output once, at the roofline, plus its per-launch cost), on its H200 and H100; None
    for the mixed ops, which it does not model."""
    if case.op.startswith("mixed"):
        return None
    from torch import nn

    from .layer import MoRALinear

    geo, T = case.geometry, TOKENS[case.tokens]
    base = nn.Linear(geo.n, geo.m, bias=False, device="meta", dtype=X_DTYPE).requires_grad_(False)
    layer = MoRALinear(base, case.r, int(case.t), backend="triton")
    layer.M.data = layer.M.data.to(case.m_dtype)
    x = torch.empty(T, geo.n, device="meta", dtype=X_DTYPE, requires_grad=True)
    g = torch.empty(T, geo.m, device="meta", dtype=X_DTYPE)
    model, how = bytes_model.fused_backend_model(layer, x, g)
    counted = bytes_model.count(model, x, g, case.op)
    ours = bytes_model.Count([o for o in counted.ops if o.op.startswith("mora_kernels.")])
    return dict(counted_as=how, bytes=ours.bytes, flops=ours.flops, launches_counted=ours.launches,
                model_s={name: ours.seconds(hw) for name, hw in (("H100", bytes_model.h100()),
                                                                  ("H200", bytes_model.h200()))})
