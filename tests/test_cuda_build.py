"""The CUDA extension compiles and links for sm_80 and sm_90, imports without a GPU, and its kernels do not spill.

Also checks, without a GPU, what the built ops promise to torch.compile: schemas, fake (meta) implementations and
the autograd wiring. Skipped, with the reason, only where the CUDA build of torch, nvcc or ninja is missing.
The first build takes ~30-60 s on 2 cores (cached by ninja in ``cuda_build.build_directory()`` afterwards).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mora_kernels import cuda_build, cuda_mora, diagnostics, fused, mora
from mora_kernels.core import Geometry, MoRAType

if torch.version.cuda is None:
    pytest.skip(f"building the CUDA extension needs a CUDA build of torch, this is {torch.__version__}",
                allow_module_level=True)
if cuda_build.cuda_home() is None:
    pytest.skip("building the CUDA extension needs nvcc: no CUDA toolkit found (set CUDA_HOME)",
                allow_module_level=True)
if shutil.which("ninja") is None:
    pytest.skip("building the CUDA extension needs ninja (pip install ninja)", allow_module_level=True)

pytestmark = pytest.mark.slow  # the first build takes minutes; CI builds first and runs this with -m slow
ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("compress_kernel", "decompress_adjoint_kernel", "compress_adjoint_kernel",
           "gemm_kernel", "sum_splits_kernel")


BUILD_AND_IMPORT = """
import torch  # the extension links against torch's libraries and libcudart, not libcuda: no GPU needed
from mora_kernels import cuda_build
cuda_build.build()
assert torch.ops.mora_cuda.forward is not None
print(cuda_build.info()["summary"])
"""


@pytest.fixture(scope="module")
def ops():
    """Builds (cached) and imports in a fresh process, as CI does; then loads into this one."""
    result = subprocess.run([sys.executable, "-c", BUILD_AND_IMPORT], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("built;")
    return cuda_build.load()


def test_build_defines_the_ops(ops):
    assert cuda_build.info()["built"] and cuda_build.info()["loaded"]
    assert str(ops.forward.default._schema) == (
        "mora_cuda::forward(Tensor x, Tensor M, Tensor? base, Tensor? cos, Tensor? sin, int out_features, "
        "int mora_type, float scaling, Tensor(a!)? out=None) -> (Tensor, Tensor)"
    )
    assert str(ops.backward.default._schema) == (
        "mora_cuda::backward(Tensor grad, Tensor? x, Tensor? c, Tensor M, Tensor? cos, Tensor? sin, "
        "int in_features, int mora_type, float scaling, ScalarType x_dtype, bool compute_dx, bool compute_dM) "
        "-> (Tensor, Tensor)"
    )
    for name in ("forward", "backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mora_cuda::{name}", "CUDA")


@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernels_do_not_spill_and_the_gemm_runs_on_tensor_cores(arch):
    usage = [entry for entry in diagnostics.cuda_resource_usage((arch,)) if entry["arch"] == arch]
    for kernel in KERNELS:
        assert any(kernel + "<" in entry["kernel"] or kernel + "(" in entry["kernel"] for entry in usage), kernel
    print(f"\nsm_{arch}: registers / stack / spill stores / spill loads / shared memory / "
          f"{' / '.join(diagnostics.SASS_OPCODES)}")
    for entry in usage:
        print(f"  {entry['registers']:4d} {entry['stack_bytes']:4d} {entry['spill_store_bytes']:4d} "
              f"{entry['spill_load_bytes']:4d} {entry['shared_bytes']:6d} "
              f"{' '.join('%4d' % entry['sass'][opcode] for opcode in diagnostics.SASS_OPCODES)}  {entry['kernel']}")
    spilling = [entry for entry in usage if entry["spill_store_bytes"] or entry["spill_load_bytes"]
                or entry["stack_bytes"]]
    assert not spilling, spilling
    # Every instantiation of the GEMM multiplies on tensor cores: per tile depth of 16 each thread issues 3 (3xTF32)
    # x 2 (depth 8 per atom) x 4 (atoms along its 32 columns) mma.sync m16n8k8, HMMA.1688.F32.TF32 in SASS. Its
    # FFMAs are the type 6 rotation's, not products (the FMA loop it replaced had 256 per tile depth). The right
    # operand goes to shared memory by cp.async (LDGSTS), 4 per thread per tile, in the prologue and the loop.
    gemms = [entry for entry in usage if "gemm_kernel" in entry["kernel"]]
    assert len(gemms) == 13  # split-K, and the forward: 3 out dtypes x (strided c + 3 x dtypes gathered)
    for entry in gemms:
        assert entry["sass"]["HMMA"] >= 3 * 2 * 4, entry
        assert entry["sass"]["FFMA"] < 3 * 2 * 4, entry
        assert entry["sass"]["LDGSTS"] >= 2 * 4, entry


@pytest.mark.parametrize("mora_type", [1, 2, 6, 7])
@pytest.mark.parametrize("with_base", [False, True])
def test_ops_trace_on_meta_tensors(ops, mora_type, with_base):
    """The CUDA backend behind fused.py's ops on meta tensors (their fake kernels, so no GPU): shapes and dtypes of
    out and of every gradient, through the one autograd formula, with only what backward needs saved."""
    x = torch.empty(2, 3, 40, device="meta", dtype=torch.bfloat16, requires_grad=True)
    M = torch.empty(8, 8, device="meta", requires_grad=True)
    base = torch.empty(2, 3, 50, device="meta", dtype=torch.float16, requires_grad=True) if with_base else None
    geo = Geometry(40, 50, 8, MoRAType(mora_type))
    out = fused.apply(x, M, geo, None, 0.5, base, backend="cuda")
    assert (out.shape, out.dtype) == ((2, 3, 50), base.dtype if with_base else x.dtype)
    grads = torch.autograd.grad(out, (x, M) + ((base,) if with_base else ()), torch.empty_like(out))
    assert [(g.shape, g.dtype) for g in grads[:2]] == [(x.shape, x.dtype), (M.shape, M.dtype)]
    if with_base:
        assert (grads[2].shape, grads[2].dtype) == (base.shape, base.dtype)
    (dM_only,) = torch.autograd.grad(fused.apply(x.detach(), M, geo, None, 1.0, None, backend="cuda").sum(), (M,))
    assert dM_only.shape == M.shape


def test_cuda_home_through_an_nvcc_wrapper(tmp_path, monkeypatch):
    """An nvcc on PATH that is a wrapper script (as on this project's CI machines) still yields the toolkit root."""
    real_nvcc = cuda_build.cuda_home() / "bin" / "nvcc"
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real_nvcc} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:/usr/bin:/bin")
    home = cuda_build.cuda_home()
    assert (home / "include" / "cuda_runtime.h").is_file() and (home / "bin" / "nvcc").is_file()
    assert home.resolve() == real_nvcc.resolve().parent.parent


def test_status_and_errors_without_a_gpu():
    usable, reason = cuda_mora.status(torch.device("cpu"))
    assert not usable and "CUDA tensors" in reason
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu"):
        mora(torch.zeros(2, 16), torch.zeros(8, 8), 16, 1, backend="cuda")
    geo = Geometry(n=16, m=16, R=8, t=MoRAType.SHARING)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16 for backend='cuda'"):
        cuda_mora.forward(torch.zeros(2, 16, dtype=torch.float64), torch.zeros(8, 8), (None, None), None, geo, 1.0)
