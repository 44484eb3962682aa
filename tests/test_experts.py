"""MoRA fused into transformers' experts modules (``mora_kernels.experts``, through PEFT's ``target_parameters``):
every routed (token, expert) pair gets its expert's ``s D(M_e C(x))`` inside the expert, one ``mora_mixed`` per
parameter, and no weight is parametrized.

Judged against a float64 reference: the module's own eager forward with each expert weight replaced by
``W_e + s dW(M_e)`` (dW from the unfused reference forward on the identity, tests/test_peft_experts.py). float64
runs: the two differ by a few float64 roundings of O(1) sums (~1e-16 relative), so 1e-10 is far above rounding and
far below what an adapter changes (~1e-3). float32 through the Triton kernels (the interpreter on CPU): the project's
low-precision rule, no more than twice the error of plain float32 PyTorch computing the same (the parametrized path
run in float32: W + s dW rounded to float32, then the module's matmuls), both against the float64 reference.
"""

import pytest
import torch
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import mora_kernels as mk
import mora_kernels.peft_integration as mkp
from mora_kernels import experts as fused_experts
from mora_kernels.layer import MoRAParameter

from .helpers import fused_targets
from .test_peft_experts import EXPERTS, PARAMS, SCALING, ids, reference_delta, reference_logits, tiny_moe

ATOL = 1e-10  # float64: see the module docstring
OUT_FIRST = {"qwen3_moe": True, "mixtral": True, "gpt_oss": False}
KINDS = list(OUT_FIRST)


def config(mora_type, params=PARAMS, **kwargs):
    return mkp.MoRAConfig(r=2, mora_type=mora_type, target_modules=[], target_parameters=params,
                          init_lora_weights=False, mora_scaling=SCALING, **kwargs)


def experts_of(model):
    return model.base_model.model.model.layers[0].mlp.experts


def stacks(model, adapter="default"):
    return {m.parameter_name: m.lora_A[adapter].weight for m in model.modules()
            if isinstance(m, mkp.ParamWrapper) and adapter in m.lora_A}


def routing(tokens=10, dtype=torch.float64, seed=5):
    """Hidden states and a top-2 routing over experts 0..2 only: expert 3 receives no token."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, 32, generator=gen, dtype=dtype)
    index = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=gen, dtype=dtype)
    return h, index, weights


class Count(TorchDispatchMode):
    """Counts the custom ops of mora_kernels that run (the fused launches) and any parametrization."""

    def __init__(self):
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("mora_kernels::"):
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_parametrization(monkeypatch):
    """The fused path must be the one taken: registering a parametrization fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a parametrization was registered: the fused path was not taken")

    monkeypatch.setattr(torch.nn.utils.parametrize, "register_parametrization", refuse)


def reference_experts(experts, Ms, mora_type, weights, h, index, top_w, out_first):
    """The module's own eager forward with W + s dW(M) (float64 leaves ``weights`` and ``Ms``)."""
    replaced = dict(weights)
    for name, M in Ms.items():
        replaced[name] = weights[name] + reference_delta(M, weights[name], out_first, mora_type)
    return torch.func.functional_call(experts, replaced, (h, index, top_w))


def adapted_by(path, kind, mora_type):
    """The tiny model with MoRA on both expert parameters, random M, through PEFT or the package's own API; its
    outermost expert layer and the M stacks by parameter name."""
    if path == "peft":
        model = get_peft_model(tiny_moe(kind)[0], config(mora_type))
        return experts_of(model), stacks(model)
    model = mk.apply_mora(tiny_moe(kind)[0], None, 2, mora_type, target_parameters=PARAMS, scaling=SCALING)
    layers = [m for m in model.modules() if isinstance(m, MoRAParameter)]
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in layers:
            M = layer.adapters["default"].weight
            M.copy_((torch.rand(M.shape, generator=g, dtype=torch.float64) * 2 - 1) / (3 * layer.in_features) ** 0.5)
    return model.model.layers[0].mlp.experts, {m.parameter_name: m.adapters["default"].weight for m in layers}


