"""PEFT parity: each PEFT behaviour run for LoRA and MoRA (types 1 and 6; every type for add_weighted_adapter's
pruning merges) side by side on the same tiny model.

Every test runs the same code for the three methods; where MoRA differs from LoRA, the test asserts the clear
refusal or the documented reason (docs/peft.md, its table). The model is float64, so that paths which are equal in exact
arithmetic agree to float64 rounding: outputs are O(1) sums of a few dozen terms, each rounding ~1e-16 relative, so
1e-12 is far above rounding and far below any real difference (an adapter changes outputs by ~1e-1).
"""

import dataclasses
import math

import pytest
import torch
from peft import LoraConfig, PeftMixedModel, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import model as lora_model
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file
from torch import nn

import mora_kernels as mk
import mora_kernels.peft_integration as mkp
from mora_kernels import r_hat, reference

ATOL = 1e-12  # float64 model: see the module docstring
METHODS = ["lora", "mora1", "mora6"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return x + torch.tanh(self.proj(x))


class Net(nn.Module):
    """lin0 (12 -> 16), two blocks with a proj (16 -> 16) each, head (16 -> 6)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(12, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 6)
        self.to(dtype)

    def forward(self, x):
        x = torch.tanh(self.lin0(x))
        for block in self.layers:
            x = block(x)
        return self.head(x)


def config(method, **kwargs):
    """LoRA or MoRA, r=2, with a random adapter (init_lora_weights=False) so that every adapter changes the output."""
    kwargs = {"r": 2, "target_modules": ["lin0", "proj"], "init_lora_weights": False, **kwargs}
    if method == "lora":
        return LoraConfig(**kwargs)
    return mkp.MoRAConfig(mora_type=int(method[-1]), **kwargs)


def load(method, base, path, **kwargs):
    """PEFT's loader for LoRA; for MoRA this package's, since PEFT drops use_mora (see test_peft_from_pretrained)."""
    if method == "lora":
        return PeftModel.from_pretrained(base, path, **kwargs)
    return mkp.from_pretrained(base, path, **kwargs)


def peft(method, **kwargs):
    torch.manual_seed(1)
    return get_peft_model(Net(), config(method, **kwargs)).eval()


def x_in(rows=3):
    return torch.randn(rows, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def out(model, x=None, **kwargs):
    with torch.no_grad():
        return model(x_in() if x is None else x, **kwargs)


def layer(model, name="lin0"):
    return model.base_model.model.get_submodule(name)


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def adapter_count(model, name="lin0"):
    return len(layer(model, name).lora_A)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_changes_output_and_merge_unmerge(method):
    model = peft(method)
    base, adapted = out(Net()), out(model)
    assert (adapted - base).abs().max() > 1e-3  # init_lora_weights=False: a random adapter
    weight = layer(model).base_layer.weight.clone()
    model.merge_adapter()
    assert layer(model).merged
    close(out(model), adapted)
    model.unmerge_adapter()
    assert not layer(model).merged
    close(layer(model).base_layer.weight, weight)
    close(out(model), adapted)


@pytest.mark.parametrize("method", METHODS)
def test_disable_while_merged(method):
    model = peft(method)
    adapted = out(model)
    model.merge_adapter()
    with model.disable_adapter():
        close(out(model), out(Net()))  # the adapter was unmerged: W - dW + dW rounds in float64
    assert not layer(model).merged
    close(out(model), adapted)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype, u", [(torch.float16, 2**-11), (torch.bfloat16, 2**-8)])
def test_half_precision_forward_and_merge(method, dtype, u):
    """A 16-bit model with its adapters in its dtype (autocast_adapter_dtype=False). Merged and unmerged outputs of a
    layer differ by rounding only: at most gamma_k (|W| + |dW|) |x| + |b| terms, k = in_features + 3 roundings of
    the dtype's unit roundoff u (the products' sum, W + dW rounded, the update's own output, the final addition)."""
    torch.manual_seed(1)
    model = get_peft_model(Net(dtype), config(method), autocast_adapter_dtype=False).eval()
    lin0, x = layer(model), x_in().to(dtype)
    with torch.no_grad():
        base, unmerged = lin0.base_layer(x), lin0(x)
        dW = lin0.get_delta_weight("default").double()
        W = lin0.base_layer.weight.double()
        model.merge_adapter()
        merged = lin0(x)
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    k = lin0.in_features + 3
    gamma = k * u / (1 - k * u)
    bound = gamma * ((W.abs() + dW.abs()) @ x.double().abs().T).T + gamma * lin0.base_layer.bias.double().abs()
    assert ((merged.double() - unmerged.double()).abs() <= bound).all()
    # the adapter moves the output by more than the bound, so a merge that lost it would fail the check above
    assert ((unmerged.double() - base.double()).abs() > bound).any()


@pytest.mark.parametrize("method", METHODS)
def test_safe_merge(method):
    model = peft(method)
    adapted = out(model)
    model.merge_adapter(safe_merge=True)
    close(out(model), adapted)
    model.unmerge_adapter()
    # a broken adapter: both refuse with ValueError and leave the weight as it was
    with torch.no_grad():
        next(p for n, p in layer(model).named_parameters() if "lora_A" in n).fill_(float("inf"))
    weight = layer(model).base_layer.weight.clone()
    with pytest.raises(ValueError):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer(model).base_layer.weight, weight)


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_and_unload(method):
    adapted = out(peft(method))
    merged = peft(method).merge_and_unload()
    assert type(merged.lin0) is nn.Linear and type(merged.layers[1].proj) is nn.Linear
    close(out(merged), adapted)
    unloaded = peft(method).unload()
    assert type(unloaded.lin0) is nn.Linear
    assert torch.equal(out(unloaded), out(Net()))


