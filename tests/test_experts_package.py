"""MoRA on mixture-of-experts parameters through the package's own API (``apply_mora(target_parameters=...)``,
``MoRAParameter``): one M per expert, ``W_e + s dW(M_e)``, on the tiny random Qwen3-MoE, gpt-oss and Mixtral models
of tests/test_peft_experts.py, against the same float64 reference (expert weights replaced by ``W_e + s dW(M_e)``,
dW from the unfused reference forward on the identity); its module docstring argues the tolerances. Checkpoints
load across the two paths in both directions, bit for bit.
"""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import mora_kernels as mk
import mora_kernels.peft_integration as mkp
from mora_kernels.layer import MoRAParameter
from tests.test_peft_experts import (
    ATOL,
    EXPERTS,
    PARAMS,
    SCALING,
    config,
    ids,
    reference_delta,
    reference_logits,
    tiny_moe,
)
from tests.test_peft_experts import matrices as peft_matrices

KINDS = ["qwen3_moe", "gpt_oss", "mixtral"]
PARAMS_SHORT = [name.rpartition(".")[2] for name in PARAMS]


def adapted(kind, mora_type=6, adapter_name="default", seed=5, model=None, **kwargs):
    """The tiny model with MoRA on both expert parameters and M random (as PEFT's init_lora_weights=False)."""
    model = tiny_moe(kind)[0] if model is None else model
    mk.apply_mora(model, None, 2, mora_type, target_parameters=PARAMS, scaling=SCALING, adapter_name=adapter_name,
                  **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model):
            M = layer.adapters[adapter_name].weight
            bound = 1 / (3 * layer.in_features) ** 0.5
            M.copy_((torch.rand(M.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
    return model


def layers(model) -> list[MoRAParameter]:
    return [m for m in model.modules() if isinstance(m, MoRAParameter)]


def matrices(model, adapter="default") -> dict[str, torch.Tensor]:
    found = {m.parameter_name: m.adapters[adapter].weight for m in layers(model) if adapter in m.adapters}
    assert sorted(found) == ["down_proj", "gate_up_proj"]
    return found


def experts_of(model):
    module = model.model.layers[0].mlp.experts
    while isinstance(module, MoRAParameter):
        module = module.base_layer
    return module


@pytest.mark.parametrize("mora_type", [1, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_gradients_merge_against_reference(kind, mora_type):
    model = adapted(kind, mora_type)
    Ms = matrices(model)
    assert all(M.shape[0] == EXPERTS and M.dim() == 3 and M.dtype == torch.float32 for M in Ms.values())
    # only the matrices train
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if n.endswith("adapters.default.weight")}
    logits = model(ids()).logits
    leaves = {name: M.detach().double().requires_grad_() for name, M in Ms.items()}
    expected = reference_logits(kind, leaves, mora_type)
    torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)
    assert (logits - tiny_moe(kind)[0](ids()).logits).abs().max() > 1e-3  # the adapters act
    assert not any(hasattr(m, "parametrizations") for m in model.modules())  # removed after the forward

    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (logits * weights).sum().backward()
    (expected * weights).sum().backward()
    for name, M in Ms.items():  # M float32: its float64 gradient rounded once (see test_peft_experts)
        torch.testing.assert_close(M.grad.double(), leaves[name].grad, rtol=2**-24, atol=ATOL)
        routed = leaves[name].grad.abs().sum(dim=(1, 2)) > 0
        assert routed.sum() >= 2 and torch.equal(M.grad.abs().sum(dim=(1, 2)) > 0, routed)
    assert all(p.grad is None for n, p in model.named_parameters() if "adapters" not in n)

    # layer merge: W + s dW rounded once (float64 here), the same logits; unmerge gives W back
    experts = experts_of(model)
    original = {name: getattr(experts, name).detach().clone() for name in Ms}
    for layer in layers(model):
        layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, expected, rtol=0, atol=ATOL)
    for name in Ms:
        delta = reference_delta(Ms[name].detach(), original[name], kind != "gpt_oss", mora_type)
        torch.testing.assert_close(getattr(experts, name), original[name] + delta, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="merged into the base weight"):  # M would get no gradient
        model(ids()).logits.sum().backward()
    for layer in layers(model):
        layer.unmerge()
    for name in Ms:
        torch.testing.assert_close(getattr(experts, name), original[name], rtol=0, atol=1e-15)

    # model merge: the plain experts module back in place, holding W + s dW
    mk.merge(model)
    assert not layers(model) and model.model.layers[0].mlp.experts is experts
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, expected, rtol=0, atol=ATOL)


def test_layout_and_nesting_are_peft_s():
    """The nest of wrappers, the M shapes and the checkpoint keys equal the PEFT path's on the same model."""
    for kind in KINDS:
        ours = adapted(kind)
        peft = get_peft_model(tiny_moe(kind)[0], config(6))
        names = [n for n, m in ours.named_modules() if isinstance(m, MoRAParameter)]
        peft_names = [n.removeprefix("base_model.model.") for n, m in peft.named_modules()
                      if isinstance(m, mkp.ParamWrapper)]
        assert names == peft_names == ["model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer"]
        assert [m.parameter_name for m in layers(ours)] == ["down_proj", "gate_up_proj"]
        for name, M in matrices(ours).items():
            assert M.shape == peft_matrices(peft)[name].shape


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_checkpoints_load_across_paths_bit_exact(kind, tmp_path):
    ours = adapted(kind)
    with torch.no_grad():
        logits = ours(ids()).logits
    mk.save_adapter(ours, tmp_path / "package")
    saved = json.loads((tmp_path / "package" / "adapter_config.json").read_text())
    assert saved["target_modules"] == [] and saved["mora_scaling"] == SCALING
    assert saved["target_parameters"] == [f"model.layers.0.mlp.experts.{p}" for p in ("down_proj", "gate_up_proj")]

    # package -> PEFT (both PEFT loaders): the same M, the same logits bit for bit
    for loader in (mkp.from_pretrained, PeftModel.from_pretrained):
        peft = loader(tiny_moe(kind)[0], tmp_path / "package")
        for name, M in peft_matrices(peft).items():
            assert torch.equal(M, matrices(ours)[name])
        with torch.no_grad():
            assert torch.equal(peft(ids()).logits, logits)

    # PEFT -> package; and the two files hold the same keys and tensors
    peft.save_pretrained(tmp_path / "peft")
    ours_file = load_file(tmp_path / "package" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours_file) == sorted(peft_file) and all(torch.equal(ours_file[k], peft_file[k]) for k in ours_file)
    loaded = mk.load_adapter(tiny_moe(kind)[0], tmp_path / "peft")
    for name, M in matrices(loaded).items():
        assert M.dtype == torch.float32 and torch.equal(M, matrices(ours)[name])
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, logits)
    assert [n for n, m in loaded.named_modules() if isinstance(m, MoRAParameter)] == [
        "model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer"]

    # a second adapter from a checkpoint onto the adapted model joins the existing layers
    mk.load_adapter(loaded, tmp_path / "package", "second")
    assert all(sorted(layer.adapters) == ["default", "second"] for layer in layers(loaded))
    mk.set_adapter(loaded, "second")
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, logits)