@pytest.mark.parametrize("path", ["peft", "package"])
@pytest.mark.parametrize("mora_type", [1, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_experts_forward_and_every_gradient(kind, mora_type, path, no_parametrization):
    wrapper, Ms = adapted_by(path, kind, mora_type)
    experts = wrapper.get_base_layer()
    assert sorted(Ms) == sorted(name.rpartition(".")[2] for name in PARAMS)
    trained = {name: p for name, p in experts.named_parameters()}  # the base trains too (biases of gpt-oss)
    for p in trained.values():
        p.requires_grad_(True)
    h, index, top_w = routing()
    h.requires_grad_(), top_w.requires_grad_()
    with Count() as count:
        out = wrapper(h, index, top_w)
    assert count.ops == {}  # float64 runs the reference backend (the kernels' counts: the float32 test below)

    leaves = {name: M.detach().double().requires_grad_() for name, M in Ms.items()}
    weights = {name: p.detach().clone().requires_grad_() for name, p in trained.items()}
    h_ref, w_ref = h.detach().clone().requires_grad_(), top_w.detach().clone().requires_grad_()
    expected = reference_experts(experts, leaves, mora_type, weights, h_ref, index, w_ref, OUT_FIRST[kind])
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    assert (out - experts(h, index, top_w)).abs().max() > 1e-3  # the adapters act

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=0, atol=ATOL)
    torch.testing.assert_close(top_w.grad, w_ref.grad, rtol=0, atol=ATOL)
    for name, p in trained.items():
        torch.testing.assert_close(p.grad, weights[name].grad, rtol=0, atol=ATOL)
    for name, M in Ms.items():
        # M is float32: its float64 gradient is rounded once (2**-24 relative)
        torch.testing.assert_close(M.grad.double(), leaves[name].grad, rtol=2**-24, atol=ATOL)
        assert torch.equal(M.grad[3], torch.zeros_like(M.grad[3]))  # expert 3 got no token
        assert (M.grad[:3].abs().sum(dim=(1, 2)) > 0).all()


@pytest.mark.parametrize(("backend", "device"), fused_targets(("triton", "cpu"), ("triton", "cuda")))
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_fused_experts_float32_through_the_mixed_kernel(kind, backend, device, no_parametrization, poison_empty,
                                                       monkeypatch):
    """float32 through the Triton kernels: one mixed launch per parameter forward, one per parameter backward
    (every expert's dM), within twice the error of the float32 parametrization (the module docstring's rule)."""
    model = get_peft_model(tiny_moe(kind)[0].float(), config(6)).to(device)
    wrapper, experts = experts_of(model), experts_of(model).get_base_layer()
    for m in model.modules():
        if isinstance(m, mkp.ParamWrapper):
            m.backend = backend
    Ms = stacks(model)
    h, index, top_w = (t.to(device) for t in routing())
    h32 = h.float().requires_grad_()
    with Count() as count:
        out = wrapper(h32, index, top_w.float())
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(device)
        (out * g).sum().backward()
    assert count.ops == {"mora_kernels::mixed_forward": 2, "mora_kernels::mixed_backward": 2}

    leaves = {name: M.detach().double().requires_grad_() for name, M in Ms.items()}
    weights = {name: p.detach().double() for name, p in experts.named_parameters()}
    h64 = h.detach().requires_grad_()
    expected = reference_experts(experts.double(), leaves, 6, weights, h64, index, top_w, OUT_FIRST[kind])
    (expected * g.double()).sum().backward()
    experts.float()

    # plain float32 PyTorch: the parametrized path (fused off) on the same float32 model
    monkeypatch.undo()  # parametrizations allowed (and torch.empty plain) from here
    for m in model.modules():
        if isinstance(m, mkp.ParamWrapper):
            m.fuse = False
    grads = {name: M.grad.clone() for name, M in Ms.items()}
    for M in Ms.values():
        M.grad = None
    h_plain = h.float().requires_grad_()
    plain = wrapper(h_plain, index, top_w.float())
    (plain * g).sum().backward()

    def err(a, b):
        return (a.double() - b).abs().max().item()

    pairs = [(out, plain, expected), (h32.grad, h_plain.grad, h64.grad)]
    pairs += [(grads[name], Ms[name].grad, leaves[name].grad) for name in Ms]
    for fused, baseline, exact in pairs:
        assert err(fused, exact) <= 2 * err(baseline, exact), (err(fused, exact), err(baseline, exact))
    for name, grad in grads.items():  # expert 3 got no token: the kernel writes zeros, not leftovers (NaN-poisoned)
        assert torch.equal(grad[3], torch.zeros_like(grad[3])) and (grad[:3].abs().sum(dim=(1, 2)) > 0).all()


@pytest.mark.parametrize(("backend", "device"), fused_targets(("triton", "cpu"), ("triton", "cuda")))
def test_package_path_runs_the_mixed_kernel(backend, device, no_parametrization):
    """apply_mora(target_parameters=..., backend=...) reaches the same launches as the PEFT path (one mixed forward
    and one mixed backward per parameter), with the PEFT path's output on the same M, bit for bit."""
    model = mk.apply_mora(tiny_moe("qwen3_moe")[0].float(), None, 2, 6, target_parameters=PARAMS, scaling=SCALING,
                          backend=backend).to(device)
    peft_model = get_peft_model(tiny_moe("qwen3_moe")[0].float(), config(6)).to(device)
    for m in peft_model.modules():
        if isinstance(m, mkp.ParamWrapper):
            m.backend = backend
    layers = {m.parameter_name: m for m in model.modules() if isinstance(m, MoRAParameter)}
    with torch.no_grad():
        for name, M in stacks(peft_model).items():
            layers[name].adapters["default"].weight.copy_(M)
    h, index, top_w = (t.to(device) for t in routing())
    h32 = h.float().requires_grad_()
    with Count() as count:
        out = model.model.layers[0].mlp.experts(h32, index, top_w.float())
        out.sum().backward()
    assert count.ops == {"mora_kernels::mixed_forward": 2, "mora_kernels::mixed_backward": 2}
    with torch.no_grad():
        expected = experts_of(peft_model)(h.float(), index, top_w.float())
    assert (out - experts_of(peft_model).get_base_layer()(h.float(), index, top_w.float())).abs().max() > 1e-3
    assert torch.equal(out.detach(), expected)  # the same kernels on the same M and routing, in the same order


def test_fused_experts_one_parameter_several_adapters_merge_disable(no_parametrization):
    """One wrapper alone (down_proj), then two nested ones with two active adapters (their terms summed); merged
    adapters add nothing in the forward (the weights hold them), disabled ones nothing at all."""
    single = get_peft_model(tiny_moe("mixtral")[0], config(1, ["mlp.experts.down_proj"]))
    expected = reference_logits("mixtral", {k: v.detach() for k, v in stacks(single).items()}, 1)
    torch.testing.assert_close(single(ids()).logits, expected, rtol=0, atol=ATOL)

    model = get_peft_model(tiny_moe("mixtral")[0], config(1))
    model.add_adapter("other", config(6))
    model.base_model.set_adapter(["default", "other"])
    both = {name: M.detach() for name, M in stacks(model).items()}
    base, out_first = tiny_moe("mixtral")
    experts = base.model.layers[0].mlp.experts
    weights = {f"model.layers.0.mlp.experts.{name}": getattr(experts, name).detach()
               + reference_delta(both[name], getattr(experts, name), out_first, 1)
               + reference_delta(stacks(model, "other")[name].detach(), getattr(experts, name), out_first, 6)
               for name in both}
    expected = torch.func.functional_call(base, weights, (ids(),)).logits
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, expected, rtol=0, atol=ATOL)
        model.merge_adapter(["default", "other"])
        assert all(m.merged for m in model.modules() if isinstance(m, mkp.ParamWrapper))
        torch.testing.assert_close(model(ids()).logits, expected, rtol=0, atol=ATOL)
        with model.disable_adapter():  # unmerges, then the base alone
            assert torch.equal(model(ids()).logits, tiny_moe("mixtral")[0](ids()).logits)


