"""MoRA on mixture-of-experts weights stored as one 3-D parameter (PEFT's ``target_parameters``): one M per expert,
``W_e + s dW(M_e)``, on tiny random Qwen3-MoE, gpt-oss and Mixtral models of transformers, built offline. These
three experts modules run MoRA fused into their forward (``mora_kernels.experts``); tests/test_experts.py checks that
path alone, and the parametrization where it falls back (the float8 module below runs the parametrization).

Judged against a float64 reference model whose expert weights were replaced by ``W_e + s dW(M_e)``, with dW computed
here from the unfused reference forward applied to the identity (``dW^T = forward(I, M_e)``), not from the closed
form the wrapper uses. Both models are float64: their expert weights agree to a few float64 roundings (~1e-16
relative), and the logits (O(1), through one decoder layer) to ~1e-14; 1e-10 is far above that and far below what an
adapter changes (~1e-2). Gradients of M are compared likewise (O(1) sums of products of the same terms), plus the one
rounding of M's float32 gradient (2**-24 relative).
"""

import pytest
import torch
from peft import PeftModel, get_peft_model

import mora_kernels.peft_integration as mkp
from mora_kernels import r_hat, reference
from mora_kernels.core import Geometry, MoRAType
from tests import hf_helpers  # noqa: F401  (offline: nothing may be downloaded)

ATOL = 1e-10  # float64 models: see the module docstring
EXPERTS = 4
SCALING = 0.5
PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_moe(kind: str, seed: int = 0):
    """A random one-layer MoE causal LM, float64, with the eager experts (transformers' grouped_mm takes no float64).
    Also returns the layout of its expert weights: (E, out, in) read by F.linear, or (E, in, out) read by x @ W."""
    from transformers import (
        GptOssConfig,
        GptOssForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=16, num_experts_per_tok=2, experts_implementation="eager")
    torch.manual_seed(seed)
    if kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24,
                                                   num_experts=EXPERTS, **common))
        out_first = True
    elif kind == "gpt_oss":
        model = GptOssForCausalLM(GptOssConfig(intermediate_size=24, num_local_experts=EXPERTS, **common))
        out_first = False
    else:
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_local_experts=EXPERTS, **common))
        out_first = True
    return model.double().eval(), out_first


def ids():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))


def config(mora_type, **kwargs):
    return mkp.MoRAConfig(r=2, mora_type=mora_type, target_modules=[], target_parameters=PARAMS,
                          init_lora_weights=False, mora_scaling=SCALING, **kwargs)


def matrices_of(model, adapter="default") -> dict[str, torch.Tensor]:
    """{parameter's short name: its M} of the model's MoRA parameter wrappers."""
    return {m.parameter_name: m.lora_A[adapter].weight for m in model.modules() if isinstance(m, mkp.ParamWrapper)}


def matrices(model, adapter="default") -> dict[str, torch.Tensor]:
    """{parameter's short name: M of shape (E, R, R)} of the MoE models' expert wrappers."""
    found = matrices_of(model, adapter)
    assert sorted(found) == ["down_proj", "gate_up_proj"]
    return found


def reference_delta(M: torch.Tensor, W: torch.Tensor, out_first: bool, mora_type) -> torch.Tensor:
    """``s dW(M_e)`` for every expert, laid out as W, from the unfused reference forward on the identity."""
    n, m = (W.shape[2], W.shape[1]) if out_first else (W.shape[1], W.shape[2])
    geo = Geometry(n, m, M.shape[-1], MoRAType(mora_type))
    eye = torch.eye(n, dtype=torch.float64)
    delta = torch.stack([reference.forward(eye, Me.double(), geo).T for Me in M]) * SCALING  # (E, m, n)
    return delta if out_first else delta.transpose(-2, -1)


def reference_logits(kind, Ms: dict, mora_type):
    """Logits of a fresh base model whose expert weights are W + s dW(M), differentiable in Ms (float64 leaves)."""
    base, out_first = tiny_moe(kind)
    experts = base.model.layers[0].mlp.experts
    weights = {f"model.layers.0.mlp.experts.{name}": getattr(experts, name).detach()
               + reference_delta(M, getattr(experts, name), out_first, mora_type) for name, M in Ms.items()}
    return torch.func.functional_call(base, weights, (ids(),)).logits


