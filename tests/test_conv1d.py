"""transformers' Conv1D (GPT-2): weight stored (in, out), so a merge adds dW^T; both paths, and their checkpoints."""

import json
import warnings

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import mora_kernels as mk
import mora_kernels.adapters as mka
from mora_kernels.layer import AdapterMixin

from .hf_helpers import tiny_gpt2

TARGETS = ["c_attn", "c_proj", "c_fc"]  # c_proj: both the attention's and the MLP's


def adapt(path, model, **options):
    if path == "plain":
        return mka.apply_mora(model, TARGETS, r=4, mora_type=6)
    from peft import get_peft_model

    from mora_kernels.peft_integration import MoRAConfig

    options.setdefault("fan_in_fan_out", True)
    return get_peft_model(model, MoRAConfig(r=4, mora_type=6, target_modules=TARGETS, **options))


def randomize(model):
    torch.manual_seed(3)
    for module in model.modules():
        if isinstance(module, AdapterMixin):
            for name in module.mora_adapter_names():
                module.mora_adapter(name).weight.data.normal_(0, 0.05)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_conv1d_layer_features_and_forward():
    conv = Conv1D(96, 64)  # nf = out, nx = in; weight (64, 96)
    layer = mk.MoRALinear(conv, r=4, mora_type=1)
    assert (layer.in_features, layer.out_features, layer.R) == (64, 96, mk.r_hat(64, 96, 4, 1))
    layer.M.data.normal_(0, 0.1)
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    layer.double()
    expected = conv(x) + x @ layer.delta_weight().T.to(x.dtype)  # y = x W + b + x dW^T
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("path", ["plain", "peft"])
def test_conv1d_merges_exactly(path):
    ids = torch.randint(0, 128, (2, 8))
    model = adapt(path, tiny_gpt2())
    randomize(model)
    adapted = logits(model, ids)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, AdapterMixin)}
    assert len(layers) == 8 and all(isinstance(m.base_layer, Conv1D) for m in layers.values())
    expected = {}
    for name, layer in layers.items():
        delta = layer.mora_adapter("default").delta_weight(layer.mora_scaling("default"))  # (out, in)
        expected[name] = (layer.base_layer.weight.data + delta.T, layer.base_layer)
    merged = mka.merge(model) if path == "plain" else model.merge_and_unload()
    for name, (weight, base) in expected.items():
        # W (in, out) += dW^T in float32, rounded once: bit for bit what W + dW^T gives
        assert torch.equal(base.weight.data, weight), name
    assert sum(isinstance(m, Conv1D) for m in merged.modules()) == 8  # the 8 targets are Conv1D again
    # float32 weights rounded once each; through two blocks to logits of size ~1 that stays below 1e-5, while an
    # untransposed merge (the original release's defect) changes them by ~1e-2
    torch.testing.assert_close(logits(merged, ids), adapted, atol=1e-5, rtol=0)


def test_peft_sets_fan_in_fan_out_from_the_layer_as_for_lora():
    with pytest.warns(UserWarning, match="setting fan_in_fan_out to True"):
        model = adapt("peft", tiny_gpt2(), fan_in_fan_out=False)
    assert model.peft_config["default"].fan_in_fan_out is True
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.get_delta_weight("default").shape == layer.base_layer.weight.shape


def test_conv1d_checkpoints_cross_between_the_paths(tmp_path):
    from mora_kernels.peft_integration import from_pretrained

    ids = torch.randint(0, 128, (2, 8))
    plain = adapt("plain", tiny_gpt2())
    randomize(plain)
    expected = logits(plain, ids)
    mka.save_adapter(plain, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the saved fan_in_fan_out matches the layers: no warning
        peft_model = from_pretrained(tiny_gpt2(), tmp_path / "plain")
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=1e-5, rtol=1e-5)
    peft_model.save_pretrained(tmp_path / "peft")
    back = mka.load_adapter(tiny_gpt2(), tmp_path / "peft")
    torch.testing.assert_close(logits(back, ids), expected, atol=1e-5, rtol=1e-5)
