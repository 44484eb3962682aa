"""Weight-decomposed MoRA (``use_dora``, docs/design.md#dora) against a float64 reference written from DoRA's
definition: ``W' = diag(m / ||W + s dW||) (W + s dW)`` row-wise, the norm detached from the gradient (DoRA's
section 4.3, as PEFT), ``y = x W'^T + b``. Both paths (``MoRALinear`` / ``apply_mora`` and PEFT's ``MoRAConfig``),
every type, gradients of M, the magnitude and x, merge / unmerge, mixed batches, save / load, and the refusals.

Tolerances: float64 throughout, so the layer and the reference differ only in the order of their sums (the layer
adds ``(f - 1) x W^T + f s D(M C(x))`` to ``x W^T + b``; the reference multiplies by ``W'``): a few ulps of the
O(1) outputs, far below 1e-12.
"""

import pytest
import torch
from torch import nn

import mora_kernels as mk
from mora_kernels import reference
from mora_kernels.layer import BASE_ROW

ATOL = 1e-12
TYPES = [1, 2, 3, 4, 6, 7]


def dora_layer(mora_type=6, n=24, m=20, r=3, scaling=0.7, seed=0, **kwargs):
    """A float64 layer with a random M and a magnitude away from its starting norms (so f != 1)."""
    torch.manual_seed(seed)
    layer = mk.MoRALinear(nn.Linear(n, m).double(), r=r, mora_type=mora_type, scaling=scaling, use_dora=True,
                          dtype=torch.float64, **kwargs)
    with torch.no_grad():
        layer.M.normal_(0, 0.3)
        layer.magnitudes["default"].weight.mul_(torch.rand(m, dtype=torch.float64) + 0.5)
    return layer


def reference_weight(layer, name="default", weight=None):
    """DoRA's merged weight ``f (W + s dW)`` from the definition, differentiable in M and m (norm detached)."""
    adapter = layer.adapters[name]
    W = layer.base.weight if weight is None else weight
    V = W + layer.scalings[name] * reference.delta_weight(adapter.weight, adapter.geo, adapter.rope)
    f = layer.magnitudes[name].weight / torch.linalg.vector_norm(V, dim=1).detach()
    return f[:, None] * V


def reference_out(layer, x, name="default"):
    return x @ reference_weight(layer, name).T + layer.base.bias


def x_in(rows=5, n=24):
    return torch.randn(rows, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("mora_type", TYPES)
def test_starts_at_the_base_output(mora_type):
    base = nn.Linear(24, 20).double()
    layer = mk.MoRALinear(base, r=3, mora_type=mora_type, use_dora=True, dtype=torch.float64)
    x = x_in()
    assert torch.equal(layer(x), base(x))  # f = m / ||W|| = 1 exactly at M = 0
    torch.testing.assert_close(layer.magnitudes["default"].weight, base.weight.norm(dim=1), atol=0, rtol=0)


@pytest.mark.parametrize("mora_type", TYPES)
def test_forward_and_gradients_match_the_definition(mora_type):
    layer = dora_layer(mora_type)
    x, g = x_in(), torch.randn(5, 20, dtype=torch.float64)
    out = layer(x)
    grads = torch.autograd.grad((out * g).sum(), (x, layer.M, layer.magnitudes["default"].weight))
    want = reference_out(layer, x)
    want_grads = torch.autograd.grad((want * g).sum(), (x, layer.M, layer.magnitudes["default"].weight))
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (out - layer.base(x)).abs().max() > 0.1  # the adapter does something


def test_training_updates_m_and_the_magnitude():
    layer = dora_layer()
    before = [p.detach().clone() for p in (layer.M, layer.magnitudes["default"].weight)]
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"adapters.default.weight",
                                                                          "magnitudes.default.weight"}
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(x_in()).square().sum().backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, (layer.M, layer.magnitudes["default"].weight)))