@pytest.mark.parametrize("mora_type", [1, 6])
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_experts_forward_grad_merge_against_reference(kind, mora_type):
    model = get_peft_model(tiny_moe(kind)[0], config(mora_type))
    Ms = matrices(model)
    assert all(M.shape[0] == EXPERTS and M.dim() == 3 for M in Ms.values())
    logits = model(ids()).logits
    leaves = {name: M.detach().double().requires_grad_() for name, M in Ms.items()}
    expected = reference_logits(kind, leaves, mora_type)
    torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)
    base_logits = tiny_moe(kind)[0](ids()).logits
    assert (logits - base_logits).abs().max() > 1e-3  # the adapters act

    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (logits * weights).sum().backward()
    (expected * weights).sum().backward()
    for name, M in Ms.items():
        # M is float32 (as LoRA's A and B): its gradient, computed in float64, is rounded once to float32
        torch.testing.assert_close(M.grad.double(), leaves[name].grad, rtol=2**-24, atol=ATOL)
        routed = leaves[name].grad.abs().sum(dim=(1, 2)) > 0  # the experts that got tokens
        assert routed.sum() >= 2 and torch.equal(M.grad.abs().sum(dim=(1, 2)) > 0, routed)

    # merge: W_e + s dW(M_e) in place, the same logits; unmerge gives W back to float64 rounding
    experts = model.base_model.model.model.layers[0].mlp.experts
    original = {name: getattr(experts.get_base_layer(), name).detach().clone() for name in Ms}
    model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, expected, rtol=0, atol=ATOL)
        for name in Ms:
            merged = getattr(experts.get_base_layer(), name)
            delta = reference_delta(Ms[name], original[name], kind != "gpt_oss", mora_type)
            torch.testing.assert_close(merged, original[name] + delta, rtol=0, atol=1e-14)
    model.unmerge_adapter()
    for name in Ms:
        torch.testing.assert_close(getattr(experts.get_base_layer(), name), original[name], rtol=0, atol=1e-15)
    with torch.no_grad():
        merged_model = model.merge_and_unload()
        assert not any(isinstance(m, mkp.ParamWrapper) for m in merged_model.modules())
        torch.testing.assert_close(merged_model(ids()).logits, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_experts_save_load_round_trip_bit_exact(kind, tmp_path):
    model = get_peft_model(tiny_moe(kind)[0], config(6))
    with torch.no_grad():
        logits = model(ids()).logits
    model.save_pretrained(tmp_path)
    for loader in (mkp.from_pretrained, PeftModel.from_pretrained):
        loaded = loader(tiny_moe(kind)[0], tmp_path)
        for name, M in matrices(loaded).items():
            assert torch.equal(M, matrices(model)[name])
        with torch.no_grad():
            assert torch.equal(loaded(ids()).logits, logits)
    second = mkp.from_pretrained(tiny_moe(kind)[0], tmp_path, adapter_name="a")
    mkp.load_adapter(second, tmp_path, "b")
    for name, M in matrices(second, "b").items():
        assert torch.equal(M, matrices(model)[name])


def test_experts_adapters_disable_set_delete():
    model = get_peft_model(tiny_moe("mixtral")[0], config(1))
    model.add_adapter("other", config(6))
    with torch.no_grad():
        first = model(ids()).logits
        model.set_adapter("other")
        other = model(ids()).logits
        with model.disable_adapter():
            plain = model(ids()).logits
    assert torch.equal(plain, tiny_moe("mixtral")[0](ids()).logits)
    assert (first - other).abs().max() > 1e-3 and (other - plain).abs().max() > 1e-3
    expected = reference_logits("mixtral", {k: v.detach() for k, v in matrices(model, "other").items()}, 6)
    torch.testing.assert_close(other, expected, rtol=0, atol=ATOL)
    model.delete_adapter("default")
    assert all("default" not in m.lora_A for m in model.modules() if isinstance(m, mkp.ParamWrapper))
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, other)


def test_experts_refusals():
    # adapter_names= works on the fused path and is refused by the parametrization: tests/test_experts.py
    model = get_peft_model(tiny_moe("qwen3_moe")[0], config(1)).eval()
    with pytest.raises(ValueError, match="add_weighted_adapter does not support targeting nn.Parameter"):
        model.add_weighted_adapter(["default"], [1.0], "sum")
    with pytest.raises(ValueError, match="lora_dropout"):
        get_peft_model(tiny_moe("qwen3_moe")[0], config(1, lora_dropout=0.1))
    with pytest.raises(ValueError, match="use_dora"):
        get_peft_model(tiny_moe("qwen3_moe")[0], config(1, use_dora=True))


def test_experts_low_cpu_mem_usage_and_peft_load_adapter(tmp_path):
    model = get_peft_model(tiny_moe("qwen3_moe")[0], config(6))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_moe("qwen3_moe")[0], tmp_path, low_cpu_mem_usage=True)
    loaded.load_adapter(tmp_path, "second", low_cpu_mem_usage=True)
    for adapter in ("default", "second"):
        for name, M in matrices(loaded, adapter).items():
            assert M.dtype == torch.float32 and torch.equal(M, matrices(model)[name])
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_experts_lora_and_mora_on_one_parameter_refused_in_both_orders():
    from peft import LoraConfig

    lora = LoraConfig(r=2, target_modules=[], target_parameters=PARAMS)
    for first, second in ((config(1), lora), (lora, config(1))):
        model = get_peft_model(tiny_moe("qwen3_moe")[0], first)
        with pytest.raises(ValueError, match="MoRA and LoRA adapters cannot share a layer"):
            model.add_adapter("other", second)


