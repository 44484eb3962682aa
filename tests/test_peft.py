"""The PEFT path: MoRAConfig routes LoRA's layer creation to MoRAPeftLinear."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import mora_kernels.adapters as mka
import mora_kernels.peft_integration as mkp

from .hf_helpers import GOLDEN, golden_base, golden_expected, tiny_llama

# float64 base, float32 M upcast exactly: only summation order differs (~1e-15); see test_adapters.GOLDEN_ATOL.
GOLDEN_ATOL = 1e-10


def logits(model, ids=None):
    with torch.no_grad():
        return model(golden_expected()["input_ids"] if ids is None else ids).logits


def test_golden_adapter_through_peft(tmp_path):
    model = mkp.from_pretrained(golden_base(), GOLDEN / "adapter")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, mkp.MoRAPeftLinear) and layer.lora_A["default"].geo.R == 32
    err = (logits(model) - golden_expected()["logits"]).abs().max().item()
    print(f"PEFT path, golden adapter: max abs logit error {err:.3e}")
    assert err <= GOLDEN_ATOL

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["use_mora"], config["mora_type"]) == ("LORA", 8, True, 6)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    original = load_file(GOLDEN / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in original)

    # PeftModel.from_pretrained itself works once given the config PEFT would otherwise read without use_mora
    again = PeftModel.from_pretrained(golden_base(), tmp_path, config=mkp.load_config(tmp_path))
    assert (logits(again) - golden_expected()["logits"]).abs().max().item() <= GOLDEN_ATOL

    with model.disable_adapter():
        base = logits(model)
    torch.testing.assert_close(base, logits(golden_base()), atol=0, rtol=0)
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    # dW is computed in float64 for the float64 base, so the merge is as exact as the forward.
    assert (logits(merged) - golden_expected()["logits"]).abs().max().item() <= GOLDEN_ATOL


def test_both_paths_read_each_others_checkpoints(tmp_path):
    peft_model = mkp.from_pretrained(golden_base(), GOLDEN / "adapter")
    peft_model.save_pretrained(tmp_path / "peft")
    plain = mka.load_adapter(golden_base(), tmp_path / "peft")
    mka.save_adapter(plain, tmp_path / "plain")
    back = mkp.from_pretrained(golden_base(), tmp_path / "plain")
    assert (logits(back) - golden_expected()["logits"]).abs().max().item() <= GOLDEN_ATOL
    # a second adapter from a folder, on the same PeftModel
    mkp.load_adapter(back, tmp_path / "peft", "second")
    back.set_adapter("second")
    assert (logits(back) - golden_expected()["logits"]).abs().max().item() <= GOLDEN_ATOL
    with back.disable_adapter():
        torch.testing.assert_close(logits(back), logits(golden_base()), atol=0, rtol=0)


def test_scaling_crosses_between_the_paths(tmp_path):
    ids = torch.randint(0, 128, (2, 8))
    plain = mka.apply_mora(tiny_llama(), ["q_proj", "v_proj"], r=4, mora_type=2, scaling=0.5)
    for _, layer in mka.mora_layers(plain):
        layer.M.data.normal_(0, 0.1)
    expected = logits(plain, ids)
    mka.save_adapter(plain, tmp_path / "plain")
    peft_model = mkp.from_pretrained(tiny_llama(), tmp_path / "plain")
    assert peft_model.peft_config["default"].mora_scaling == 0.5
    # float32 model, the same ops on both paths: equal up to float32 rounding of reordered sums
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=1e-5, rtol=1e-5)
    peft_model.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["mora_scaling"] == 0.5
    back = mka.load_adapter(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(back, ids), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mora_scaling must be finite"):
        mkp.MoRAConfig(r=2, mora_scaling=float("nan"))


def test_several_adapters_and_rows_through_peft():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), mkp.MoRAConfig(r=4, mora_type=6, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("other", mkp.MoRAConfig(r=2, mora_type=1, target_modules=["q_proj", "v_proj"]))
    model.eval()  # PEFT refuses adapter_names in training mode
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.data.normal_(0, 0.1)
    ids = torch.randint(0, 128, (3, 8))
    out = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        out[name] = logits(model, ids)
    with model.disable_adapter():
        out["__base__"] = logits(model, ids)
    assert not torch.allclose(out["default"], out["other"])
    rows = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=rows).logits
    for i, name in enumerate(rows):
        # float32 model; the per-row path runs the same ops on fewer rows: agreement to float32 rounding (~1e-6)
        torch.testing.assert_close(mixed[i], out[name][i], atol=1e-5, rtol=1e-5)
    model.set_adapter("other")
    model.delete_adapter("default")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert list(layer.lora_A) == ["other"] and list(layer.lora_B) == ["other"]
    torch.testing.assert_close(logits(model, ids), out["other"], atol=0, rtol=0)


def test_adapters_on_different_layers_through_peft():
    from mora_kernels.remora import restart

    model = get_peft_model(tiny_llama(), mkp.MoRAConfig(r=4, mora_type=6, target_modules=["q_proj"]))
    model.add_adapter("b", mkp.MoRAConfig(r=2, mora_type=1, target_modules=["v_proj"]))
    model.eval()
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.data.normal_(0, 0.1)
    attention = model.base_model.model.model.layers[0].self_attn
    q, v = attention.q_proj, attention.v_proj
    x = torch.randn(3, 64)
    model.set_adapter("b")
    with torch.no_grad():
        # q_proj holds only "default": with "b" active it computes its base output (PEFT's LoraLayer rule)
        torch.testing.assert_close(q(x), q.base_layer(x), atol=0, rtol=0)
        assert not torch.allclose(v(x), v.base_layer(x))
    ids = torch.randint(0, 128, (3, 8))
    y_b = logits(model, ids)
    with torch.no_grad():
        mixed = model(ids, adapter_names=["b", "default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], y_b[0], atol=1e-5, rtol=1e-5)  # float32: see the test above
    assert restart(model) == 2  # "b" on both layers' v_proj
    # float32 model: folding dW into W changes the logits only by float32 rounding
    torch.testing.assert_close(logits(model, ids), y_b, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), y_b, atol=1e-5, rtol=1e-5)


def test_peft_refuses_unadaptable_targets():
    from .test_adapters import FakeInt8Linear

    class Net(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.proj = layer

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(TypeError, match="quantized layers are not supported"):
        get_peft_model(Net(FakeInt8Linear(8, 8)), mkp.MoRAConfig(r=2, target_modules=["proj"]))
    with pytest.raises(TypeError, match="target_modules: module 'proj' cannot be adapted: .*Embedding"):
        get_peft_model(Net(nn.Embedding(8, 8)), mkp.MoRAConfig(r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match="mora_type must be one of"):
        mkp.MoRAConfig(r=2, mora_type=5, target_modules=["proj"])
    with pytest.raises(ValueError, match="use_qalora"):
        mkp.MoRAConfig(r=2, use_qalora=True, target_modules=["proj"])