def test_peft_checkpoint_with_alpha_pattern_and_a_linear_loads_in_the_package(tmp_path):
    """target_modules beside target_parameters, and a per-parameter factor (PEFT's alpha_pattern on the parameter's
    name): saved by PEFT, loaded here, saved again, loaded by PEFT: the logits match throughout."""
    cfg = mkp.MoRAConfig(r=2, mora_type=6, target_modules=["q_proj"], target_parameters=PARAMS,
                         init_lora_weights=False, mora_scaling=SCALING, lora_alpha=8, alpha_pattern={"down_proj": 16})
    peft = get_peft_model(tiny_moe("mixtral")[0], cfg)
    with torch.no_grad():
        logits = peft(ids()).logits
    peft.save_pretrained(tmp_path / "peft")
    loaded = mk.load_adapter(tiny_moe("mixtral")[0], tmp_path / "peft")
    assert {layer.parameter_name: layer.scalings["default"] for layer in layers(loaded)} == {
        "down_proj": 2 * SCALING, "gate_up_proj": SCALING}
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, mk.MoRALinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, logits)
    mk.save_adapter(loaded, tmp_path / "package")
    again = PeftModel.from_pretrained(tiny_moe("mixtral")[0], tmp_path / "package")
    with torch.no_grad():
        assert torch.equal(again(ids()).logits, logits)