@pytest.mark.parametrize("method", METHODS)
def test_disable_set_delete_several_active_and_rows(method):
    model = peft(method)
    torch.manual_seed(3)
    model.add_adapter("b", config(method))
    base = out(Net())
    y = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        y[name] = out(model)
    assert (y["default"] - y["b"]).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(out(model), base)
    # several active adapters: their updates add up (one layer's; the model is nonlinear)
    model.base_model.set_adapter(["default", "b"])
    x = torch.randn(4, 12, dtype=torch.float64)
    lin0 = layer(model)
    with torch.no_grad():
        both = lin0(x)
        singles = []
        for name in ("default", "b"):
            model.base_model.set_adapter(name)
            singles.append(lin0(x) - lin0.base_layer(x))
    close(both, lin0.base_layer(x) + singles[0] + singles[1])
    # several active adapters merged and unmerged
    model.base_model.set_adapter(["default", "b"])
    model.merge_adapter()
    assert lin0.merged_adapters == ["default", "b"]
    with torch.no_grad():
        close(lin0(x), both)
    model.unmerge_adapter()
    # a mixed batch: one adapter per row
    rows = ["b", "__base__", "default"]
    mixed = out(model, adapter_names=rows)
    for i, name in enumerate(rows):
        close(mixed[i], (y[name] if name != "__base__" else base)[i])
    model.set_adapter("b")
    model.delete_adapter("default")
    assert list(model.peft_config) == ["b"] and adapter_count(model) == 1
    close(out(model), y["b"])


