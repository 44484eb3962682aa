"""torch.compile(fullgraph=True) through the fused backends' custom ops (fused.py), on each (backend, device) that runs
here: Triton on CPU through the interpreter; Triton and CUDA on a GPU (TRITON_INTERPRET not "1")."""

import pytest
import torch

pytest.importorskip("triton")

import mora_kernels  # noqa: E402
from mora_kernels import reference  # noqa: E402
from mora_kernels.core import Geometry, MoRAType  # noqa: E402

from .helpers import fused_targets  # noqa: E402

TARGETS = fused_targets(("triton", "cpu"), ("triton", "cuda"), ("cuda", "cuda"))


class Adapter(torch.nn.Module):
    def __init__(self, n, m, R, t, backend):
        super().__init__()
        self.base = torch.nn.Linear(n, m)
        self.M = torch.nn.Parameter(torch.randn(R, R) / R)
        self.m, self.t, self.backend = m, t, backend

    def forward(self, x):
        return mora_kernels.mora(x, self.M, self.m, self.t, scaling=0.5, base=self.base(x), backend=self.backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("t", (1, 6))
def test_compile_fullgraph(t, device, backend):
    """No graph break (fullgraph=True raises on one); output and gradients equal eager within float32 rounding."""
    torch.manual_seed(0)
    module = Adapter(24, 40, 10, t, backend).to(device)
    x = torch.randn(2, 3, 24, device=device, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    dx, dM = x.grad.clone(), module.M.grad.clone()
    x.grad = None
    module.M.grad = None
    eager = module(x)
    eager.square().sum().backward()
    geo = Geometry(24, 40, 10, MoRAType(t))
    want = reference.forward(x.double(), module.M.double(), geo, None, 0.5, module.base(x).double())
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out, eager, rtol=1e-6, atol=1e-6)
    assert torch.allclose(dx, x.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(dM, module.M.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("t", (1, 6))
def test_compile_fullgraph_moralinear_model(t, device, backend):
    """A model of MoRALinear layers (the triton backend) compiles with no graph break, forward and backward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 20))
    mora_kernels.replace_linears(model, r"\d", r=2, mora_type=t, backend=backend)
    for layer in model.modules():
        if isinstance(layer, mora_kernels.MoRALinear):
            torch.nn.init.normal_(layer.M, std=0.1)
    model.to(device)
    x = torch.randn(5, 24, device=device)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    grads = [layer.M.grad.clone() for layer in model.modules() if isinstance(layer, mora_kernels.MoRALinear)]
    model.zero_grad()
    eager = model(x)
    eager.square().sum().backward()
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
    for layer, grad in zip((m for m in model.modules() if isinstance(m, mora_kernels.MoRALinear)), grads):
        assert torch.allclose(grad, layer.M.grad, rtol=1e-4, atol=1e-6)


@pytest.fixture
def restore_matmul_precision():
    """The test changes torch's float32 matmul precision; put the previous one back."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", fused_targets(("triton", "cpu"), ("triton", "cuda")))
def test_compile_follows_the_float32_matmul_precision(device, backend, restore_matmul_precision):
    """The custom op's body runs eagerly, where the launchers read ``torch.get_float32_matmul_precision()``: a
    compiled call equals the eager one under "highest" and under "medium" (float32 x and M, bfloat16 products), and
    the two modes' results differ (by ~2^-9 relative here; float32 rounding is ~2^-24)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 24, device=device)
    M = torch.randn(10, 10, device=device) / 10

    def adapter(x, M):
        return mora_kernels.mora(x, M, 40, 1, scaling=0.5, backend=backend)

    compiled = torch.compile(adapter, fullgraph=True)
    results = {}
    for precision in ("highest", "medium"):
        torch.set_float32_matmul_precision(precision)
        results[precision] = compiled(x, M)
        assert torch.allclose(results[precision], adapter(x, M), rtol=1e-6, atol=1e-6), precision
    assert not torch.allclose(results["highest"], results["medium"], rtol=1e-4, atol=1e-4)