@pytest.mark.parametrize(("kind", "other_type"), [("qwen3_moe", 6), ("gpt_oss", 6), ("mixtral", 1)])
def test_fused_experts_adapter_per_sequence(kind, other_type, no_parametrization, monkeypatch):
    """adapter_names: each sequence its adapter (or the base); one mora_mixed per parameter and group of adapters of
    one geometry (a E + e indexes the stack of both adapters' experts): 2 calls for one geometry, 4 for two types."""
    model = get_peft_model(tiny_moe(kind)[0], config(6)).eval()
    model.add_adapter("other", config(other_type))
    tokens = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(3))
    calls = []
    real = fused_experts.ops.apply_mixed
    monkeypatch.setattr(fused_experts.ops, "apply_mixed", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    with torch.no_grad():
        mixed = model(tokens, adapter_names=["other", "__base__", "default"]).logits
    assert len(calls) == (2 if other_type == 6 else 4)
    assert all(shape[0] == (2 * EXPERTS if other_type == 6 else EXPERTS) for shape in calls)
    types = {"other": other_type, "default": 6}
    for row, adapter in enumerate(["other", None, "default"]):
        Ms = {} if adapter is None else {k: v.detach() for k, v in stacks(model, adapter).items()}
        base, out_first = tiny_moe(kind)
        experts = base.model.layers[0].mlp.experts
        weights = {f"model.layers.0.mlp.experts.{name}": getattr(experts, name).detach()
                   + reference_delta(M, getattr(experts, name), out_first, types[adapter]) for name, M in Ms.items()}
        expected = torch.func.functional_call(base, weights, (tokens[row: row + 1],)).logits
        torch.testing.assert_close(mixed[row: row + 1], expected, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="do not divide"):
        experts_of(model)(*routing(tokens=5), adapter_names=["default", "other"])


def test_unsupported_modules_fall_back_to_the_parametrization(monkeypatch):
    """A forward hook on the experts (accelerate's offloading uses them), ``fuse = False`` or a targeted bias: the
    wrappers concerned parametrize their weight (exact, tests/test_peft_experts.py), those inside them run fused on
    the parametrized weights, and adapter_names is refused by the parametrization as PEFT refuses it."""
    model = get_peft_model(tiny_moe("qwen3_moe")[0], config(1))
    experts = experts_of(model).get_base_layer()
    experts.register_forward_pre_hook(lambda module, args: None)
    assert "forward hooks" in fused_experts.unsupported(experts, ["gate_up_proj"])
    registered = []
    real = torch.nn.utils.parametrize.register_parametrization
    monkeypatch.setattr(torch.nn.utils.parametrize, "register_parametrization",
                        lambda module, name, *a, **k: registered.append(name) or real(module, name, *a, **k))
    expected = reference_logits("qwen3_moe", {k: v.detach() for k, v in stacks(model).items()}, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, expected, rtol=0, atol=ATOL)
    assert sorted(registered) == ["down_proj", "gate_up_proj"]
    with pytest.raises(ValueError, match="mixed adapter batches"):
        model.eval()(ids(), adapter_names=["default", "__base__"])

    # fuse=False on the outer wrapper only: it parametrizes its weight, and the inner one runs fused on top of it
    model = get_peft_model(tiny_moe("qwen3_moe")[0], config(1))
    outer = experts_of(model)
    outer.fuse = False
    registered.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, expected, rtol=0, atol=ATOL)
    assert registered == [outer.parameter_name] and outer.base_layer._fused_chain() == [outer.base_layer]

    gpt = get_peft_model(tiny_moe("gpt_oss")[0], config(1, [*PARAMS, "mlp.experts.down_proj_bias"]))
    wrapper = experts_of(gpt)
    assert wrapper._fused_chain() is None
    assert "not the expert projections" in fused_experts.unsupported(wrapper.get_base_layer(), ["down_proj_bias"])
    registered.clear()
    with torch.no_grad():
        logits = gpt(ids()).logits
        assert registered == ["down_proj_bias"]  # the outer wrapper's; the two inside it run fused
        for m in gpt.modules():
            if isinstance(m, mkp.ParamWrapper):
                m.fuse = False
        registered.clear()
        torch.testing.assert_close(logits, gpt(ids()).logits, rtol=0, atol=ATOL)
    assert sorted(registered) == ["down_proj", "down_proj_bias", "gate_up_proj"]


