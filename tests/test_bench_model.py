"""The benchmark suite's pieces that numbers depend on: the bytes/launch model against hand-computed counts, and the
baselines (original-release MoRA, fused LoRA) against the reference and PEFT, so a fast baseline cannot be a wrong one.
"""

import pytest
import torch
from torch import nn

from benchmarks import bytes_model
from benchmarks.memorize import KEY_LEN, encode, make_pairs
from benchmarks.original import OriginalMoRALinear
from benchmarks.providers import FusedLoRALinear, peft_lora
from mora_kernels import MoRALinear

T, N, M_OUT = 8, 64, 32  # tokens, in_features, out_features of the hand-computed case
F32 = 4  # bytes per float32


def meta_linear():
    base = nn.Linear(N, M_OUT, bias=False, device="meta").requires_grad_(False)
    x = torch.empty(T, N, device="meta", requires_grad=True)
    g = torch.empty(T, M_OUT, device="meta")
    return base, x, g


def test_base_linear_forward_by_hand():
    """y = x W^T is one GEMM: it reads x (T n) and W (m n), writes y (T m), and does 2 T n m FLOPs."""
    base, x, g = meta_linear()
    count = bytes_model.count(base, x, g, "forward")
    assert count.launches == 1
    assert count.bytes == (T * N + M_OUT * N + T * M_OUT) * F32 == 11264
    assert count.flops == 2 * T * N * M_OUT == 32768
    hw = bytes_model.Hardware("test", bandwidth=1e9, peak_flops={torch.float32: 1e6}, launch_s=1e-6)
    # compute-bound on this made-up machine: 32768 FLOP / 1e6 FLOP/s = 32.768 ms, plus 1 us launch
    assert count.seconds(hw) == pytest.approx(32768 / 1e6 + 1e-6, rel=1e-12)
    fast_math = bytes_model.Hardware("test", bandwidth=1e9, peak_flops={torch.float32: 1e15}, launch_s=1e-6)
    assert count.seconds(fast_math) == pytest.approx(11264 / 1e9 + 1e-6, rel=1e-12)  # memory-bound there


def test_base_linear_backward_by_hand():
    """With W frozen, backward is dx = g W: one GEMM reading g (T m) and W, writing dx (T n)."""
    base, x, g = meta_linear()
    count = bytes_model.count(base, x, g, "backward")
    assert count.launches == 1
    assert count.bytes == (T * M_OUT + M_OUT * N + T * N) * F32
    full = bytes_model.count(base, x, g, "forward+backward")
    assert full.launches == 2 and full.bytes == 2 * 11264


def test_views_are_free_and_broadcasts_count_once():
    x = torch.empty(4, 16, device="meta")
    row = torch.empty(16, device="meta")
    count = bytes_model.Count()
    with bytes_model.OpCounter(count):
        y = x.t().t().view(64).view(4, 16)  # views: no kernel
        z = y + row.expand(4, 16)  # reads x (64) and row once (16 through a stride-0 dim), writes 64
    assert z.shape == (4, 16)
    assert count.launches == 1
    assert count.bytes == (64 + 16 + 64) * F32


def test_analytic_fused_op_counts_its_inputs_and_outputs():
    """Forward: base GEMM, then one op reading x, M, base output and writing the result; R from r_hat(64, 32, 2)."""
    base, x, g = meta_linear()
    layer = bytes_model.FusedModel(MoRALinear(base, 2, 1))
    R = layer.layer.R
    count = bytes_model.count(layer, x, g, "forward")
    assert [o.op for o in count.ops] == ["aten.mm", "mora_bench.fused_forward"]
    fused = count.ops[1]
    assert fused.read == (T * N + R * R + T * M_OUT) * F32
    assert fused.written == T * M_OUT * F32
    assert fused.flops == 2 * T * R * R
    assert fused.dtype == "tf32x3"  # float32 M: costed at the 3xTF32 tensor-core rate, not 16-bit or plain fp32


@pytest.mark.parametrize("mora_type", [1, 6])
def test_analytic_fused_op_is_the_reference(mora_type):
    """The modelled op's CPU implementation and gradients equal MoRALinear's (float64: agreement to rounding)."""
    torch.manual_seed(0)
    base = nn.Linear(40, 100, bias=False, dtype=torch.float64)
    layer = MoRALinear(base, 3, mora_type, dtype=torch.float64)
    nn.init.normal_(layer.M)
    fused = bytes_model.FusedModel(layer)
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 100, dtype=torch.float64)
    outs = []
    for model in (layer, fused):
        x.grad, layer.M.grad = None, None
        y = model(x)
        y.backward(g)
        outs.append((y.detach(), x.grad.clone(), layer.M.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "n, m, r, mora_type",
    [(40, 100, 3, 1), (40, 100, 3, 6), (64, 64, 4, 1), (100, 30, 2, 6), (30, 300, 1, 6)],
)
def test_original_release_baseline_equals_reference(n, m, r, mora_type):
    """Padding by concatenation, block sums / rotations and concatenated copies compute MoRA (docs/design.md).

    float64 throughout (the tables are float32 values, exactly representable): agreement to rounding error."""
    torch.manual_seed(0)
    base = nn.Linear(n, m, bias=False, dtype=torch.float64)
    ours = MoRALinear(base, r, mora_type, dtype=torch.float64)
    original = OriginalMoRALinear(base, r, mora_type).double()
    nn.init.normal_(ours.M)
    with torch.no_grad():
        original.M.copy_(ours.M)
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, m, dtype=torch.float64)
    results = []
    for layer in (ours, original):
        x.grad = None
        y = layer(x)
        y.backward(g)
        results.append((y.detach(), x.grad.clone(), layer.M.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_original_release_baseline_refuses_what_the_original_cannot_pad():
    with pytest.raises(ValueError, match="P="):
        OriginalMoRALinear(nn.Linear(16, 4096, bias=False), 8, 1)  # R = 256 > 2 n: P > n


def test_fused_lora_equals_peft_lora():
    """Same A and B: the addmm LoRA and PEFT's LoRA compute the same output and gradients (float64)."""
    torch.manual_seed(0)
    base = nn.Linear(48, 24, bias=False, dtype=torch.float64)
    fused = FusedLoRALinear(base, 4)
    nn.init.normal_(fused.B)
    reference = peft_lora(base, 4).double()
    lin = reference.base_model.model.lin
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(fused.A)
        lin.lora_B["default"].weight.copy_(fused.B)
    x = torch.randn(2, 5, 48, dtype=torch.float64, requires_grad=True)
    outs = []
    for layer, a in ((fused, fused.A), (reference, lin.lora_A["default"].weight)):
        x.grad = None
        y = layer(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad.clone(), a.grad.clone()))
    for p, q in zip(*outs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_memorization_data_is_seeded_and_uuid_shaped():
    pairs = make_pairs(5, seed=1)
    assert pairs == make_pairs(5, seed=1) and pairs != make_pairs(5, seed=2)
    for key, value in pairs:
        for s in (key, value):
            assert len(s) == KEY_LEN and s[14] == "4" and s[19] in "89ab"
            assert [len(p) for p in s.split("-")] == [8, 4, 4, 4, 12]
    tokens = encode(pairs)
    assert tokens.shape == (5, 2 * KEY_LEN + 3)
