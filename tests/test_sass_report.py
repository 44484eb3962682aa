"""The static report (mora_kernels.sass_report): its SASS reading on fixed listings, the occupancy arithmetic, the time
model on hand-computed cases, the launch specialization against Triton's own, and one real compile."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mora_kernels import diagnostics, sass_report
from mora_kernels.core import MoRAType

# A main loop at 0x30..0xc0 (the backward BRA), a prologue before it, an epilogue after it and the trap at the end.
LISTING = """
        Function : _project_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                              /* 0x00000a00ff017b82 */
        /*0010*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR4][R2.64] ;  /* 0x0000000002057fae */
        /*0020*/                   LDGDEPBAR ;                                         /* 0x00000000000079af */
        /*0030*/                   DEPBAR.LE SB0, 0x1 ;                                /* 0x000080400000791a */
        /*0040*/               @P0 LDG.E.U16 R8, desc[UR4][R6.64] ;                    /* 0x0000000406080981 */
        /*0050*/                   LDG.E.128 R12, desc[UR4][R10.64] ;                  /* 0x000000040a0c7981 */
        /*0060*/                   PRMT R9, R8, 0x5410, R8 ;                           /* 0x0000541008097816 */
        /*0070*/                   WARPGROUP.ARRIVE ;                                  /* 0x00000000000079c5 */
        /*0080*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ; /* 0x00e0000818187df0 */
        /*0090*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                     /* 0x00008000000079c5 */
        /*00a0*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5+0x800], desc[UR4][R2.64+0x20] ; /* 0x0 */
        /*00b0*/                   LDGDEPBAR ;                                         /* 0x00000000000079af */
        /*00c0*/              @!P1 BRA 0x30 ;                                          /* 0xffffff6000009947 */
        /*00d0*/                   LDG.E.64 R16, desc[UR4][R14.64] ;                   /* 0x000000040e107981 */
        /*00e0*/                   STG.E.U16 desc[UR4][R14.64], R16 ;                  /* 0x000000100e007986 */
        /*00f0*/                   STG.E.128 desc[UR4][R18.64], R20 ;                  /* 0x0000001412007986 */
        /*0100*/                   EXIT ;                                              /* 0x000000000000794d */
        /*0110*/                   BRA 0x110;                                          /* 0xfffffffc00fc7947 */