def test_experts_forward_refuses_bad_input():
    model = get_peft_model(tiny_moe("qwen3_moe")[0], config(1))
    experts = experts_of(model).get_base_layer()
    matrix = experts_of(model).lora_A["default"]  # the outer wrapper's: down_proj's stack
    h, index, top_w = routing()
    with pytest.raises(ValueError, match="stacks of 4 experts, 32 -> 48"):
        fused_experts.experts_forward(experts, h, index, top_w, {"gate_up_proj": [fused_experts.Update((matrix,),
                                                                                                       (1.0,))]})
    with pytest.raises(ValueError, match=r"\(T, k\)"):
        fused_experts.experts_forward(experts, h, index[:, :1], top_w, {})
    with pytest.raises(ValueError, match="not the expert projections"):
        fused_experts.experts_forward(experts, h, index, top_w, {"bias": []})
    with pytest.raises(ValueError, match="not one of transformers' experts modules"):
        fused_experts.experts_forward(torch.nn.Linear(2, 2), h, index, top_w, {})
    assert EXPERTS == 4


def test_experts_forward_without_peft():
    """The function the package path can call: MoRAMatrix stacks on a bare transformers experts module, two terms on
    gate_up_proj (summed) and one on down_proj, against the float64 reference."""
    from mora_kernels.layer import MoRAMatrix

    experts = tiny_moe("qwen3_moe")[0].model.layers[0].mlp.experts
    torch.manual_seed(7)
    sizes = {"gate_up_proj": (32, 48), "down_proj": (24, 32)}  # in -> out of (E, out, in)
    terms = {name: [(MoRAMatrix(n, m, 2, t, torch.float64, experts=EXPERTS), s) for t, s in types]
             for (name, (n, m)), types in zip(sizes.items(), ([(1, 0.5), (6, 2.0)], [(6, 1.5)]))}
    for matrices in terms.values():
        for matrix, _ in matrices:
            torch.nn.init.normal_(matrix.weight, std=0.1)
    h, index, top_w = routing()
    updates = {name: [fused_experts.Update((m,), (s,)) for m, s in matrices] for name, matrices in terms.items()}
    out = fused_experts.experts_forward(experts, h, index, top_w, updates)
    replaced = {}
    for name, matrices in terms.items():
        W = getattr(experts, name).detach()
        replaced[name] = W + sum(s / SCALING * reference_delta(m.weight.detach(), W, True, int(m.geo.t))
                                 for m, s in matrices)  # reference_delta scales by SCALING
    expected = torch.func.functional_call(experts, replaced, (h, index, top_w))
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    assert (out - experts(h, index, top_w)).abs().max() > 1e-3


@pytest.mark.slow
def test_torch_compile_over_the_fused_path_matches_eager(no_parametrization):
    """torch.compile over a model whose experts run fused (the package path; PEFT's runs the same function):
    forward and M's gradient match eager. float32: the compiled graphs may reorder the sums (1e-5 relative, as
    tests/test_compile.py). Off CUDA the reference backend's mixed path loops over the adapters present, a
    data-dependent graph break, so this is not one graph (docs/usage.md)."""
    model = mk.apply_mora(tiny_moe("qwen3_moe")[0].float(), None, 2, 6, target_parameters=PARAMS, scaling=SCALING)
    layers = [m for m in model.modules() if isinstance(m, MoRAParameter)]
    with torch.no_grad():
        for layer in layers:
            layer.adapters["default"].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    out = torch.compile(model)(ids()).logits
    out.square().sum().backward()
    grads = [layer.adapters["default"].weight.grad.clone() for layer in layers]
    for layer in layers:
        layer.adapters["default"].weight.grad = None
    eager = model(ids()).logits
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for grad, layer in zip(grads, layers):
        torch.testing.assert_close(grad, layer.adapters["default"].weight.grad, rtol=1e-5, atol=1e-6)
        assert grad.abs().sum() > 0