def test_dropout_in_training_uses_the_dropped_input_for_both_terms():
    """As PEFT: with dropout active the base term (f - 1) x W^T is computed from the dropped-out x too."""
    layer = dora_layer(dropout=0.5).train()
    x = x_in().detach()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    xd = nn.functional.dropout(x, 0.5)
    W, f = layer.base.weight, reference_weight(layer)  # f (W + s dW)
    expected = layer.base(x) + xd @ (f - W).T
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mora_type", [1, 6])
def test_merge_and_unmerge_are_exact_to_rounding(mora_type):
    layer = dora_layer(mora_type)
    x = x_in().detach()
    W = layer.base.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, reference_weight(layer, weight=W).detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=ATOL, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, W, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=ATOL, rtol=0)


def test_merged_dora_refuses_backward_into_its_magnitude():
    layer = dora_layer()
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        layer(x_in()).sum().backward()


def test_with_a_plain_adapter_merged_in_any_order():
    """A DoRA adapter and a plain one active together: ``x (f (W + s1 dW1))^T + s2 x dW2^T + b`` unmerged, merged
    together, merged one after the other, and unmerged back to W."""
    layer = dora_layer()
    layer.add_adapter("plain", r=3, mora_type=1, scaling=0.5, dtype=torch.float64)
    with torch.no_grad():
        layer.adapters["plain"].weight.normal_(0, 0.3)
    layer.set_adapter(["default", "plain"])
    x = x_in().detach()
    plain = layer.adapters["plain"]
    plain_update = 0.5 * reference.delta_weight(plain.weight, plain.geo, plain.rope)
    expected = x @ (reference_weight(layer) + plain_update).T + layer.base.bias
    W = layer.base.weight.detach().clone()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
        for order in (["default", "plain"], ["plain", "default"]):
            for name in order:
                layer.merge(adapter_names=[name])
                torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
            layer.unmerge()
            torch.testing.assert_close(layer.base.weight, W, atol=ATOL, rtol=0)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_mixed_batch_rows_match_their_own_adapter():
    """One adapter per row (DoRA, plain, DoRA with another magnitude, none): each row as its adapter alone; the
    magnitudes' and M's gradients as the sum of the per-row ones."""
    layer = dora_layer()
    layer.add_adapter("plain", r=3, mora_type=6, scaling=0.5, dtype=torch.float64)
    layer.add_adapter("other", r=3, mora_type=6, scaling=1.5, dtype=torch.float64, use_dora=True)
    with torch.no_grad():
        for name in ("plain", "other"):
            layer.adapters[name].weight.normal_(0, 0.3)
        layer.magnitudes["other"].weight.mul_(0.8)
    layer.set_adapter(["default", "plain", "other"])
    names = ["default", "plain", BASE_ROW, "other", "default"]
    x = x_in(rows=5)
    out = layer(x, adapter_names=names)
    params = [layer.M, layer.adapters["plain"].weight, layer.magnitudes["default"].weight,
              layer.magnitudes["other"].weight, x]
    grads = torch.autograd.grad(out.square().sum(), params)
    rows = []
    for i, name in enumerate(names):
        row = x[i:i + 1]
        if name == BASE_ROW:
            rows.append(layer.base(row))
        elif name == "plain":
            p = layer.adapters["plain"]
            rows.append(row @ (layer.base.weight + 0.5 * reference.delta_weight(p.weight, p.geo, p.rope)).T
                        + layer.base.bias)
        else:
            rows.append(reference_out(layer, row, name))
    expected = torch.cat(rows)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), params)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_save_and_load_on_both_paths(tmp_path):
    from peft import PeftModel

    import mora_kernels.peft_integration as mkp

    model = nn.Sequential(nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 12)).double()
    # M (and the magnitude) in float32 as PEFT's path keeps them on a float64 base; the update computes in float64
    mk.apply_mora(model, ["0", "2"], r=3, mora_type=6, use_dora=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    x = x_in().detach()
    expected = model(x)
    mk.save_adapter(model, tmp_path / "a")
    # the base weights the adapter was trained on, as a plain model's state dict
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".base." in k}

    def base():
        net = nn.Sequential(nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 12)).double()
        net.load_state_dict(state)
        return net

    own = mk.load_adapter(base(), tmp_path / "a")
    torch.testing.assert_close(own(x), expected, atol=ATOL, rtol=0)
    assert own[0].magnitudes["default"].weight.requires_grad
    for loaded in (mkp.from_pretrained(base(), tmp_path / "a"), PeftModel.from_pretrained(base(), tmp_path / "a")):
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, atol=ATOL, rtol=0)
        loaded.save_pretrained(tmp_path / "peft")  # PEFT writes the same keys: this package reads them back
        again = mk.load_adapter(base(), tmp_path / "peft")
        torch.testing.assert_close(again(x), expected, atol=ATOL, rtol=0)


