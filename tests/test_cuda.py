"""The CUDA backend's own C++ checks on a GPU: every argument of ``torch.ops.mora_cuda`` validated with a message that
names it. Its parity with the float64 reference (golden cases, random shapes, every type and dtype, gradients,
opcheck, torch.compile, determinism, 64-bit offsets) is tests/test_fused.py's and tests/test_compile.py's, under the
same tolerance rule as the Triton backend's. Without a GPU the whole module skips.
"""

import pytest
import torch

from mora_kernels import cuda_build, cuda_mora
from mora_kernels.core import rope_tables

pytestmark = pytest.mark.gpu  # benchmarks/gpu_suite.sh runs these (-m gpu)

if not torch.cuda.is_available():
    pytest.skip("the CUDA backend's checks need a CUDA GPU (none available)", allow_module_level=True)
_usable, _reason = cuda_mora.status(torch.device("cuda"))
if not _usable:
    pytest.skip(f"the CUDA backend cannot run here: {_reason}", allow_module_level=True)


def test_argument_errors_name_the_argument():
    ops = cuda_build.load()
    x = torch.randn(4, 40, device="cuda")
    M = torch.randn(8, 8, device="cuda")
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.forward(torch.randn(40, 4, device="cuda").T, M, None, None, None, 50, 1, 1.0)
    with pytest.raises(ValueError, match="M must be on x's device|M must be a CUDA tensor"):
        ops.forward(x, M.cpu(), None, None, None, 50, 1, 1.0)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ops.forward(x.double(), M, None, None, None, 50, 1, 1.0)
    with pytest.raises(ValueError, match="base must have shape"):
        ops.forward(x, M, torch.zeros(4, 49, device="cuda"), None, None, 50, 1, 1.0)
    with pytest.raises(ValueError, match="type 6 needs the rope tables"):
        ops.forward(x, M, None, None, None, 50, 6, 1.0)
    with pytest.raises(ValueError, match="rope cos must have shape"):
        cos, sin = rope_tables(8, 1, "cuda")
        ops.forward(x, M, None, cos, sin, 50, 6, 1.0)
    with pytest.raises(ValueError, match="even square size"):
        ops.forward(x, torch.randn(7, 7, device="cuda"), None, None, None, 50, 7, 1.0)
    with pytest.raises(ValueError, match="mora_type must be one of"):
        ops.forward(x, M, None, None, None, 50, 5, 1.0)
    g = torch.randn(4, 50, device="cuda")
    with pytest.raises(ValueError, match="c must have shape"):
        ops.backward(g, None, torch.zeros(4, 7, device="cuda"), M, None, None, 40, 1, 1.0, torch.float32, False, True)
    with pytest.raises(TypeError, match="c must be float32"):
        ops.backward(g, None, torch.zeros(4, 8, device="cuda", dtype=torch.float16), M, None, None, 40, 1, 1.0,
                     torch.float32, True, True)
    with pytest.raises(ValueError, match=r"types 6/7 recompute C\(x\) from x: pass x and c=None"):
        ops.backward(g, x, torch.zeros(4, 8, device="cuda"), M, None, None, 40, 7, 1.0, torch.float32, True, True)
    with pytest.raises(ValueError, match="types 1-4 need forward's c"):
        ops.backward(g, x, None, M, None, None, 40, 1, 1.0, torch.float32, True, True)
    with pytest.raises(TypeError, match="x_dtype must be float32, float16 or bfloat16"):
        ops.backward(g, None, torch.zeros(4, 8, device="cuda"), M, None, None, 40, 1, 1.0, torch.float64, True, True)
    with pytest.raises(TypeError, match="out must have x's dtype"):
        ops.forward(x, M, None, None, None, 50, 1, 1.0, torch.zeros(4, 50, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must have shape"):
        ops.forward(x, M, None, None, None, 50, 1, 1.0, torch.zeros(4, 49, device="cuda"))