def test_experts_export_and_remora_refused(tmp_path):
    import mora_kernels as mk
    from mora_kernels import remora

    model = get_peft_model(tiny_moe("qwen3_moe")[0], config(1))
    M = {name: M.detach().clone() for name, M in matrices(model).items()}
    with pytest.raises(ValueError, match="target_parameters"):
        mk.export_lora(model, tmp_path / "lora", rank=4)
    with pytest.raises(ValueError, match="which ReMoRA does not restart"):
        remora.restart(model)
    assert all(torch.equal(M[name], now) for name, now in matrices(model).items())


def test_experts_bfloat16_merge_rounds_once():
    """A bfloat16 model: M is lifted to float32 (PEFT's autocast_adapter_dtype), the forward reads W + s dW in
    bfloat16, and a merge computes W + s dW in float32 and rounds it once: within u = 2**-8 (bfloat16's unit
    roundoff) of the exact float64 sum, plus float32's rounding of s dW (~1e-7 relative, bounded by 1e-5 here)."""
    base, out_first = tiny_moe("qwen3_moe")
    model = get_peft_model(base.to(torch.bfloat16), config(6))
    Ms = matrices(model)
    assert all(M.dtype == torch.float32 for M in Ms.values())
    logits = model(ids()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(M.grad is not None and M.grad.dtype == torch.float32 for M in Ms.values())
    experts = model.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    original = {name: getattr(experts, name).detach().clone() for name in Ms}
    model.merge_adapter()
    for name, M in Ms.items():
        exact = original[name].double() + reference_delta(M.detach(), original[name], out_first, 6)
        merged = getattr(experts, name)
        assert merged.dtype == torch.bfloat16
        assert ((merged.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-5).all()


def test_experts_rank_and_alpha_pattern():
    model = get_peft_model(tiny_moe("mixtral")[0], config(1, rank_pattern={"down_proj": 4}, lora_alpha=8,
                                                          alpha_pattern={"gate_up_proj": 16}))
    wrappers = {m.parameter_name: m for m in model.modules() if isinstance(m, mkp.ParamWrapper)}
    # Mixtral: gate_up_proj (E, 48, 32) reads 32 -> 48, down_proj (E, 32, 24) reads 24 -> 32
    R = {"gate_up_proj": r_hat(32, 48, 2, 1), "down_proj": r_hat(24, 32, 4, 1)}
    for name, wrapper in wrappers.items():
        assert tuple(wrapper.lora_A["default"].weight.shape) == (EXPERTS, R[name], R[name])
    assert wrappers["gate_up_proj"].scaling["default"] == 2 * SCALING
    assert wrappers["down_proj"].scaling["default"] == SCALING


def test_experts_refused_checkpoint_leaves_the_model_as_it_was(tmp_path):
    import json

    get_peft_model(tiny_moe("qwen3_moe")[0], config(1)).save_pretrained(tmp_path)
    file = tmp_path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "r": 4}))  # M's saved shapes are those of r=2
    base = tiny_moe("qwen3_moe")[0]
    with pytest.raises(ValueError, match="expected shape"):
        mkp.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, mkp.ParamWrapper) or hasattr(m, "parametrizations") for m in base.modules())
    with pytest.raises(ValueError, match="expected shape"):  # PEFT's own loader refuses it too, while loading
        PeftModel.from_pretrained(tiny_moe("qwen3_moe")[0], tmp_path)


def test_experts_float8_parameter_adds_in_the_wider_dtype():
    """A float8 parameter (whose module upcasts it itself): s dW is added in float32 and rounded once to float8
    (PEFT's proxy for low-precision weights); cast to float8 first, most of a small update would be lost."""
    from torch import nn

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 16, 12).to(torch.float8_e4m3fn), requires_grad=False)

        def forward(self, x):
            self.seen = self.w.detach().clone()
            return torch.einsum("eoi,bi->beo", self.w.float(), x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()

        def forward(self, x):
            return self.experts(x)

    torch.manual_seed(0)
    model = get_peft_model(Net(), mkp.MoRAConfig(r=2, target_modules=[], target_parameters=["experts.w"],
                                                 init_lora_weights=False, mora_scaling=SCALING))
    model(torch.randn(2, 12))
    experts = model.base_model.model.experts.get_base_layer()
    M = matrices_of(model)["w"]
    delta = reference_delta(M.detach(), experts.w, True, 1).float()
    assert experts.seen.dtype == torch.float8_e4m3fn
    expected = (experts.w.float() + delta).to(torch.float8_e4m3fn)
    assert torch.equal(experts.seen.float(), expected.float())
    assert not torch.equal(expected.float(), (experts.w.float() + delta.to(torch.float8_e4m3fn).float()).to(
        torch.float8_e4m3fn).float())  # the order of the roundings matters here
