"""PEFT's ``rank_pattern`` (another r for single layers) on the package's own path: ``apply_mora(rank_pattern=...)``,
``save_adapter`` writing it, ``load_adapter`` reading it, on Linears and on parameters (``target_parameters``), and
the round trips with PEFT in both directions.

Tolerances: the models are float64 and every path computes the update with the reference backend in float64 from
the same float64 (or exactly upcast float32) M, so the logits of two paths differ at most by the summation order of
a few float64 sums: ~1e-15 on logits of size ~1. 1e-12 leaves margin; a wrong r (another R, other maps) or a float32
computation (~1e-7) would exceed it by far. Where the same layers run the same operations the logits are compared
bit for bit.
"""

import json

import pytest
import torch
from torch import nn

import mora_kernels as mk
from mora_kernels.checkpoint import exact_pattern, pattern_value
from mora_kernels.core import r_hat
from mora_kernels.layer import MoRAParameter

pytest.importorskip("peft")

from peft import PeftModel, get_peft_model  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

import mora_kernels.peft_integration as mkp  # noqa: E402

from .hf_helpers import tiny_llama  # noqa: E402
from .test_peft_experts import PARAMS, SCALING, ids, tiny_moe  # noqa: E402

ATOL = 1e-12  # see the module docstring
TOKENS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(4))
TARGETS = ["q_proj", "v_proj"]
PATTERN = {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 8}  # r=4 elsewhere: layer 0's q_proj


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def ranks(model) -> dict[str, int]:
    return {name: layer.adapters["default"].r for name, layer in mk.adapters.mora_layers(model)}


def randomize(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in mk.adapters.mora_layers(model):
            M = layer.adapters["default"].weight
            M.copy_(torch.randn(M.shape, generator=g, dtype=torch.float64) / M.shape[-1])
    return model


def expected_ranks(prefix=""):
    return {f"{prefix}model.layers.0.self_attn.q_proj": 4, f"{prefix}model.layers.1.self_attn.q_proj": 8,
            f"{prefix}model.layers.0.self_attn.v_proj": 2, f"{prefix}model.layers.1.self_attn.v_proj": 2}


@pytest.mark.parametrize("pattern", [
    {"q_proj": 1}, {"proj": 1}, {r".*\.0\.self_attn\.q_proj": 1, "q_proj": 2},
    {"q_proj": 2, r"0\.self_attn\.q_proj": 1},
    {r"layers\.\d\.self_attn\.(q|v)_proj": 3}, {"self_attn": 1}, {"q": 1}, {"": 1}, {r"^model\.layers\.0.*": 5},
])
@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "q_proj",
                                  "model.layers.0.mlp.experts.down_proj"])
def test_pattern_rule_is_peft_s(pattern, name):
    """pattern_value decides as PEFT's LoraModel does with get_pattern_key (which the package cannot import: peft is
    optional)."""
    assert pattern_value(pattern, name, 4) == pattern.get(get_pattern_key(pattern.keys(), name), 4)


def test_exact_pattern_gives_every_name_its_own_value():
    values = {"a.b": 1, "c.a.b": 2, "x.c.a.b": 3, "b": 4, "a+b.c": 5}  # dot suffixes of each other, a regex character
    pattern = exact_pattern(values)
    assert all(pattern_value(pattern, name, None) == value for name, value in values.items())


def test_apply_mora_rank_pattern():
    model = mk.apply_mora(tiny_llama(dtype=torch.float64), TARGETS, r=4, mora_type=6, rank_pattern=PATTERN)
    assert ranks(model) == expected_ranks()
    layer = model.model.layers[1].self_attn.q_proj
    assert layer.R == r_hat(64, 64, 8, 6) and layer.adapters["default"].weight.shape == (layer.R, layer.R)
    # no rank_pattern, or an empty one: r everywhere (existing calls unchanged)
    plain = mk.apply_mora(tiny_llama(), TARGETS, r=4, rank_pattern={})
    assert set(ranks(plain).values()) == {4}
    with pytest.warns(RuntimeWarning, match=r"rank_pattern: keys \['k_proj'\] match no adapted layer"):
        mk.apply_mora(tiny_llama(), TARGETS, r=4, rank_pattern={"k_proj": 2, "v_proj": 2})