@pytest.mark.parametrize("method", METHODS)
def test_modules_to_save_layers_to_transform_exclude_modules(method, tmp_path):
    model = peft(method, target_modules=["proj"], layers_to_transform=[1], layers_pattern="layers",
                 modules_to_save=["head"])
    inner = model.base_model.model
    assert type(inner.layers[0].proj) is nn.Linear and type(inner.lin0) is nn.Linear
    assert hasattr(inner.layers[1].proj, "lora_A")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("head.modules_to_save.default" in n for n in trainable)
    with torch.no_grad():
        inner.head.modules_to_save["default"].weight.add_(0.5)
    expected = out(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(out(load(method, Net(), tmp_path)), expected)

    excluded = peft(method, exclude_modules=["layers.0.proj"])
    inner = excluded.base_model.model
    assert type(inner.layers[0].proj) is nn.Linear
    assert hasattr(inner.layers[1].proj, "lora_A") and hasattr(inner.lin0, "lora_A")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias(bias, tmp_path):
    trainable = {}
    for method in METHODS:
        model = peft(method, bias=bias)
        trainable[method] = sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
        with torch.no_grad():
            layer(model).base_layer.bias.add_(1.0)
        expected = out(model)
        model.save_pretrained(tmp_path / method)
        assert torch.equal(out(load(method, Net(), tmp_path / method)), expected)
    assert trainable["lora"] and trainable["mora1"] == trainable["mora6"] == trainable["lora"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_load(method, low_cpu_mem_usage, tmp_path):
    model = peft(method)
    expected = out(model)
    model.save_pretrained(tmp_path)
    loaded = load(method, Net(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert torch.equal(out(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
    # a second adapter from the same folder, on the same model
    if method == "lora":
        loaded.load_adapter(tmp_path, "second", low_cpu_mem_usage=low_cpu_mem_usage)
    else:
        mkp.load_adapter(loaded, tmp_path, "second", low_cpu_mem_usage=low_cpu_mem_usage)
    loaded.set_adapter("second")
    assert torch.equal(out(loaded), expected)


@pytest.mark.parametrize("method", ["mora1", "mora6"])
def test_low_cpu_mem_usage_bfloat16(method, tmp_path):
    """On a bfloat16 base a low_cpu_mem_usage load gives M bit for bit as the normal load, for either autocast.
    (PEFT 0.21 rounds LoRA's float32 A and B through bfloat16 on this path, before lifting them back.)"""
    model = get_peft_model(Net(torch.bfloat16), config(method))
    with torch.no_grad():
        layer(model).lora_A["default"].weight.add_(1e-3 * torch.pi)  # not representable in bfloat16
    model.save_pretrained(tmp_path)
    for autocast in (True, False):
        normal, low = (load(method, Net(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast,
                            low_cpu_mem_usage=low_cpu) for low_cpu in (False, True))
        a, b = (layer(m).lora_A["default"].weight for m in (normal, low))
        assert a.dtype == b.dtype == (torch.float32 if autocast else torch.bfloat16) and torch.equal(a, b)
        assert torch.equal(out(normal, x_in().bfloat16()), out(low, x_in().bfloat16()))


@pytest.mark.parametrize("method", METHODS)
def test_low_cpu_mem_usage_creates_on_meta(method):
    model = get_peft_model(Net(), config(method), low_cpu_mem_usage=True)
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora_params and all(p.is_meta for p in lora_params)
    assert not layer(model).base_layer.weight.is_meta


@pytest.mark.parametrize("method", METHODS)
def test_rank_pattern(method):
    model = peft(method, rank_pattern={"lin0": 4})
    model.add_adapter("b", config(method, rank_pattern={"proj": 3}))
    shapes = {
        (name, adapter): tuple(layer(model, name).lora_A[adapter].weight.shape)
        for name in ("lin0", "layers.0.proj") for adapter in ("default", "b")
    }
    if method == "lora":
        expected = {("lin0", "default"): 4, ("lin0", "b"): 2, ("layers.0.proj", "default"): 2,
                    ("layers.0.proj", "b"): 3}
        assert {k: v[0] for k, v in shapes.items()} == expected
    else:
        t = int(method[-1])
        expected = {("lin0", "default"): r_hat(12, 16, 4, t), ("lin0", "b"): r_hat(12, 16, 2, t),
                    ("layers.0.proj", "default"): r_hat(16, 16, 2, t), ("layers.0.proj", "b"): r_hat(16, 16, 3, t)}
        assert {k: v[0] for k, v in shapes.items()} == expected
    assert layer(model).r == {"default": 4, "b": 2}


@pytest.mark.parametrize("method", METHODS)
def test_dtype_autocast(method, tmp_path):
    for autocast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        model = get_peft_model(Net(torch.bfloat16), config(method), autocast_adapter_dtype=autocast)
        dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
        assert dtypes == {dtype}, (autocast, dtypes)
        assert out(model, x_in().bfloat16()).dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    for autocast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        loaded = load(method, Net(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast)
        assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == {dtype}
    # float64 base: LoRA's A and B follow it; MoRA's M stays float32 (the original release's dtype and checkpoint
    # format), and the forward still computes in float64, so merged and unmerged outputs agree to float64 rounding
    # (test_adapter_changes_output_and_merge_unmerge).
    dtypes = {p.dtype for n, p in peft(method).named_parameters() if "lora_" in n}
    assert dtypes == {torch.float64 if method == "lora" else torch.float32}


def test_dtype_follows_lora_elsewhere():
    """PeftMixedModel and inject_adapter_in_model leave some adapters in the base's bfloat16: M follows LoRA."""
    from peft import inject_adapter_in_model

    def dtypes(method):
        mixed = PeftMixedModel(Net(torch.bfloat16), config(method, target_modules=["lin0"]))
        mixed.add_adapter("b", config(method, target_modules=["proj"]))
        injected = inject_adapter_in_model(config(method), Net(torch.bfloat16))
        return [{(n.split(".lora_")[0], p.dtype) for n, p in model.named_parameters() if "lora_" in n}
                for model in (mixed, injected)]

    lora = dtypes("lora")
    assert {dtype for _, dtype in lora[0]} == {torch.bfloat16, torch.float32}  # not a vacuous comparison
    assert dtypes("mora6") == lora


def two_adapters(method, **kwargs):
    """"default" and "b", both random; b's scaling is 0.5 (LoRA: lora_alpha 1 / r 2), default's 1 (LoRA: 4)."""
    model = peft(method, **kwargs)
    torch.manual_seed(3)
    half = {"lora_alpha": 1} if method == "lora" else {"mora_scaling": 0.5}
    model.add_adapter("b", config(method, **kwargs, **half))
    return model


@pytest.mark.parametrize("method", METHODS)
def test_add_weighted_adapter(method):
    model = two_adapters(method)
    lin0, x = layer(model), torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        delta = {}
        for name in ("default", "b"):
            model.base_model.set_adapter(name)
            delta[name] = lin0(x) - lin0.base_layer(x)
    weights = [0.7, -1.3]
    # LoRA: "cat" is exact; MoRA: dW is linear in M, so "linear", "cat" and "svd" (the default) are all exact
    for combination in ["cat"] if method == "lora" else ["linear", "cat", "svd"]:
        model.add_weighted_adapter(["default", "b"], weights, combination, combination_type=combination)
        assert not any(p.requires_grad for n, p in model.named_parameters() if f".{combination}." in n)
        model.set_adapter(combination)
        with torch.no_grad():
            _close_combined(lin0, combination, x, delta["default"] * weights[0] + delta["b"] * weights[1])
    if method != "lora":
        # the old corruption: w = -1 on one adapter gave +dW; now -dW, and the next forward runs
        model.add_weighted_adapter(["default"], [-1.0], "minus")
        # one adapter: PEFT merges "linear" whatever the type (for LoRA too), so a pruning type prunes nothing
        model.add_weighted_adapter(["default"], [-1.0], "minus_ties", combination_type="ties", density=0.5)
        for name in ("minus", "minus_ties"):
            model.set_adapter(name)
            with torch.no_grad():
                _close_combined(lin0, name, x, -delta["default"])


@pytest.mark.parametrize("method", METHODS)
def test_add_weighted_adapter_on_different_layers(method, tmp_path):
    """"a" on lin0, "b" on the projs: the combination sits on all of them, each with its own adapter's update."""
    model = get_peft_model(Net(), config(method, target_modules=["lin0"])).eval()
    model.add_adapter("b", config(method, target_modules=["proj"]))
    inputs = {"lin0": x_in(), "layers.1.proj": torch.randn(4, 16, dtype=torch.float64)}
    deltas = {}
    with torch.no_grad():
        for name, adapter in (("lin0", "default"), ("layers.1.proj", "b")):
            model.set_adapter(adapter)
            deltas[name] = layer(model, name)(inputs[name]) - layer(model, name).base_layer(inputs[name])
    model.add_weighted_adapter(["default", "b"], [1.0, -2.0], "ab", combination_type="cat")
    model.set_adapter("ab")
    assert all("ab" in layer(model, name).lora_A for name in ("lin0", "layers.0.proj", "layers.1.proj"))
    with torch.no_grad():
        _close_combined(layer(model), "ab", inputs["lin0"], deltas["lin0"])
        _close_combined(layer(model, "layers.1.proj"), "ab", inputs["layers.1.proj"], -2 * deltas["layers.1.proj"])
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    assert torch.equal(out(load(method, Net(), tmp_path / "ab")), out(model))


def _close_combined(lin0, name, x, expected_delta):
    if not isinstance(lin0, mkp.MoRAPeftLinear):
        close(lin0(x), lin0.base_layer(x) + expected_delta)
        return
    # MoRA: M is float32 on this float64 model (test_dtype_autocast), so the combined M is the float64 sum rounded
    # once, each entry by at most 2^-24 of itself; an output then moves by at most 2^-24 * s * sum_j |M_kj| |c_j|
    # <= 2^-24 * s * R * max|M| * 2 B max|x| (c_j sums at most B inputs; type 6 adds two rotated ones per entry).
    matrix, s = lin0.lora_A[name], lin0.scaling[name]
    bound = 2**-23 * abs(s) * matrix.geo.R * matrix.geo.blocks * matrix.weight.abs().max().item() * x.abs().max()
    torch.testing.assert_close(lin0(x), lin0.base_layer(x) + expected_delta, atol=bound.item(), rtol=0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, set(model.peft_config)


def _unchanged(model, before):
    state, names = _state(model)
    assert names == before[1] and state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


@pytest.mark.parametrize("method", ["mora1", "mora6"])
def test_add_weighted_adapter_refusals_change_nothing(method):
    model = peft(method)
    model.add_adapter("r4", config(method, r=4))
    other_type = "mora6" if method == "mora1" else "mora1"
    model.add_adapter("other_type", config(other_type))
    model.add_adapter("b", config(method))
    before = _state(model)
    ab = ["default", "b"]
    refusals = [
        (["default", "r4"], {}, "one mora_type, r and rank_pattern"),
        (["default", "other_type"], {}, "one mora_type, r and rank_pattern"),
        (ab, {"combination_type": "magnitude_prune_svd", "density": 0.5}, "not supported.*use 'magnitude_prune'"),
        (ab, {"combination_type": "ties_svd", "density": 0.5}, "not supported.*use 'ties'"),
        (ab, {"combination_type": "mean"}, "not supported for MoRA adapters: expected one of"),
        (ab, {"svd_rank": 7}, "svd_rank=7"),
        (ab, {"svd_clamp": 0.9}, "svd_clamp=0.9"),
        # density: PEFT raises a TypeError for None and only warns above 1; DARE divides by it
        (ab, {"combination_type": "ties"}, r"density=None: combination_type='ties' needs .* in \(0, 1\]"),
        (ab, {"combination_type": "dare_linear", "density": 0}, "density=0: "),
        (ab, {"combination_type": "magnitude_prune", "density": 1.5}, "density=1.5: "),
        (ab, {"combination_type": "dare_ties", "density": float("nan")}, "density=nan: "),
        (ab, {"combination_type": "ties", "density": True}, "density=True: "),
        (ab, {"combination_type": "ties", "density": "0.5"}, "density='0.5': "),
        (ab, {"combination_type": "linear", "density": 0.5}, "density=0.5: combination_type='linear' prunes nothing"),
        (ab, {"combination_type": "ties", "density": 0.5, "majority_sign_method": "mean"}, "'total' or 'frequency'"),
        (ab, {"combination_type": "dare_linear", "density": 0.5, "majority_sign_method": "frequency"},
         "majority_sign_method='frequency': combination_type='dare_linear' elects no sign"),
    ]
    for adapters, kwargs, match in refusals:
        with pytest.raises(ValueError, match=match):
            model.add_weighted_adapter(adapters, [1.0, 1.0], "new", **kwargs)
        _unchanged(model, before)
    with pytest.raises(ValueError, match="exists already"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "b")
    with pytest.raises(ValueError, match="weights must be a list of 2"):
        model.add_weighted_adapter(["default", "b"], [1.0], "new")
    with pytest.raises(ValueError, match="weights must be finite"):
        model.add_weighted_adapter(["default", "b"], [1.0, float("nan")], "new")
    _unchanged(model, before)


# With r = 2 every layer of Net is one-to-one for every type (R <= min(in, out): lin0 12 -> 16 has R = 7, types 6/7
# 6; the projs 16 -> 16 R = 8): type 1's R = 7 divides neither 12 nor 16, R = 8 divides 16.
PRUNING = {"ties": {"majority_sign_method": "total"}, "dare_linear": {},
           "dare_ties": {"majority_sign_method": "frequency"}, "magnitude_prune": {}}


@pytest.mark.parametrize("combination", PRUNING)
@pytest.mark.parametrize("method", ["lora", "mora1", "mora2", "mora3", "mora4", "mora6", "mora7"])
def test_add_weighted_adapter_pruning(method, combination, monkeypatch):
    """TIES, DARE and magnitude pruning for LoRA (PEFT's own code) and MoRA (the same PEFT functions on M) on the same
    model: on every layer the combined update equals a float64 reference built from PEFT's merge function alone,
    DARE's masks drawn from the same torch RNG state. MoRA merges every layer (in module order) before anything else
    draws, so the reference starts from the same seed; PEFT's LoRA draws the new A's and B's first, so the state at
    each of its merges (A's, then B's, layer by layer) is recorded and the reference starts each merge from it."""
    model = two_adapters(method)
    weights, options = [0.7, -1.3], {"density": 0.5, **PRUNING[combination]}
    merge, states = getattr(merge_utils, combination), []

    def recorded(*args, **kwargs):
        states.append(torch.get_rng_state())
        return merge(*args, **kwargs)

    monkeypatch.setattr(lora_model, combination, recorded)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model.add_weighted_adapter(["default", "b"], weights, "new", combination_type=combination, **options)
    assert len(states) == (6 if method == "lora" else 0)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        layers = [m for m in model.base_model.model.modules() if isinstance(m, LoraLayer)]
        expected = [_reference_update(lin, merge, weights, options, states) for lin in layers]
    assert len(layers) == 3
    for lin, (update, largest) in zip(layers, expected):
        # the merge prunes: the same weights without it (the exact weighted sum for MoRA) differ by O(1e-1)
        unpruned, _ = _reference_update(lin, merge_utils.task_arithmetic, weights, {}, [None, None])
        assert (update - unpruned).abs().max() > 1e-2
        if not isinstance(lin, mkp.MoRAPeftLinear):
            close(lin.get_delta_weight("new"), update)
            continue
        # M is float32 (test_dtype_autocast): T / s rounded once, each entry by at most 2^-24 of itself, and each
        # entry of dW of a one-to-one layer holds at most two entries of M (types 1/4: a padded column; type 6:
        # cos and sin terms), each times at most 1, so dW moves by at most 2 * 2^-24 * max|T|
        actual = lin.lora_A["new"].delta_weight(lin.scaling["new"], torch.float64)
        torch.testing.assert_close(actual, update, atol=2**-23 * largest, rtol=0)


def _reference_update(lin, merge, weights, options, states):
    """(the update of ["default", "b"] merged by ``merge`` in float64 on layer ``lin``, the largest task entry).

    MoRA: the task tensors are s_i M_i (dW is linear and one-to-one in M), the weights w_i, and the update is dW of the
    result. LoRA (PEFT's semantics): A's and B's merged apart, weights sqrt(|w_i s_i|), the sign on A's, each merge
    from the next RNG state of ``states``."""
    names = ("default", "b")
    if isinstance(lin, mkp.MoRAPeftLinear):
        tasks = [lin.scaling[n] * lin.lora_A[n].weight.detach().double() for n in names]
        merged = merge(tasks, torch.tensor(weights, dtype=torch.float64), **options)
        return reference.delta_weight(merged, lin.lora_A[names[0]].geo), merged.abs().max().item()
    scaled = [w * lin.scaling[n] for n, w in zip(names, weights)]
    factors = []
    # PEFT makes these weights float32 tensors (torch.tensor of floats) even for float64 factors
    for part, ws in ((lin.lora_A, [math.copysign(math.sqrt(abs(w)), w) for w in scaled]),
                     (lin.lora_B, [math.sqrt(abs(w)) for w in scaled])):
        state = states.pop(0)
        if state is not None:
            torch.set_rng_state(state)
        factors.append(merge([part[n].weight.detach() for n in names], torch.tensor(ws, dtype=torch.float32),
                             **options))
    return factors[1] @ factors[0], None


@pytest.mark.parametrize("method", ["mora1", "mora2", "mora6", "mora7"])
def test_add_weighted_adapter_pruning_refused_where_not_one_to_one(method):
    """r = 8 on lin0 (12 -> 16) gives R = 15 (types 1-4) or 14 (6/7) > 12 inputs: different M give one update there,
    so pruning M would not be a merge of the updates. Refused, naming the layer, nothing changed; exact sums work."""
    model = two_adapters(method, rank_pattern={"lin0": 8})
    before = _state(model)
    t = int(method[-1])
    for combination, options in PRUNING.items():
        match = rf"combination_type='{combination}' is refused on layer 'lin0' \(mora_type {t}, in_features=12"
        with pytest.raises(ValueError, match=match):
            model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "new", combination_type=combination,
                                       density=0.5, **options)
        _unchanged(model, before)
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "new", combination_type="linear")
    assert layer(model).lora_A["new"].geo.R > 12


def test_add_weighted_adapter_refuses_lora_with_mora():
    model = get_peft_model(Net(), config("lora", target_modules=["lin0"]))
    model.add_adapter("mora", config("mora1", target_modules=["proj"]))
    before = _state(model)
    with pytest.raises(ValueError, match="mixes MoRA and LoRA"):
        model.add_weighted_adapter(["default", "mora"], [1.0, 1.0], "new", combination_type="cat")
    _unchanged(model, before)


@pytest.mark.parametrize("first, second", [("lora", "mora1"), ("mora6", "lora")])
def test_lora_and_mora_on_one_layer_refused_in_both_orders(first, second):
    # the first adapter on layers.1.proj only: the second reaches layers.0.proj (free) before layers.1.proj
    model = get_peft_model(Net(), config(first, target_modules=["proj"], layers_to_transform=[1],
                                         layers_pattern="layers"))
    before = _state(model)
    held = "LoRA" if first == "lora" else "MoRA"
    with pytest.raises(ValueError, match=f"layer 'layers.1.proj' holds {held} adapters; MoRA and LoRA adapters cannot"):
        model.add_adapter("second", config(second, target_modules=["proj"]))
    _unchanged(model, before)
    assert type(layer(model, "layers.0.proj")) is nn.Linear
    # on other layers the two live side by side (PeftModel and PeftMixedModel)
    model = get_peft_model(Net(), config(first, target_modules=["lin0"]))
    model.add_adapter("second", config(second, target_modules=["proj"]))
    assert type(layer(model, "layers.0.proj")) is not type(layer(model))


def test_peft_mixed_model():
    mixed = PeftMixedModel(Net(), config("lora", target_modules=["lin0"])).eval()
    mixed.add_adapter("mora", config("mora6", target_modules=["proj"]))
    mixed.set_adapter(["default", "mora"])
    lora_only = get_peft_model(Net(), config("lora", target_modules=["lin0"]))
    lora_only.load_state_dict(mixed.state_dict(), strict=False)
    assert isinstance(layer(mixed, "layers.0.proj"), mkp.MoRAPeftLinear)
    adapted = out(mixed)
    assert (adapted - out(lora_only)).abs().max() > 1e-3  # the MoRA adapter acts too
    close(out(mixed.merge_and_unload()), adapted)
    mixed = PeftMixedModel(Net(), config("lora", target_modules=["lin0"]))
    with pytest.raises(ValueError, match="MoRA and LoRA adapters cannot share a layer"):
        mixed.add_adapter("mora", config("mora1", target_modules=["lin0"]))
    with pytest.raises(NotImplementedError):  # PeftMixedModel has no add_weighted_adapter, for LoRA neither
        mixed.add_weighted_adapter(["default"], [1.0], "new")


@pytest.mark.parametrize("value", ["gaussian", "pissa", "pissa_niter_4", "olora", "orthogonal", "lora_ga", "eva",
                                   "loftq", "corda"])
def test_init_lora_weights_options_refused(value):
    with pytest.raises(ValueError, match=f"init_lora_weights={value!r} is not supported with MoRA"):
        mkp.MoRAConfig(r=2, target_modules=["lin0"], init_lora_weights=value)
    LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="gaussian")  # LoRA has them


@pytest.mark.parametrize("field, value", [("use_rslora", True), ("use_qalora", True)])
def test_lora_only_options_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}=.* is not supported with MoRA"):
        mkp.MoRAConfig(r=2, target_modules=["lin0"], **{field: value})


@pytest.mark.parametrize("mora_type", [1, 6])
def test_init_lora_weights_false_is_small_random(mora_type):
    model = peft(f"mora{mora_type}")
    M = layer(model).lora_A["default"].weight
    bound = 1 / (3 * 12) ** 0.5
    assert M.abs().max() <= bound and M.std() > bound / 4
    assert torch.equal(layer(peft(f"mora{mora_type}", init_lora_weights=True)).lora_A["default"].weight,
                       torch.zeros_like(M))


def test_config_from_pretrained_is_mora(tmp_path):
    peft("mora6", rank_pattern={"lin0": 3}).save_pretrained(tmp_path)
    loaded = mkp.MoRAConfig.from_pretrained(tmp_path)
    assert type(loaded) is mkp.MoRAConfig and (loaded.mora_type, loaded.rank_pattern) == (6, {"lin0": 3})
    assert mkp.MoRAConfig.from_pretrained(tmp_path, lora_dropout=0.1).lora_dropout == 0.1
    assert mkp.MoRAConfig.from_pretrained(tmp_path.parent, subfolder=tmp_path.name).mora_type == 6
    with pytest.raises(TypeError, match="unknown argument"):
        mkp.MoRAConfig.from_pretrained(tmp_path, token="x")
    with pytest.raises(ValueError, match="not a MoRA adapter"):
        peft("lora").save_pretrained(tmp_path / "lora")
        mkp.MoRAConfig.from_pretrained(tmp_path / "lora")


def test_differing_lora_a_and_b_refused_on_every_loader(tmp_path):
    peft("mora1").save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    state = load_file(file)
    key = next(k for k in state if k.endswith("lin0.lora_B.weight"))
    state[key] = state[key] + 1
    save_file(state, file)
    with pytest.raises(ValueError, match="lora_A and lora_B differ"):
        mkp.from_pretrained(Net(), tmp_path)
    with pytest.raises(ValueError, match="lora_A and lora_B differ"):
        mkp.load_adapter(peft("mora1"), tmp_path, "second")
    with pytest.raises(ValueError, match="differ; a MoRA checkpoint holds the same M"):
        PeftModel.from_pretrained(Net(), tmp_path, config=mkp.load_config(tmp_path))


def test_peft_from_pretrained(tmp_path):
    """With peft_integration imported, PEFT's own loader reads the saved config as a MoRAConfig and loads exactly;
    so does an explicit config. (Without the import PEFT fails on M's shapes: tests/test_peft_plain_loading.py.)"""
    model = peft("mora6")
    expected = out(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(Net(), tmp_path)
    assert isinstance(loaded.peft_config["default"], mkp.MoRAConfig)
    assert torch.equal(out(loaded), expected)
    again = PeftModel.from_pretrained(Net(), tmp_path, config=mkp.MoRAConfig.from_pretrained(tmp_path))
    assert torch.equal(out(again), expected)


@pytest.mark.parametrize("method", METHODS)
def test_lora_alpha(method):
    """LoRA scales its update by lora_alpha / r; MoRA ignores lora_alpha, as the original release (mora_scaling)."""
    default, doubled = peft(method), peft(method, lora_alpha=16)
    x = x_in()
    with torch.no_grad():
        delta = [layer(model)(x) - layer(model).base_layer(x) for model in (default, doubled)]
    if method == "lora":
        close(delta[1], 2 * delta[0])
    else:
        assert layer(doubled).scaling["default"] == 1.0 and torch.equal(delta[1], delta[0])
        assert layer(peft(method, mora_scaling=0.5)).scaling["default"] == 0.5


def _deltas(model, x=None):
    """Each adapted layer's update on its own input (the layer's output minus its base's), by layer name."""
    x = x_in() if x is None else x
    h = torch.randn(3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs = {"lin0": x, "layers.0.proj": h}
    with torch.no_grad():
        return {name: layer(model, name)(v) - layer(model, name).base_layer(v) for name, v in inputs.items()}


@pytest.mark.parametrize("method", METHODS)
def test_alpha_pattern(method, tmp_path):
    """alpha_pattern scales a matched layer's update by its alpha / lora_alpha relative to the config's (LoRA's
    alpha / r at equal r); the other layers keep theirs. Saved and loaded by every loader."""
    plain, patterned = peft(method), peft(method, alpha_pattern={"lin0": 24})  # lora_alpha 8: lin0 x3
    base, scaled = _deltas(plain), _deltas(patterned)
    close(scaled["lin0"], 3 * base["lin0"])
    assert torch.equal(scaled["layers.0.proj"], base["layers.0.proj"])
    patterned.save_pretrained(tmp_path)
    expected = out(patterned)
    assert not torch.equal(expected, out(plain))
    assert torch.equal(out(load(method, Net(), tmp_path)), expected)
    if method != "lora":
        assert torch.equal(out(PeftModel.from_pretrained(Net(), tmp_path)), expected)  # PEFT's own loader
        own = mk.load_adapter(Net(), tmp_path)  # the package's model-level path reads the pattern too
        with torch.no_grad():
            assert torch.equal(own(x_in()), expected)
        assert own.lin0.scalings["default"] == 3.0 and own.layers[0].proj.scalings["default"] == 1.0
        mk.save_adapter(own, tmp_path / "own")  # per-layer factors written back as an exact alpha_pattern
        again = mk.load_adapter(Net(), tmp_path / "own")
        with torch.no_grad():
            assert torch.equal(again(x_in()), expected)
        assert torch.equal(out(load(method, Net(), tmp_path / "own")), expected)


@pytest.mark.parametrize("name", ["lin0", "layers.0.proj", "layers.10.proj", "model.layers.1.self_attn.q_proj"])
def test_alpha_pattern_keys_match_as_peft(name):
    """The package's own loader finds a layer's alpha as PEFT's get_pattern_key does (first matching key)."""
    from peft.utils.other import get_pattern_key

    from mora_kernels.checkpoint import config_scaling

    pattern = {"q_proj": 2, r"layers\.0\.proj": 3, "proj": 5, r"layers\.1.*": 7}
    config = {"lora_alpha": 1, "alpha_pattern": pattern}
    key = get_pattern_key(pattern.keys(), name)
    assert config_scaling(config, name) == pattern.get(key, 1)


@pytest.mark.parametrize("combination_type", ["linear", "ties"])
def test_alpha_pattern_adapters_combine_exactly(combination_type):
    """A combination of adapters whose layers have their own factors (alpha_pattern): each layer's update is the
    weighted sum of the adapters' updates on that layer (the factors are folded into the combined M)."""
    model = peft("mora6", alpha_pattern={"lin0": 24})
    model.add_adapter("b", config("mora6"))
    density = {"density": 1.0} if combination_type == "ties" else {}
    model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "sum", combination_type=combination_type, **density)
    for name in ("lin0", "layers.0.proj"):
        lin = layer(model, name)
        expected = 0.5 * lin.get_delta_weight("default") + 2.0 * lin.get_delta_weight("b")
        if combination_type == "linear":  # M is float32: rounded once, each dW entry from at most two of M's
            bound = 2**-23 * expected.abs().max().item()
            torch.testing.assert_close(lin.get_delta_weight("sum").double(), expected.double(), atol=bound, rtol=0)
        assert lin.scaling["sum"] == 1.0
    assert model.peft_config["sum"].alpha_pattern == {}


def test_alpha_pattern_checked():
    with pytest.raises(ValueError, match="lora_alpha must not be 0"):
        mkp.MoRAConfig(r=2, target_modules=["lin0"], lora_alpha=0, alpha_pattern={"lin0": 4})
    with pytest.raises(TypeError, match=r"alpha_pattern\['lin0'\] must be a real number"):
        mkp.MoRAConfig(r=2, target_modules=["lin0"], alpha_pattern={"lin0": "4"})


@pytest.mark.parametrize("method", METHODS)
def test_set_scale_and_unscale(method):
    """PEFT's per-layer scale hooks (diffusers' set_adapters weights) start from the adapter's own factor: for MoRA
    mora_scaling (times alpha_pattern's factor), not LoRA's lora_alpha / r."""
    model = peft(method, mora_scaling=0.5) if method != "lora" else peft(method)
    lin0 = layer(model)
    start = lin0.scaling["default"]
    lin0.set_scale("default", 2.0)
    assert lin0.scaling["default"] == 2.0 * start
    lin0.scale_layer(3.0)
    assert lin0.scaling["default"] == 6.0 * start
    lin0.unscale_layer(3.0)
    assert lin0.scaling["default"] == 2.0 * start
    lin0.unscale_layer()
    assert lin0.scaling["default"] == start
    if method != "lora":
        assert start == 0.5


@pytest.mark.parametrize("method", METHODS)
def test_dora(method, tmp_path):
    """use_dora: the magnitude vector in PEFT's place (lora_magnitude_vector), trained with M, merged and unmerged
    exactly, saved and loaded, disabled; LoRA and MoRA alike (MoRA's against its definition: tests/test_dora.py)."""
    trainable = get_peft_model(Net(), config(method, use_dora=True))
    assert {n.split(".")[-3] for n, p in trainable.named_parameters() if p.requires_grad} >= {"lora_magnitude_vector"}
    model = peft(method, use_dora=True)
    with torch.no_grad():
        for module in model.modules():
            if "default" in getattr(module, "lora_magnitude_vector", {}):
                module.lora_magnitude_vector["default"].weight.mul_(1.25)
    expected = out(model)
    assert (expected - out(Net())).abs().max() > 0.01
    model.merge_adapter()
    close(out(model), expected)
    model.unmerge_adapter()
    close(out(model), expected)
    with model.disable_adapter():
        close(out(model), out(Net()))
    model.save_pretrained(tmp_path)
    close(out(load(method, Net(), tmp_path)), expected)
    close(out(model.merge_and_unload()), expected)


@pytest.mark.parametrize("method", METHODS)
def test_embedding_targets(method):
    """LoRA adapts nn.Embedding (and Conv); MoRA adapts nn.Linear only and refuses the rest by name."""
    class Embedded(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)

    if method == "lora":
        get_peft_model(Embedded(), config(method, target_modules=["emb"]))
    else:
        with pytest.raises(TypeError, match="base must be a torch.nn.Linear, got torch.nn.modules.sparse.Embedding"):
            get_peft_model(Embedded(), config(method, target_modules=["emb"]))


def test_config_copies_stay_mora():
    """PEFT copies configs with dataclasses.replace (add_weighted_adapter, ...): the copy is checked again."""
    config = mkp.MoRAConfig(r=2, mora_type=6, target_modules=["lin0"])
    assert type(dataclasses.replace(config, r=4)) is mkp.MoRAConfig
    with pytest.raises(ValueError, match="init_lora_weights"):
        dataclasses.replace(config, init_lora_weights="gaussian")


class Experts(nn.Module):
    """Three experts stored as one ``(E, out, in)`` parameter (row i of the batch goes to expert i mod 3) and a 2-D
    ``(out, in)`` parameter: the layouts PEFT's ``target_parameters`` reads (transformers' MoE experts)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 16, 12) / 4)
        self.proj = nn.Parameter(torch.randn(6, 16) / 4)

    def forward(self, x):
        h = torch.einsum("boi,bi->bo", self.w[torch.arange(x.shape[0]) % 3], x)
        return nn.functional.linear(torch.tanh(h), self.proj)


class ExpertsNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.experts = Experts().double()  # PEFT cannot wrap a parameter of the model's root module

    def forward(self, x):
        return self.experts(x)


@pytest.mark.parametrize("method", METHODS)
def test_target_parameters(method, tmp_path):
    """MoRA: one M per expert on the 3-D parameter, (R, R) on the 2-D one (against its float64 reference in
    tests/test_peft_experts.py); the same features and refusals as PEFT's LoRA."""
    torch.manual_seed(1)
    model = get_peft_model(ExpertsNet(), config(method, target_modules=[],
                                                target_parameters=["experts.w", "experts.proj"])).eval()
    x = x_in(6)
    base, adapted = out(ExpertsNet(), x), out(model, x)
    assert (adapted - base).abs().max() > 1e-3
    experts = model.base_model.model.experts
    if method != "lora":
        shapes = {m.parameter_name: tuple(m.lora_A["default"].weight.shape) for m in model.modules()
                  if isinstance(m, mkp.ParamWrapper)}
        t = int(method[-1])
        assert shapes == {"w": (3, r_hat(12, 16, 2, t), r_hat(12, 16, 2, t)), "proj": (r_hat(16, 6, 2, t),) * 2}
    weight = experts.get_base_layer().w.detach().clone()
    model.merge_adapter()
    close(out(model, x), adapted)
    model.unmerge_adapter()
    close(experts.get_base_layer().w, weight)
    with model.disable_adapter():
        close(out(model, x), base)
    model.save_pretrained(tmp_path)
    assert torch.equal(out(load(method, ExpertsNet(), tmp_path), x), adapted)
    model.add_adapter("other", config(method, target_modules=[], target_parameters=["experts.w", "experts.proj"]))
    model.set_adapter("other")
    assert (out(model, x) - adapted).abs().max() > 1e-3
    model.set_adapter("default")
    model.delete_adapter("other")
    close(out(model, x), adapted)
    with pytest.raises(ValueError, match="mixed adapter batches"):  # one weight serves the whole batch
        out(model, x, adapter_names=["default"] * 6)
    with pytest.raises(ValueError, match="add_weighted_adapter does not support targeting nn.Parameter"):
        model.add_weighted_adapter(["default"], [1.0], "sum")
    close(out(model.merge_and_unload(), x), adapted)