def test_set_delete_disable_and_one_adapter_per_batch():
    model = adapted("mixtral", 1)
    adapted("mixtral", 6, adapter_name="other", seed=6, model=model)
    assert all(layer.active_adapters == ["default"] and not layer.adapters["other"].weight.requires_grad
               for layer in layers(model))
    base = tiny_moe("mixtral")[0](ids()).logits
    with torch.no_grad():
        first = model(ids()).logits
        mk.set_adapter(model, "other")
        other = model(ids()).logits
        with mk.disable_adapters(model):
            assert torch.equal(model(ids()).logits, base)
        assert torch.equal(model(ids()).logits, other)
    expected = reference_logits("mixtral", {k: v.detach().double() for k, v in matrices(model, "other").items()}, 6)
    torch.testing.assert_close(other, expected, rtol=0, atol=ATOL)
    assert (first - other).abs().max() > 1e-3

    # adapter_per_row: the fused nest serves any selection, each sequence as if alone (the two adapters differ in
    # type, so they are two mora_mixed terms per parameter, each skipping the other's rows)
    with torch.no_grad():
        with mk.adapter_per_row(model, ["default", "default"]):
            assert torch.equal(model(ids()).logits, first)
        with mk.adapter_per_row(model, ["__base__", "__base__"]):
            assert torch.equal(model(ids()).logits, base)
        for names, rows in ((["default", "other"], (first, other)), (["default", "__base__"], (first, base)),
                            (["__base__", "other"], (base, other))):
            with mk.adapter_per_row(model, names):
                mixed = model(ids()).logits
            for row, alone in enumerate(rows):
                torch.testing.assert_close(mixed[row], alone[row], rtol=0, atol=ATOL)
    # parametrized (fuse off): one weight serves the whole batch, so only one adapter for every row is exact
    for layer in layers(model):
        layer.fuse = False
    with torch.no_grad():
        with mk.adapter_per_row(model, ["default", "default"]):
            assert torch.equal(model(ids()).logits, first)
    with pytest.raises(ValueError, match="one weight serves the whole batch"):
        with mk.adapter_per_row(model, ["default", "other"]):
            pass
    with pytest.raises(ValueError, match="one weight serves the whole batch"):
        with mk.adapter_per_row(model, ["default", "__base__"]):
            pass
    for layer in layers(model):
        layer.fuse = True

    # merged: disabling unmerges, leaving merges again (the same bits), deleting is refused
    for layer in layers(model):
        layer.merge()
    merged = {name: getattr(experts_of(model), name).detach().clone() for name in PARAMS_SHORT}
    with torch.no_grad():
        with mk.disable_adapters(model):
            assert torch.equal(model(ids()).logits, base)
        torch.testing.assert_close(model(ids()).logits, other, rtol=0, atol=ATOL)
    assert all(layer.merged_adapters == ["other"] for layer in layers(model))
    assert all(torch.equal(getattr(experts_of(model), name), merged[name]) for name in PARAMS_SHORT)
    with pytest.raises(ValueError, match="is merged"):
        mk.delete_adapter(model, "other")
    mk.set_adapter(model, "default")  # leaving a merged adapter unmerges it
    assert not any(layer.merged_adapters for layer in layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, first, rtol=0, atol=ATOL)
    mk.set_adapter(model, "other")

    mk.delete_adapter(model, "default")
    assert all(list(layer.adapters) == ["other"] for layer in layers(model))
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, other)
    with pytest.raises(ValueError, match="only adapter"):
        mk.delete_adapter(model, "other")


def test_bad_input_is_refused_before_the_model_changes():
    model = tiny_moe("qwen3_moe")[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (dict(target_parameters=["mlp.experts.nothing"]), ValueError, "matched no parameter"),
        (dict(target_parameters="mlp.experts.down_proj"), TypeError, "list of parameter names"),
        (dict(target_parameters=["down_proj", ""]), ValueError, r"'<module>.<parameter>'"),
        (dict(target_parameters=PARAMS, dropout=0.1), ValueError, "dropout=0.1 is refused on parameters"),
        (dict(target_parameters=PARAMS, use_dora=True), ValueError, "use_dora is refused on parameters"),
        (dict(target_parameters=["input_layernorm.weight"]), ValueError, "expected a 2-D .* or 3-D"),
        (dict(target_parameters=PARAMS, r=0), ValueError, "r must be"),
    ]
    for kwargs, error, match in cases:
        r = kwargs.pop("r", 2)
        with pytest.raises(error, match=match):
            mk.apply_mora(model, None, r, target_parameters=kwargs.pop("target_parameters"), **kwargs)
    with pytest.raises(ValueError, match="name the modules to adapt"):
        mk.apply_mora(model, None, 2)
    with pytest.raises(ValueError, match="nothing.*matched no nn.Linear"):  # a target that matches nothing is refused
        mk.apply_mora(model, ["nothing"], 2, target_parameters=PARAMS)
    with pytest.raises(ValueError, match="both name modules"):
        mk.apply_mora(model, ["q_proj"], 2, target_parameters=["self_attn.q_proj.weight"])
    assert not layers(model) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    mk.apply_mora(model, ["q_proj"], 2)
    with pytest.raises(ValueError, match="belong to a MoRA layer's base Linear"):
        mk.apply_mora(model, None, 2, target_parameters=["self_attn.q_proj.weight"], adapter_name="b")
    with pytest.raises(ValueError, match="parameters of the model itself"):
        mk.apply_mora(torch.nn.Linear(2, 2), None, 2, target_parameters=["weight"])
    adapted("qwen3_moe", model=model)
    with pytest.raises(ValueError, match="already exists"):
        mk.apply_mora(model, None, 2, target_parameters=PARAMS)