@pytest.mark.parametrize("pattern,error,message", [
    (["v_proj", 2], TypeError, "rank_pattern must be a dict of module-name patterns to ranks r"),
    ({"v_proj": 0}, ValueError, r"rank_pattern\['v_proj'\] must be >= 1, got 0"),
    ({"v_proj": 2.0}, TypeError, r"rank_pattern\['v_proj'\] must be a positive int, got 2.0"),
    ({"v_proj": True}, TypeError, r"rank_pattern\['v_proj'\] must be a positive int, got True"),
    ({3: 2}, TypeError, "rank_pattern: keys must be module-name patterns"),
    ({"v_proj(": 2}, ValueError, r"rank_pattern: key 'v_proj\(' is not a regex"),
])
def test_bad_rank_pattern_is_refused_before_any_edit(pattern, error, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        mk.apply_mora(model, TARGETS, r=4, rank_pattern=pattern)
    assert not list(mk.adapters.mora_layers(model)) and model.state_dict().keys() == before.keys()
    with pytest.raises((TypeError, ValueError), match="rank_pattern"):
        mkp.MoRAConfig(r=4, target_modules=TARGETS, rank_pattern=pattern)


def test_package_save_loads_in_the_package_and_in_peft(tmp_path):
    model = randomize(mk.apply_mora(tiny_llama(dtype=torch.float64), TARGETS, r=4, mora_type=6,
                                    rank_pattern=PATTERN))
    expected = logits(model)
    mk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # r: the most common r (2, twice); every layer's r, each under its own escaped full name
    assert config["r"] == 2
    assert config["rank_pattern"] == {name.replace(".", r"\."): r for name, r in expected_ranks().items()}
    assert "alpha_pattern" not in config and "mora_scaling" not in config
    again = mk.load_adapter(tiny_llama(dtype=torch.float64), tmp_path)
    assert ranks(again) == expected_ranks()
    assert torch.equal(logits(again), expected)  # the same layers and operations: bit for bit
    for peft_model in (mkp.from_pretrained(tiny_llama(dtype=torch.float64), tmp_path),
                       PeftModel.from_pretrained(tiny_llama(dtype=torch.float64), tmp_path)):
        shapes = {name: layer.lora_A["default"].weight.shape[0] for name, layer in peft_model.named_modules()
                  if isinstance(layer, mkp.MoRAPeftLinear)}
        assert shapes == {f"base_model.model.{name}": r_hat(64, 64 if "q" in name else 32, r, 6)
                          for name, r in expected_ranks().items()}
        torch.testing.assert_close(logits(peft_model), expected, rtol=0, atol=ATOL)


def test_peft_rank_pattern_folder_loads_in_the_package(tmp_path):
    config = mkp.MoRAConfig(r=4, mora_type=6, target_modules=TARGETS, init_lora_weights=False, rank_pattern=PATTERN)
    peft_model = get_peft_model(tiny_llama(dtype=torch.float64), config)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"] == PATTERN
    loaded = mk.load_adapter(tiny_llama(dtype=torch.float64), tmp_path / "peft")
    assert ranks(loaded) == expected_ranks()
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=ATOL)
    # the package's own PEFT loader checks the folder with the same per-layer r (it used to read r alone)
    torch.testing.assert_close(logits(mkp.from_pretrained(tiny_llama(dtype=torch.float64), tmp_path / "peft")),
                               expected, rtol=0, atol=0)
    # and back: the package's save of it loads in PEFT to the same logits
    mk.save_adapter(loaded, tmp_path / "package")
    back = PeftModel.from_pretrained(tiny_llama(dtype=torch.float64), tmp_path / "package")
    torch.testing.assert_close(logits(back), expected, rtol=0, atol=0)