def test_peft_path_matches_the_definition_and_merges():
    from peft import get_peft_model

    import mora_kernels.peft_integration as mkp

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 20)).double()
    model = get_peft_model(net, mkp.MoRAConfig(r=3, mora_type=6, target_modules=["0"], use_dora=True,
                                               init_lora_weights=False, mora_scaling=0.7))
    lin = model.base_model.model[0]
    assert "lora_magnitude_vector.default.weight" in dict(lin.named_parameters())
    with torch.no_grad():
        lin.lora_magnitude_vector["default"].weight.mul_(1.3)
    adapter = lin.lora_A["default"]
    W = lin.base_layer.weight.detach().clone()
    V = W + 0.7 * reference.delta_weight(adapter.weight.double(), adapter.geo, adapter.rope)
    f = lin.lora_magnitude_vector["default"].weight.double() / V.norm(dim=1)
    x = x_in().detach()
    expected = x @ (f[:, None] * V).T + lin.base_layer.bias
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, atol=ATOL, rtol=0)


def test_refusals():
    layer = dora_layer()
    with pytest.raises(ValueError, match="DoRA"):
        layer.restart()
    with pytest.raises(ValueError, match="DoRA"):
        mk.export_lora(nn.Sequential(layer), "/nonexistent-never-written")
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        layer.add_adapter("b", r=3, use_dora=1)


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_quantized_base(kind):
    """On a bitsandbytes base the norms are of the dequantized weight (as PEFT's DoRA on QLoRA); a merge is
    quantized once from the kept packed weight, and the unmerge puts those bytes back exactly."""
    from .quant_helpers import dense_weight, float_compute, quantize_linear, stored

    torch.manual_seed(0)
    base = float_compute(nn.Sequential(quantize_linear(nn.Linear(64, 48), kind)))[0]
    layer = mk.MoRALinear(base, r=4, mora_type=6, scaling=0.7, use_dora=True)
    with torch.no_grad():
        layer.M.normal_(0, 0.3)
        layer.magnitudes["default"].weight.mul_(torch.rand(48) + 0.5)
    x = torch.randn(3, 64)
    W = dense_weight(base).double()
    adapter = layer.adapters["default"]
    V = W + 0.7 * reference.delta_weight(adapter.weight.double(), adapter.geo, adapter.rope)
    f = layer.magnitudes["default"].weight.double() / V.norm(dim=1)
    expected = x.double() @ (f[:, None] * V).T + base.bias.double()
    with torch.no_grad():
        got = layer(x).double()
    # float32 throughout (the base's matmul, the update, f): each of the O(10) terms per output rounds at 2^-24
    # relative to sums of ~64 products of O(1): 1e-4 absolute is ~100x that, and far below a wrong f (O(0.1))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    before = stored(base)
    layer.merge()
    layer.unmerge()
    assert all(torch.equal(a, b) for a, b in zip(before, stored(base)))