def test_an_integer_parameter_is_refused():
    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.codes = torch.nn.Parameter(torch.zeros(2, 4, 4, dtype=torch.int8), requires_grad=False)

        def forward(self, x):
            return x

    model = torch.nn.Sequential(Module())
    with pytest.raises(TypeError, match="0.codes: expected a floating-point parameter"):
        mk.apply_mora(model, None, 2, target_parameters=["0.codes"])


def test_a_failure_part_way_leaves_the_model_as_it_was(monkeypatch, tmp_path):
    """apply_mora and load_adapter edit the model inside rollback.atomic: an error after the first layers were
    made (here the second parameter's, as an out-of-memory would) puts back the modules, M and every flag."""
    model = adapted("qwen3_moe")
    mk.save_adapter(model, tmp_path)
    model = tiny_moe("qwen3_moe")[0]
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    made = []
    wrap = mk.adapters._wrap_parameter

    def fails_second(*args, **kwargs):
        if made:
            raise RuntimeError("out of memory (simulated)")
        made.append(wrap(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(mk.adapters, "_wrap_parameter", fails_second)
    for edit in (lambda: mk.apply_mora(model, ["q_proj"], 2, target_parameters=PARAMS),
                 lambda: mk.load_adapter(model, tmp_path)):
        made.clear()
        with pytest.raises(RuntimeError, match="simulated"):
            edit()
        assert len(made) == 1  # the first parameter had been adapted
        assert dict(model.named_modules()) == modules and not layers(model)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

    # on an adapted model: the failed load of a second adapter leaves the first as it was
    monkeypatch.setattr(mk.adapters, "_wrap_parameter", wrap)
    adapted("qwen3_moe", model=model)
    Ms = {name: M.detach().clone() for name, M in matrices(model).items()}
    modules = dict(model.named_modules())
    monkeypatch.setattr(mk.adapters, "_wrap_parameter", fails_second)
    made.clear()
    with pytest.raises(RuntimeError, match="simulated"):
        mk.load_adapter(model, tmp_path, "second")
    assert dict(model.named_modules()) == modules
    assert all(list(layer.adapters) == ["default"] for layer in layers(model))
    assert all(torch.equal(M, Ms[name]) and M.requires_grad for name, M in matrices(model).items())


def test_refused_checkpoints_leave_the_model_as_it_was(tmp_path):
    mk.save_adapter(adapted("qwen3_moe"), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    good = load_file(weights)
    file = tmp_path / "adapter_config.json"
    saved = json.loads(file.read_text())
    from safetensors.torch import save_file

    broken = [
        ({**saved, "r": 4}, good, "expected shape"),  # M's saved shapes are those of r=2
        (saved, {k: v for k, v in good.items() if ".base_layer." not in k}, "has no M for it"),
        ({**saved, "use_dora": True}, good, "target_parameters with use_dora"),
        ({**saved, "target_parameters": "down_proj"}, good, "target_parameters must be a list"),
        (saved, {k: v[:2] for k, v in good.items()}, r"expected shape \(4, "),  # experts missing
    ]
    for config_fields, tensors, match in broken:
        file.write_text(json.dumps(config_fields))
        save_file(tensors, weights)
        model = tiny_moe("qwen3_moe")[0]
        modules = dict(model.named_modules())
        with pytest.raises(ValueError, match=match):
            mk.load_adapter(model, tmp_path)
        assert dict(model.named_modules()) == modules


def test_bfloat16_merge_rounds_once_and_safe_merge():
    """A bfloat16 model, M float32: the merge computes W + s dW in float32 and rounds it once, within u = 2**-8 of
    the exact float64 sum plus float32's rounding of s dW (~1e-7 relative, bounded by 1e-5 here)."""
    base, out_first = tiny_moe("qwen3_moe")
    model = adapted("qwen3_moe", model=base.to(torch.bfloat16))
    logits = model(ids()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(M.grad is not None and M.grad.dtype == torch.float32 for M in matrices(model).values())
    experts = experts_of(model)
    original = {name: getattr(experts, name).detach().clone() for name in matrices(model)}
    for layer in layers(model):
        layer.merge()
    for name, M in matrices(model).items():
        exact = original[name].double() + reference_delta(M.detach(), original[name], out_first, 6)
        merged = getattr(experts, name)
        assert merged.dtype == torch.bfloat16
        assert ((merged.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-5).all()
        assert not torch.equal(merged, original[name])
    for layer in layers(model):
        layer.unmerge()
    layer = layers(model)[0]
    with torch.no_grad():
        layer.adapters["default"].weight[0, 0, 0] = float("inf")
    before = layer.parameter().detach().clone()
    with pytest.raises(ValueError, match="non-finite; not merged"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.parameter(), before) and not layer.merged


def test_remora_and_export_refuse_parameter_layers(tmp_path):
    from mora_kernels import remora

    model = adapted("qwen3_moe")
    Ms = {name: M.detach().clone() for name, M in matrices(model).items()}
    with pytest.raises(ValueError, match="which ReMoRA does not restart"):
        remora.restart(model)
    with pytest.raises(ValueError, match="adapts target_parameters"):
        mk.export_lora(model, tmp_path / "lora", rank=4)
    assert all(torch.equal(M, Ms[name]) for name, M in matrices(model).items())


def test_a_two_dimensional_parameter_gets_one_matrix():
    """A 2-D ``(out, in)`` parameter that its module reads itself: one ``(R, R)`` M, the module computing
    ``x (W + s dW(M))^T``; float64 throughout, so to a few roundings (1e-12 on O(1) outputs)."""
    from mora_kernels import reference
    from mora_kernels.core import Geometry, MoRAType

    class Reads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 12, dtype=torch.float64))

        def forward(self, x):
            return x @ self.w.T

    torch.manual_seed(0)
    model = torch.nn.Sequential(Reads())
    W = model[0].w.detach().clone()
    mk.apply_mora(model, None, 2, 1, target_parameters=["0.w"], scaling=SCALING, dtype=torch.float64)
    (layer,) = layers(model)
    M = layer.adapters["default"].weight
    assert layer.experts is None and M.shape == (mk.r_hat(12, 16, 2, 1),) * 2
    with torch.no_grad():
        M.normal_(0, 0.1)
    x = torch.randn(5, 12, dtype=torch.float64)
    delta = reference.forward(torch.eye(12, dtype=torch.float64), M.detach(), Geometry(12, 16, M.shape[0],
                                                                                       MoRAType(1))).T * SCALING
    out = model(x)
    torch.testing.assert_close(out, x @ (W + delta).T, rtol=0, atol=1e-12)
    out.sum().backward()
    assert M.grad is not None and M.grad.abs().sum() > 0 and model[0].base_layer.w.grad is None


@pytest.mark.slow
def test_torch_compile_matches_eager_with_a_graph_break_at_each_parameter_layer():
    """torch.compile over a model with a MoRAParameter: forward and backward compile and match eager, but not as one
    graph. The layer's forward registers a weight parametrization (``layer.parameter_update``), and torch's
    registration calls ``Tensor.set_`` on the parameter, which dynamo cannot trace (an in-place metadata change of a
    graph input): each such layer is a graph break, so ``fullgraph=True`` raises (docs/usage.md says so). float32:
    the compiled graphs may reorder the sums (1e-5 relative, as tests/test_compile.py)."""

    class Experts(torch.nn.Module):  # a batched matmul over experts, no data-dependent routing of its own
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 20, 12) / 4)

        def forward(self, x):
            return torch.bmm(x, self.weight.transpose(1, 2))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), Experts())
    mk.apply_mora(model, None, 2, 6, target_parameters=["1.weight"], scaling=SCALING)
    (layer,) = layers(model)
    M = layer.adapters["default"].weight
    with torch.no_grad():
        M.normal_(0, 0.1)
    x = torch.randn(3, 5, 12)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"weight'\]\.set_"):
        torch.compile(model, fullgraph=True)(x)
    torch._dynamo.reset()
    out = torch.compile(model)(x)
    out.square().sum().backward()
    grad, M.grad = M.grad.clone(), None
    eager = model(x)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, M.grad, rtol=1e-5, atol=1e-6)
    assert grad.abs().sum() > 0 and not hasattr(model[1].base_layer, "parametrizations")  # removed after the forward
