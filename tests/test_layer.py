"""MoRALinear and replace_linears: zero init, merge, dtype moves, state dicts, dropout."""

import pytest
import torch
from torch import nn

import mora_kernels as mk
from mora_kernels import MoRALinear, replace_linears

TYPES = [1, 2, 3, 4, 6, 7]


def make_layer(n=40, m=24, r=4, mora_type=1, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    base = nn.Linear(n, m, dtype=dtype)
    layer = MoRALinear(base, r, mora_type, dtype=dtype, **kwargs)
    return layer


@pytest.mark.parametrize("mora_type", TYPES)
def test_zero_init_gives_base_output(mora_type):
    layer = make_layer(mora_type=mora_type)
    assert (layer.M == 0).all() and layer.M.requires_grad
    assert not any(p.requires_grad for p in layer.base.parameters())
    x = torch.randn(3, 5, 40, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)


@pytest.mark.parametrize("mora_type", TYPES)
def test_merge_unmerge_round_trip(mora_type):
    layer = make_layer(mora_type=mora_type, scaling=0.7)
    nn.init.normal_(layer.M)
    weight = layer.base.weight.detach().clone()
    x = torch.randn(4, 40, dtype=torch.float64)
    unmerged = layer(x)
    torch.testing.assert_close(unmerged, layer.base(x) + 0.7 * mk.mora(x, layer.M, 24, mora_type))
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.base.weight, weight + layer.delta_weight(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, weight, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-12, atol=1e-12)


def test_type6_merge_with_a_single_block():
    """docs/design.md, D1: the original's type 6 merge raised when B == 1 (n <= R)."""
    layer = make_layer(n=6, m=40, r=8, mora_type=6)
    assert layer.geo.blocks == 1
    nn.init.normal_(layer.M)
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_to_dtype_keeps_rope_tables_float32_and_right_size():
    layer = make_layer(n=64, m=48, r=4, mora_type=6, dtype=torch.float32)
    R = layer.R
    moved = layer.to(torch.bfloat16)
    assert moved.M.dtype == torch.bfloat16 and moved.base.weight.dtype == torch.bfloat16
    assert moved.rope_cos.dtype == moved.rope_sin.dtype == torch.float32
    assert moved.rope_cos.shape == (layer.geo.used_blocks, R)
    moved.to(torch.float64)
    assert moved.rope_cos.dtype == torch.float32
    assert "rope_cos" not in moved.state_dict()
    # Two layers of different R keep their own tables (docs/design.md, D3: the original shared one cache).
    other = make_layer(n=64, m=48, r=9, mora_type=6, dtype=torch.float32)
    assert other.R != R and other.rope_cos.shape[1] == other.R


def test_to_meta_device_moves_tables():
    layer = make_layer(mora_type=6, dtype=torch.float32).to("meta")
    assert layer.rope_cos.device.type == "meta" and layer.M.device.type == "meta"


def test_bf16_base_with_float32_M():
    """The original keeps M in float32 under a bf16 base; the output follows the base's dtype."""
    torch.manual_seed(0)
    base = nn.Linear(64, 32, dtype=torch.bfloat16)
    layer = MoRALinear(base, 4, 6)
    assert layer.M.dtype == torch.float32
    nn.init.normal_(layer.M, std=0.1)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).double() + mk.mora(x.double(), layer.M.double(), 32, 6)
    # one rounding of the sum to bf16: at most 2^-8 relative (unit roundoff); the float32 update adds ~1e-7.
    torch.testing.assert_close(y.double(), expected, rtol=2**-8, atol=1e-6)


def test_state_dict_round_trip():
    layer = make_layer(mora_type=6)
    nn.init.normal_(layer.M)
    state = layer.state_dict()
    assert set(state) == {"M", "base.weight", "base.bias"}
    fresh = make_layer(mora_type=6)
    fresh.load_state_dict(state)
    x = torch.randn(2, 40, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_wrong_shaped_M_in_state_dict_says_what_was_expected():
    layer = make_layer(n=40, m=24, r=4, mora_type=1)
    state = layer.state_dict()
    state["M"] = torch.zeros(5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"M: expected shape \(16, 16\) because r_hat\(in_features=40, "
                                         r"out_features=24, r=4, mora_type=1\) = 16; got \(5, 5\)"):
        layer.load_state_dict(state)


def test_dropout_only_in_training_mode():
    layer = make_layer(dropout=0.5, mora_type=1)
    nn.init.normal_(layer.M)
    x = torch.randn(64, 40, dtype=torch.float64)
    layer.eval()
    expected = layer.base(x) + mk.mora(x, layer.M, 24, 1)
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    torch.manual_seed(3)
    trained = layer(x)
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(trained, layer.base(x) + mk.mora(dropped, layer.M, 24, 1))
    assert not torch.allclose(trained, expected)
    # dropout applies to the adapter's input only: the base sees x unchanged
    layer.M.data.zero_()
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)


@pytest.mark.parametrize("mora_type", [1, 6])
def test_inplace_accumulate_reference(mora_type):
    """inplace=True returns base itself holding the same values as the out-of-place sum (one rounding each)."""
    torch.manual_seed(0)
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    M = torch.randn(16, 16)
    base = torch.randn(3, 24, dtype=torch.bfloat16)
    expected = mk.mora(x, M, 24, mora_type, base=base, scaling=0.3)
    target = base.clone()
    assert mk.mora(x, M, 24, mora_type, base=target, scaling=0.3, inplace=True) is target
    assert torch.equal(target, expected)


def test_gradients_flow_only_to_M():
    layer = make_layer(mora_type=1)
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.M.grad is not None and layer.M.grad.abs().sum() > 0
    assert layer.base.weight.grad is None and x.grad is not None


def test_extra_repr_names_the_configuration():
    text = repr(make_layer(mora_type=6))
    for part in ("in_features=40", "out_features=24", "r=4", "R=16", "mora_type=6", "merged=False"):
        assert part in text


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 8)
        self.out = nn.Linear(8, 16)

    def forward(self, x):
        return self.out(self.v_proj(self.q_proj(x)))


def test_replace_linears_by_name_and_regex():
    model = nn.Sequential(Block(), Block())
    names = replace_linears(model, ["q_proj", "v_proj"], r=2, mora_type=6)
    assert names == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]
    assert isinstance(model[1].v_proj, MoRALinear) and isinstance(model[0].out, nn.Linear)
    assert model(torch.randn(2, 16)).shape == (2, 16)
    # running again does not wrap the wrapped layers' bases
    assert replace_linears(model, r"1\.out", r=2) == ["1.out"]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        replace_linears(model, ["k_proj"], r=2)


@pytest.mark.slow
@pytest.mark.parametrize("mora_type", [1, 6])
def test_torch_compile_fullgraph(mora_type):
    layer = make_layer(mora_type=mora_type, dtype=torch.float32)
    nn.init.normal_(layer.M)
    x = torch.randn(3, 40)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_switching_away_from_a_merged_adapter_unmerges_it():
    layer = make_layer(mora_type=1)
    nn.init.normal_(layer.M)
    layer.add_adapter("b", 4, 1, dtype=torch.float64)
    nn.init.normal_(layer.adapters["b"].weight)
    x = torch.randn(3, 40, dtype=torch.float64)
    layer.merge()
    layer.set_adapter("b")
    assert layer.merged_adapters == []
    expected = layer.base(x) + mk.mora(x, layer.adapters["b"].weight, 24, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