"""
WARPS = 8


def test_parser_finds_the_loop_and_counts_by_width():
    instructions = sass_report.parse_sass(LISTING)
    assert [i.opcode for i in instructions[:2]] == ["LDC", "LDGSTS.E.BYPASS.LTC128B.128"]
    assert sass_report.loops(instructions) == [(0x30, 0xC0)]  # the trap BRA to itself is no loop
    sass = sass_report.analyze_sass(LISTING, WARPS)
    assert sass["main_loop"] == ["0x30", "0xc0"]
    main = sass["main"]
    assert main["tensor_core"] == {"HGMMA.64x64x16.F32.BF16": 1}
    assert main["mma_flops_per_cta"] == {"16bit": 2 * 64 * 64 * 16 * 2}  # two warpgroups
    assert main["global_loads"] == {"2": 1, "16": 1}
    assert main["async_copies"] == {"16": 1}
    assert main["global_stores"] == {}
    assert main["waits"] == {"DEPBAR.LE SB0, 0x1": 1, "WARPGROUP.DEPBAR.LE gsb0, 0x0": 1}
    threads = 32 * WARPS
    assert main["sync_load_bytes_per_cta"] == (2 + 16) * threads
    assert main["async_load_bytes_per_cta"] == 16 * threads
    # The U16 load is read by the PRMT in the same iteration; the 128-bit one is not read before the branch.
    assert main["exposed_loads"] == 1
    assert sass["prefetch_depth"] == 2  # one group per iteration, one left pending
    assert sass["prologue"]["async_copies"] == {"16": 1}
    assert sass["epilogue"]["global_loads"] == {"8": 1}
    assert sass["epilogue"]["global_stores"] == {"2": 1, "16": 1}
    assert sass["epilogue_loop"] is None


def test_a_load_overwritten_before_use_is_not_exposed():
    listing = LISTING.replace("PRMT R9, R8, 0x5410, R8", "MOV R8, RZ ").replace(
        "LDGSTS.E.BYPASS.LTC128B.128 [R5+0x800]", "FADD R9, R8, R8 ; LDGSTS.E.BYPASS.LTC128B.128 [R5+0x800]")
    assert sass_report.analyze_sass(listing, WARPS)["main"]["exposed_loads"] == 0


def test_mma_flops_per_instruction():
    assert sass_report.mma_flops("HMMA.16816.F32.BF16", 4) == 2 * 16 * 8 * 16 * 4  # one per warp
    assert sass_report.mma_flops("HMMA.1688.F32.TF32", 8) == 2 * 16 * 8 * 8 * 8
    assert sass_report.mma_flops("HGMMA.64x32x8.F32.TF32", 4) == 2 * 64 * 32 * 8  # one warpgroup


def test_a_listing_without_a_loop_is_one_pass():
    listing = "\n".join(line for line in LISTING.splitlines() if "BRA" not in line)
    sass = sass_report.analyze_sass(listing, WARPS)
    assert sass["main"] is None and sass["epilogue"]["global_loads"] == {"2": 1, "8": 1, "16": 1}
    assert sass["epilogue"]["tensor_core"] == {"HGMMA.64x64x16.F32.BF16": 1} and not sass["prologue"]["global_loads"]
    with pytest.raises(ValueError, match="no SASS"):
        sass_report.analyze_sass("no code here", WARPS)


@pytest.mark.parametrize("registers, shared, warps, ctas, limit", [
    (164, 20480, 8, 1, "registers"),  # 164 regs -> 5376 per warp -> 12 warps -> one CTA of 8
    (64, 0, 4, 8, "registers"),  # 2048 per warp -> 32 warps -> 8 CTAs of 4
    (32, 100 * 1024, 4, 2, "shared memory"),  # (100 KB + 1 KB reserved) x 2 <= 228 KB < x 3
    (16, 0, 1, 32, "CTAs"),
    (16, 0, 16, 4, "warps"),
])
def test_occupancy(registers, shared, warps, ctas, limit):
    occ = sass_report.occupancy(registers, shared, warps)
    assert (occ["ctas_per_sm"], occ["limited_by"], occ["warps_per_sm"]) == (ctas, limit, ctas * warps)


class _Kernel:
    __name__ = "_project_kernel"


def test_model_on_a_hand_computed_launch():
    """Two waves of one CTA per SM, 4 K-steps with an exposed load and a full wgmma wait, on the H200."""
    gpu, latency = sass_report.GPUS["H200"], 600
    sass = sass_report.analyze_sass(LISTING, WARPS)
    kernel = dict(sass=sass, occupancy=dict(ctas_per_sm=1, warps_per_sm=8, limited_by="registers"),
                  num_stages=3, num_warps=WARPS)
    x = torch.empty(100, 10, device="meta")
    ctas = 2 * gpu.sms
    launch = diagnostics.Launch(_Kernel(), (ctas,), dict(x=x, cos=x, R=64, BLOCK_K=16, copies=1, A_MODE=0), WARPS, 3)
    got = sass_report.model_launch(launch, kernel, gpu, latency)
    threads, L = 32 * WARPS, latency * 1e-9
    mma = 2 * 64 * 64 * 16 * 2 / (gpu.tensor_flops["16bit"] / gpu.sms)  # one CTA's HGMMA per step on its SM
    per_cta = 16 * threads + 4 * (2 + 16 + 16) * threads + (8 + 2 + 16) * threads
    expected = {
        "hbm": 100 * 10 * 4 / gpu.hbm_bytes_per_s,  # x passed twice counts once
        "l2": ctas * per_cta / gpu.l2_bytes_per_s,
        "tensor": ctas * 4 * 2 * 64 * 64 * 16 * 2 / gpu.tensor_flops["16bit"],
        # prologue round trip, 4 steps of (exposed latency + own MMA: the wait forbids overlap), epilogue round trip
        "latency": 2 * (L + 4 * (L + mma) + L),
    }
    assert got["bounds"] == pytest.approx(expected)
    assert got["bound"] == "latency" and got["seconds"] == pytest.approx(expected["latency"])
    assert (got["waves"], got["main_trips"]) == (2, 4)
    # the loop's synchronous loads once, its cp.async twice (prefetch depth 2 = num_stages - 1), one CTA per SM
    assert got["bytes_in_flight_per_sm"] == (2 + 16) * threads + 2 * 16 * threads


def test_model_without_a_trip_rule_says_so():
    class Other:
        __name__ = "_renamed_kernel"

    launch = diagnostics.Launch(Other(), (1,), {}, 4, 3)
    assert sass_report.model_launch(launch, {}, sass_report.GPUS["H100"], 600)["seconds"] is None


def test_every_benchmark_kernel_has_a_trip_rule_and_a_roofline():
    """The benchmark's launches (recorded on meta tensors) name only kernels the model has loop trips for."""
    case = sass_report.Case("up_proj", "prefill", MoRAType.ROPE, 8, torch.float32, "mixed backward")
    launches = sass_report.record(case)
    assert {launch.kernel.__name__ for launch in launches} <= set(sass_report.TRIP_COUNTS)
    assert len(sass_report.cases()) == 2 * 2 * 2 * 2 * 4
    forward = sass_report.Case("up_proj", "prefill", MoRAType.ROPE, 8, torch.bfloat16, "forward")
    assert sass_report.roofline_bytes(forward) == 8192 * (4096 + 2 * 11008) * 2 + 348 * 348 * 2
    assert forward.geometry.R == 348