def test_rank_pattern_on_parameters_round_trips_with_peft(tmp_path):
    """target_parameters: the pattern matches the parameter's full name (PEFT's), beside a Linear's r."""
    model = tiny_moe("mixtral")[0]
    mk.apply_mora(model, ["q_proj"], 2, 6, target_parameters=PARAMS, scaling=SCALING,
                  rank_pattern={"down_proj": 4, "q_proj": 3})
    randomize(model)
    found = {layer.parameter_name: layer.adapters["default"].r for layer in model.modules()
             if isinstance(layer, MoRAParameter)}
    assert found == {"down_proj": 4, "gate_up_proj": 2}
    assert model.model.layers[0].self_attn.q_proj.r == 3
    expected = logits(model, ids())
    mk.save_adapter(model, tmp_path / "package")
    config = json.loads((tmp_path / "package" / "adapter_config.json").read_text())
    assert config["rank_pattern"][r"model\.layers\.0\.mlp\.experts\.down_proj"] == 4
    for loaded in (PeftModel.from_pretrained(tiny_moe("mixtral")[0], tmp_path / "package"),
                   mk.load_adapter(tiny_moe("mixtral")[0], tmp_path / "package")):
        torch.testing.assert_close(logits(loaded, ids()), expected, rtol=0, atol=ATOL)
    # PEFT's own rank_pattern on a parameter, saved by PEFT, loads in the package
    cfg = mkp.MoRAConfig(r=2, mora_type=6, target_modules=[], target_parameters=PARAMS, init_lora_weights=False,
                         mora_scaling=SCALING, rank_pattern={"gate_up_proj": 3})
    peft_model = get_peft_model(tiny_moe("mixtral")[0], cfg)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = mk.load_adapter(tiny_moe("mixtral")[0], tmp_path / "peft")
    assert {layer.parameter_name: layer.adapters["default"].r for layer in loaded.modules()
            if isinstance(layer, MoRAParameter)} == {"down_proj": 2, "gate_up_proj": 3}
    torch.testing.assert_close(logits(loaded, ids()), logits(peft_model, ids()), rtol=0, atol=ATOL)


def test_bad_rank_pattern_in_a_folder_is_refused(tmp_path):
    model = randomize(mk.apply_mora(tiny_llama(), TARGETS, r=4, rank_pattern={"v_proj": 2}))
    mk.save_adapter(model, tmp_path)
    file = tmp_path / "adapter_config.json"
    config = json.loads(file.read_text())
    for bad, message in (({"v_proj": 0}, r"rank_pattern\['v_proj'\] must be >= 1"),
                         ({"v_proj": "2"}, r"rank_pattern\['v_proj'\] must be a positive int"),
                         ([2], "rank_pattern must be a dict of module-name patterns")):
        file.write_text(json.dumps({**config, "rank_pattern": bad}))
        for load in (mk.load_adapter, mkp.from_pretrained):
            with pytest.raises(ValueError, match=f"adapter_config.json: {message}"):
                load(tiny_llama(), tmp_path)
    # a pattern that gives layers another r than their M was saved with (q_proj, saved at r=4, now gets the config's
    # r=2, the smaller of the two as common): the shape error names the key and the r it read
    assert config["r"] == 2
    file.write_text(json.dumps({**config, "rank_pattern": {"v_proj": 2}}))
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight \(r=2, mora_type=1\): expected shape \(16, 16\)"):
        mk.load_adapter(tiny_llama(), tmp_path)


def test_save_still_refuses_what_the_format_cannot_store(tmp_path):
    model = mk.apply_mora(tiny_llama(), ["q_proj"], r=4, mora_type=1)
    mk.apply_mora(model, ["v_proj"], r=2, mora_type=6, adapter_name="other")
    mk.apply_mora(model, ["k_proj"], r=2, mora_type=1, adapter_name="other")
    with pytest.raises(ValueError, match=r"one \(mora_type, dropout, restarts, use_dora\) per adapter"):
        mk.save_adapter(model, tmp_path, "other")
    assert not (tmp_path / "adapter_config.json").exists()


def test_a_layer_too_small_for_its_pattern_r_is_named():
    model = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 40))  # type 6 at r=1: R = 2 floor(round(sqrt(2)) / 2) = 0
    with pytest.raises(ValueError, match="layer '0'"):
        mk.apply_mora(model, ["0", "1"], r=4, mora_type=6, rank_pattern={"0": 1})
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear


def test_layers_of_different_r_export_and_restart(tmp_path):
    """export_lora pads every layer to the largest rank (exact for type 1); a ReMoRA restart keeps each layer's r."""
    from mora_kernels import remora

    model = randomize(mk.apply_mora(tiny_llama(dtype=torch.float64), TARGETS, r=4, mora_type=1,
                                    rank_pattern=PATTERN))
    expected = logits(model)
    report = mk.export_lora(model, tmp_path)
    assert report["exact"] and report["rank"] == r_hat(64, 64, 8, 1)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(dtype=torch.float64), tmp_path)),
                               expected, rtol=0, atol=ATOL)
    remora.restart(model)
    assert ranks(model) == expected_ranks()
