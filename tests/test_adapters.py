"""The path without PEFT: the original release's checkpoint, save/load/merge, several adapters, refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import mora_kernels.adapters as mka
from mora_kernels.layer import MoRALinear

from .hf_helpers import GOLDEN, golden_base, golden_expected

# The golden logits were computed in float64 from float32 matrices; here the base is float64 and M (float32) is
# upcast exactly, so only summation order differs: errors ~1e-15 on logits of size ~1. 1e-10 leaves margin and is
# far inside the 1e-6 the task requires; any wrong index or a float32 computation (~1e-7) would exceed it.
GOLDEN_ATOL = 1e-10


def golden_logits(model):
    with torch.no_grad():
        return model(golden_expected()["input_ids"]).logits


@pytest.fixture(scope="module")
def golden_model():
    return mka.load_adapter(golden_base(), GOLDEN / "adapter")


def test_golden_adapter_reproduces_original_logits(golden_model):
    err = (golden_logits(golden_model) - golden_expected()["logits"]).abs().max().item()
    print(f"non-PEFT path, golden adapter: max abs logit error {err:.3e}")
    assert err <= GOLDEN_ATOL
    layer = golden_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, MoRALinear) and int(layer.mora_type) == 6 and layer.r == 8 and layer.R == 32
    assert not layer.training  # swapped into an eval-mode model: its dropout (0.05 in the config) is off


def test_save_writes_the_original_format(golden_model, tmp_path):
    mka.save_adapter(golden_model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    original = json.loads((GOLDEN / "adapter" / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "use_mora", "mora_type", "lora_dropout"):
        assert config[key] == original[key], key
    assert sorted(config["target_modules"]) == sorted(original["target_modules"])
    assert "mora_scaling" not in config  # scaling 1, as the original
    saved = load_file(tmp_path / "adapter_model.safetensors")
    expected = load_file(GOLDEN / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    for key in expected:
        assert saved[key].dtype == torch.float32 and torch.equal(saved[key], expected[key]), key


def test_round_trip_with_a_partial_target(tmp_path):
    from mora_kernels.peft_integration import from_pretrained

    from .hf_helpers import tiny_llama

    ids = torch.randint(0, 128, (2, 8))
    model = mka.apply_mora(tiny_llama(), r"model\.layers\.0\.self_attn\.q_proj", r=4, mora_type=1)
    randomize(model, "default", 3)
    expected = model(ids).logits.detach()
    mka.save_adapter(model, tmp_path)
    # only one of the two q_proj is adapted: the suffix "q_proj" would name both, so full names are written
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    # float32 model, same weights and ops on both sides: equal up to float32 rounding of reordered sums
    plain, peft = mka.load_adapter(tiny_llama(), tmp_path), from_pretrained(tiny_llama(), tmp_path)
    for loaded, model in ((plain, plain), (peft, peft.base_model.model)):
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert type(model.get_submodule("model.layers.1.self_attn.q_proj")) is nn.Linear


def test_merge_reproduces_logits_and_unloads():
    model = mka.merge(mka.load_adapter(golden_base(), GOLDEN / "adapter"))
    assert not any(isinstance(m, MoRALinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    # dW is computed in float64 for the float64 base (see MoRAMatrix.delta_weight): same bound as the forward.
    assert (golden_logits(model) - golden_expected()["logits"]).abs().max().item() <= GOLDEN_ATOL


def corrupt_copy(tmp_path, config_change=None, weights_change=None):
    config = json.loads((GOLDEN / "adapter" / "adapter_config.json").read_text())
    weights = load_file(GOLDEN / "adapter" / "adapter_model.safetensors")
    if config_change:
        config_change(config)
    if weights_change:
        weights_change(weights)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(weights, tmp_path / "adapter_model.safetensors")
    return tmp_path


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


@pytest.mark.parametrize(
    "config_change, weights_change, message",
    [
        (_set("r", 4), None, r"expected shape \(2\d, 2\d\) because r_hat"),
        (_set("mora_type", 5), None, "mora_type must be one of"),
        (_set("use_mora", False), None, "not a MoRA adapter"),
        (None, lambda w: w.__setitem__(next(k for k in w if "lora_B" in k), torch.ones(32, 32)), "lora_A and lora_B"),
        (None, lambda w: w.__setitem__("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 4)), "lm_head"),
        (None, lambda w: [w.pop(k) for k in list(w) if "layers.0.self_attn.q_proj." in k], "has no M for"),
    ],
)
def test_bad_checkpoints_are_refused(tmp_path, config_change, weights_change, message):
    path = corrupt_copy(tmp_path, config_change, weights_change)
    with pytest.raises(ValueError, match=message):
        mka.load_adapter(golden_base(), path)


def test_a_refused_checkpoint_leaves_the_model_untouched(tmp_path):
    def spoil_last(weights, tensor):
        last = sorted(k for k in weights if "lora_A" in k)[-1]  # the last layer read: earlier ones would be swapped
        weights[last], weights[last.replace("lora_A", "lora_B")] = tensor, tensor.clone()

    model = golden_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for tensor, error, message in [
        (torch.zeros(30, 30), ValueError, r"v_proj.lora_A.weight \(r=8, mora_type=6\): expected shape \(28, 28\)"),
        (torch.zeros(28, 28, dtype=torch.int32), TypeError,
         "must be float64, float32, float16 or bfloat16, got torch.int32"),
    ]:
        path = corrupt_copy(tmp_path, weights_change=lambda w: spoil_last(w, tensor))
        with pytest.raises(error, match=message):
            mka.load_adapter(model, path)
        assert not any(isinstance(m, MoRALinear) for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loading_into_an_existing_adapter_needs_its_settings(tmp_path):
    model = mka.load_adapter(golden_base(), GOLDEN / "adapter")  # type 6, r 8, scaling 1, dropout 0.05
    M = model.model.layers[0].self_attn.q_proj.M.detach().clone()
    # type 1 has the same R as type 6 for r=8: only the settings can tell the checkpoint apart
    for change, message in [
        (_set("mora_type", 1), "mora_type 6 here, 1 in the checkpoint"),
        (_set("mora_scaling", 2.0), "scaling 1.0 here, 2.0 in the checkpoint"),
        (_set("lora_dropout", 0.0), "dropout 0.05 here, 0.0 in the checkpoint"),
    ]:
        path = corrupt_copy(tmp_path, change, lambda w: w.update({k: -v for k, v in w.items()}))
        with pytest.raises(ValueError, match=f"already has an adapter 'default' with other settings.*{message}"):
            mka.load_adapter(model, path)
        assert torch.equal(model.model.layers[0].self_attn.q_proj.M, M)
    mka.load_adapter(model, path, adapter_name="other")  # under another name it loads, with its own settings
    assert model.model.layers[0].self_attn.q_proj.scalings["other"] == 1.0


def test_pickled_weights_are_read_without_unpickling_code(tmp_path):
    weights = load_file(GOLDEN / "adapter" / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text((GOLDEN / "adapter" / "adapter_config.json").read_text())
    torch.save(weights, tmp_path / "adapter_model.bin")
    model = mka.load_adapter(golden_base(), tmp_path)
    assert (golden_logits(model) - golden_expected()["logits"]).abs().max().item() <= GOLDEN_ATOL


# --- several adapters on one small model: exact float64 arithmetic, so comparisons are to 1e-12
def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 40)).double().eval()


def randomize(model, adapter_name, seed):
    g = torch.Generator().manual_seed(seed)
    for _, layer in mka.mora_layers(model):
        if adapter_name not in layer.adapters:
            continue
        M = layer.adapters[adapter_name].weight
        M.data.copy_(torch.randn(M.shape, generator=g, dtype=M.dtype))


def test_several_adapters_add_switch_disable_delete_merge():
    model = small_model()
    x = torch.randn(5, 40, dtype=torch.float64)
    base = model(x)
    mka.apply_mora(model, ["0", "2"], r=4, mora_type=6, dtype=torch.float64)
    mka.apply_mora(model, ["0", "2"], r=2, mora_type=1, adapter_name="other", dtype=torch.float64)
    randomize(model, "default", 1)
    randomize(model, "other", 2)
    layer = model[0]
    assert layer.active_adapters == ["default"] and layer.M is layer.adapters["default"].weight
    assert layer.M.requires_grad and not layer.adapters["other"].weight.requires_grad
    y_default = model(x)
    mka.set_adapter(model, "other")
    # R = round(sqrt(64 * 2)) = 11
    assert layer.M is layer.adapters["other"].weight and layer.R == 11 and int(layer.mora_type) == 1
    assert layer.M.requires_grad and not layer.adapters["default"].weight.requires_grad
    y_other = model(x)
    assert not torch.allclose(y_other, y_default)
    with mka.disable_adapters(model):
        torch.testing.assert_close(model(x), base, atol=1e-12, rtol=0)
    # merge one adapter: the forward no longer adds it, the weight holds it, unmerge restores the weight exactly
    weight = layer.base.weight.clone()
    layer.merge()
    assert layer.merged_adapters == ["other"]
    torch.testing.assert_close(layer.base.weight, weight + layer.delta_weight(), atol=1e-12, rtol=0)
    torch.testing.assert_close(model(x), y_other, atol=1e-12, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, weight, atol=1e-12, rtol=0)
    # both active: the updates add up
    mka.set_adapter(model, ["default", "other"])
    model[2].set_adapter("default")  # only the first layer sums both
    h = model[0].base(x) + model[0].adapters["default"](x, 1.0) + model[0].adapters["other"](x, 1.0)
    torch.testing.assert_close(model[0](x), h, atol=1e-12, rtol=0)
    mka.delete_adapter(model, "other")
    assert list(layer.adapters) == ["default"] and layer.active_adapters == ["default"]
    torch.testing.assert_close(model(x), y_default, atol=1e-12, rtol=0)
    with pytest.raises(RuntimeError, match="only adapter"):
        layer.delete_adapter("default")


def two_adapters_on_different_layers():
    """Adapter "a" on the first Linear only, "b" on the second only; both active after apply_mora."""
    model = small_model()
    mka.apply_mora(model, ["0"], r=4, mora_type=6, adapter_name="a", dtype=torch.float64)
    mka.apply_mora(model, ["2"], r=2, mora_type=1, adapter_name="b", dtype=torch.float64)
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    return model


def test_set_adapter_visits_every_layer():
    model = two_adapters_on_different_layers()
    x = torch.randn(5, 40, dtype=torch.float64)
    a_update = model[0].adapters["a"](x, 1.0)
    only_b = model[2](torch.relu(model[0].base(x)))
    mka.set_adapter(model, "b")
    # the first layer holds no "b": it must stop applying "a" and compute its base output
    assert model[0].active_adapters == [] and not model[0].adapters["a"].weight.requires_grad
    torch.testing.assert_close(model[0](x), model[0].base(x), atol=0, rtol=0)
    torch.testing.assert_close(model(x), only_b, atol=1e-12, rtol=0)
    with pytest.raises(RuntimeError, match="no active adapter"):
        model[0].M
    assert "no active adapter" in repr(model[0])
    mka.set_adapter(model, ["a", "b"])  # each layer activates the one it holds
    assert model[0].active_adapters == ["a"] and model[2].active_adapters == ["b"]
    torch.testing.assert_close(model[0](x), model[0].base(x) + a_update, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"adapter_name: unknown adapter\(s\) \['nope'\]"):
        mka.set_adapter(model, ["a", "nope"])
    assert model[0].active_adapters == ["a"]  # refused before any layer changed
    with pytest.raises(ValueError, match="at least one adapter"):
        mka.set_adapter(model, [])


def test_merge_restart_and_rows_with_adapters_on_different_layers():
    from mora_kernels.remora import restart

    model = two_adapters_on_different_layers()
    x = torch.randn(4, 40, dtype=torch.float64)
    mka.set_adapter(model, "b")
    y_b = model(x).detach()
    with mka.adapter_per_row(model, ["b", "__base__", "a", "b"]):
        rows = model(x).detach()
    torch.testing.assert_close(rows[[0, 3]], y_b[[0, 3]], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"adapter_names: unknown adapter\(s\) \['nope'\]"):
        mka.adapter_per_row(model, ["nope"] * 4).__enter__()
    assert restart(model) == 1  # only "b", on the second layer
    torch.testing.assert_close(model(x).detach(), y_b, atol=1e-12, rtol=0)
    torch.testing.assert_close(mka.merge(model)(x), y_b, atol=1e-12, rtol=0)


def test_batch_rows_use_different_adapters():
    model = small_model()
    mka.apply_mora(model, ["0", "2"], r=4, mora_type=6, dtype=torch.float64)
    mka.apply_mora(model, ["0", "2"], r=2, mora_type=3, adapter_name="other", dtype=torch.float64)
    randomize(model, "default", 1)
    randomize(model, "other", 2)
    x = torch.randn(4, 3, 40, dtype=torch.float64)
    expected = {}
    for name in ("default", "other"):
        mka.set_adapter(model, name)
        expected[name] = model(x)
    with mka.disable_adapters(model):
        expected["__base__"] = model(x)
    rows = ["other", "__base__", "default", "other"]
    with mka.adapter_per_row(model, rows):
        y = model(x)
    for i, name in enumerate(rows):
        torch.testing.assert_close(y[i], expected[name][i], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"), mka.adapter_per_row(model, ["nope"] * 4):
        model(x)
    with pytest.raises(ValueError, match="one adapter"), mka.adapter_per_row(model, rows[:3]):
        model(x)


def test_apply_freezes_everything_but_active_matrices():
    model = small_model()
    mka.apply_mora(model, ["0"], r=4)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.adapters.default.weight"]


class FakeInt8Linear(nn.Linear):
    """Imitates a quantized Linear: an nn.Linear subclass whose weight is int8."""

    def __init__(self, n, m):
        super().__init__(n, m)
        self.weight = nn.Parameter(torch.zeros(m, n, dtype=torch.int8), requires_grad=False)


def test_unadaptable_layers_are_refused():
    model = nn.Sequential(FakeInt8Linear(8, 8))
    with pytest.raises(TypeError, match="int8.*quantized layers are not supported"):
        mka.apply_mora(model, ["0"], r=2)
    # merging refuses too if the base weight was swapped for an unsupported one after adaptation
    model = mka.apply_mora(small_model(), ["0"], r=2)
    model[0].base.weight = nn.Parameter(torch.zeros(24, 40, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="quantized"):
        mka.merge(model)


def test_single_adapter_state_dict_key_M_still_loads():
    layer = MoRALinear(nn.Linear(40, 24), r=4, mora_type=6)
    M = torch.randn(layer.R, layer.R)
    layer.load_state_dict({"M": M}, strict=False)
    assert torch.equal(layer.M.detach(), M)
    with pytest.raises(ValueError, match=r"M: expected shape \(16, 16\)"):
        layer.load_state_dict({"M": torch.zeros(3, 3)}, strict=False)
    with pytest.raises(ValueError, match=r"adapters.default.weight: expected shape"):
        layer.load_state_dict({"adapters.default.weight": torch.zeros(3, 3)}, strict=False)


def test_state_dict_keys_one_and_several_adapters():
    model = small_model()
    mka.apply_mora(model, ["0"], r=4, mora_type=6, dtype=torch.float64)
    assert "0.M" in model.state_dict()  # one adapter: the single-adapter key
    mka.apply_mora(model, ["0"], r=2, mora_type=1, adapter_name="other", dtype=torch.float64)
    randomize(model, "default", 1)
    randomize(model, "other", 2)
    state = model.state_dict()
    assert {"0.adapters.default.weight", "0.adapters.other.weight"} <= set(state) and "0.M" not in state
    fresh = small_model()
    mka.apply_mora(fresh, ["0"], r=4, mora_type=6, dtype=torch.float64)
    mka.apply_mora(fresh, ["0"], r=2, mora_type=1, adapter_name="other", dtype=torch.float64)
    fresh.load_state_dict(state)
    for name in ("default", "other"):
        assert torch.equal(fresh[0].adapters[name].weight, model[0].adapters[name].weight)


def test_safe_merge_leaves_the_weight_untouched():
    model = mka.apply_mora(small_model(), ["0"], r=4, dtype=torch.float64)
    model[0].M.data.fill_(float("inf"))
    weight = model[0].base.weight.clone()
    with pytest.raises(ValueError, match="non-finite; not merged"):
        model[0].merge(safe_merge=True)
    assert torch.equal(model[0].base.weight, weight) and not model[0].merged
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        model[0].merge(adapter_names=["nope"])