def _triton_specialization(launch):
    """What Triton's runtime derives for these argument values (its own specialize function), or skip."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    signature, attrs = {}, {}
    for index, (name, is_constexpr, _) in enumerate(diagnostics.parameters(launch.kernel)):
        if is_constexpr:
            signature[name] = "constexpr"
            continue
        kind, key = native_specialize_impl(BaseBackend, launch.args[name], False, True, True)
        signature[name] = kind
        if isinstance(key, str) and key:
            attrs[(index,)] = BaseBackend.parse_attr(key)
    return signature, attrs


def test_specialization_matches_tritons_own():
    """Every launch of two benchmark cases (single and mixed, float32 M), plus values at the edges (a pointer that
    is not 16-byte aligned, 1, 16, 17, 2**31, 2**63, -2**40), specialize as Triton's runtime specializes them."""
    launches = [*sass_report.record(sass_report.Case("q_proj", "decode", MoRAType.SHARING, 256, torch.float32,
                                                     "backward")),
                *sass_report.record(sass_report.Case("up_proj", "prefill", MoRAType.ROPE, 8, torch.bfloat16,
                                                     "mixed forward"))]
    edge = launches[0]
    x = torch.empty(64, dtype=torch.bfloat16, device="meta")
    pointers, integers = iter([x[1:], x[8:]]), iter([1, 16, 17, 2**31, -32, 2**63, -2**40])
    values = {}
    for name, is_constexpr, _ in diagnostics.parameters(edge.kernel):
        value = edge.args[name]
        if isinstance(value, torch.Tensor):
            value = next(pointers, x)
        elif isinstance(value, int) and not is_constexpr:
            value = next(integers, 48)
        values[name] = value
    launches.append(diagnostics.Launch(edge.kernel, edge.grid, values, edge.num_warps, edge.num_stages))
    for launch in launches:
        signature, constexprs, attrs = diagnostics.specialize(launch)
        assert (signature, attrs) == _triton_specialization(launch), launch.kernel.__name__
        assert all(constexprs[n] == 1 for n, c, _ in diagnostics.parameters(launch.kernel)
                   if signature[n] == "constexpr" and not c)
    signature, _, attrs = diagnostics.specialize(launches[-1])
    assert "i64" in signature.values() and "constexpr" in signature.values()
    assert len(attrs) < sum(kind != "constexpr" for kind in signature.values())  # x[1:], 17: no divisibility


def test_one_real_compile(tmp_path):
    """One small variant (decode, q_proj, type 1 backward's first kernel) compiled for sm_90 and read: in a
    subprocess, since the interpreter replaces the compiler in this one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json, torch\nfrom mora_kernels import sass_report, diagnostics\n"
        "from mora_kernels.core import MoRAType\n"
        "case = sass_report.Case('q_proj', 'decode', MoRAType.SHARING, 256, torch.bfloat16, 'forward')\n"
        "launch = sass_report.record(case)[0]\n"
        "import tempfile\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    k = sass_report.compile_kernel(launch, diagnostics.specialize(launch), 90, d)\n"
        "print(json.dumps(k))\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    kernel = json.loads(result.stdout.strip().splitlines()[-1])
    assert kernel["kernel"] == "compress_kernel" and kernel["arch"] == "sm_90"
    assert kernel["registers"] > 0 and kernel["spill_bytes"] == 0
    sass = kernel["sass"]
    assert sass["main"] is not None  # the loop over the B blocks of x
    assert sum(sass["main"]["global_loads"].values()) > 0 and not sass["main"]["tensor_core"]
    assert kernel["occupancy"]["ctas_per_sm"] >= 1
    assert "stride_xc" in kernel["constants_1"]  # x's unit column stride became the constant 1


def test_model_of_a_loopless_kernel_is_one_round_trip():
    """copies = 1 is specialized to a constant, so the kernel's loop disappears: one pass, one latency, its MMA once."""
    class Kernel:
        __name__ = "decompress_adjoint_kernel"

    gpu = sass_report.GPUS["H100"]
    listing = "\n".join(line for line in LISTING.splitlines() if "BRA" not in line)
    kernel = dict(sass=sass_report.analyze_sass(listing, WARPS), num_stages=3, num_warps=WARPS,
                  occupancy=dict(ctas_per_sm=2, warps_per_sm=16, limited_by="registers"))
    launch = diagnostics.Launch(Kernel(), (gpu.sms, 3), dict(copies=1), WARPS, 3)
    got = sass_report.model_launch(launch, kernel, gpu, 800)
    assert got["waves"] == 2 and got["main_trips"] == 0
    assert got["bounds"]["latency"] == pytest.approx(2 * 800e-9)
    assert got["bounds"]["tensor"] == pytest.approx(3 * gpu.sms * 2 * 64 * 64 * 16 * 2 / gpu.tensor_flops["16bit"])
    assert got["bytes_in_flight_per_sm"] is None


def test_write_never_overwrites(tmp_path):
    (tmp_path / "report.md").write_text("an earlier run")
    with pytest.raises(FileExistsError, match="report.md exists"):
        sass_report.write({}, tmp_path)
    assert (tmp_path / "report.md").read_text() == "an earlier run" and not (tmp_path / "report.json").exists()
