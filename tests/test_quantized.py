"""QMoRA: MoRA on bitsandbytes 4-bit / 8-bit bases (CPU backend) and torchao, on both paths.

The update term does not read the base weight, so on a quantized base it must equal the float base's exactly; only
base(x) differs. A merge dequantizes W, adds dW and quantizes again: its error is checked element by element against
the bound of the format (half a quantization step of the block or row, plus the rounding of the scales).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import mora_kernels as mk
import mora_kernels.adapters as mka
from mora_kernels.bases import Bnb4bit
from mora_kernels.layer import AdapterMixin

from .hf_helpers import GOLDEN, batch, golden_base, golden_expected, tiny_llama
from .quant_helpers import KINDS, bnb, dense_weight, float_compute, quantize, quantize_linear, stored

TARGETS = ["q_proj", "v_proj", "down_proj"]
EPS32 = torch.finfo(torch.float32).eps


def adapt(path, model, targets=TARGETS, **options):
    if path == "plain":
        return mka.apply_mora(model, targets, r=4, mora_type=6, **options)
    from peft import get_peft_model

    from mora_kernels.peft_integration import MoRAConfig

    return get_peft_model(model, MoRAConfig(r=4, mora_type=6, target_modules=targets, **options))


def mora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterMixin)}


def fill_matrices(model, seed=0, std=0.05):
    """The same random M on every adapted layer of models of the same architecture (by layer name)."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in sorted(mora_modules(model).items()):
        for name in layer.mora_adapter_names():
            with torch.no_grad():
                M = layer.mora_adapter(name).weight
                M.copy_(torch.randn(M.shape, generator=g) * std)


@pytest.mark.parametrize("path", ["plain", "peft"])
@pytest.mark.parametrize("kind", KINDS)
def test_update_on_quantized_base_equals_float_base(kind, path):
    float_model = adapt(path, tiny_llama())
    quant_model = adapt(path, quantize(tiny_llama(), TARGETS, kind))
    fill_matrices(float_model)
    fill_matrices(quant_model)
    layers_f, layers_q = mora_modules(float_model), mora_modules(quant_model)
    assert layers_f.keys() == layers_q.keys() and len(layers_q) == 6
    g = torch.Generator().manual_seed(1)
    for name, layer_q in layers_q.items():
        layer_f = layers_f[name]
        assert type(layer_q.base_layer).__module__.startswith("bitsandbytes")
        x = torch.randn(2, 5, layer_f.in_features, generator=g)
        upstream = torch.randn(2, 5, layer_f.out_features, generator=g)
        updates, grads = [], []
        for layer in (layer_f, layer_q):
            M = layer.mora_adapter("default").weight
            M.grad = None
            y = layer(x)
            with torch.no_grad():
                updates.append((y - layer.base_layer(x), y, layer.base_layer(x)))
            y.backward(upstream)
            grads.append(M.grad.clone())
        (u_f, y_f, b_f), (u_q, y_q, b_q) = updates
        # y = base + u and y - base each round once in float32: |error| <= eps * (|base| + |u|) per element
        bound = EPS32 * (b_f.abs() + b_q.abs() + 2 * u_f.abs())
        assert ((u_q - u_f).abs() <= bound).all(), name
        assert (b_q - b_f).abs().max() > 0  # the bases do differ: by the quantization error
        # dM depends on x and the upstream gradient only: the same ops on the same inputs
        torch.testing.assert_close(grads[1], grads[0], atol=0, rtol=0)


@pytest.mark.parametrize("path", ["plain", "peft"])
@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_training_touches_only_M_and_the_base_stays_quantized(kind, path):
    model = adapt(path, quantize(tiny_llama(), TARGETS, kind))
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 6 and all(p.dim() == 2 and p.shape[0] == p.shape[1] for _, p in trainable)
    bases = {name: layer.base_layer for name, layer in mora_modules(model).items()}
    before = {name: stored(base) for name, base in bases.items()}
    start = {n: p.detach().clone() for n, p in trainable}
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
    ids = batch()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, start[n]) for n, p in trainable)
    for name, base in bases.items():
        assert base.weight.dtype in (torch.uint8, torch.int8) and base.weight.grad is None
        assert all(torch.equal(a, b) for a, b in zip(stored(base), before[name], strict=True)), name


def requantization_bound(base, target: torch.Tensor) -> torch.Tensor:
    """Per element, the most that quantizing ``target`` ``(out, in)`` into ``base``'s format may move it.

    4-bit: codes are the nearest of 16 levels times the block's absmax, so an element moves by at most half the
    widest gap between levels times that absmax, plus the error of the absmax actually stored (8-bit itself with
    double quantization). int8: ``round(w * 127 / s) * s / 127`` with s the row's absmax after the float16 cast that
    bitsandbytes quantizes from, so half of s / 127 plus that cast. Both plus float32 rounding of the products.
    """
    target = target.float()
    if isinstance(base, bnb.nn.Linear8bitLt):
        half = target.half().float()
        scale = half.abs().amax(dim=1, keepdim=True)
        return scale / 254 + (target - half).abs() + 4 * EPS32 * scale
    state = base.weight.quant_state
    levels = bnb.functional.get_4bit_type(state.quant_type, device="cpu").sort().values
    half_gap = levels.diff().max().item() / 2
    blocks = target.reshape(-1, state.blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    if state.nested:
        stored_absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        stored_absmax = state.absmax
    stored_absmax = stored_absmax.float().reshape(-1, 1)
    bound = half_gap * absmax + (stored_absmax - absmax).abs() + 4 * EPS32 * absmax
    return bound.expand_as(blocks).reshape(target.shape)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_within_the_format_bound(kind):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    layer = mk.MoRALinear(quantize_linear(linear, kind), r=4, mora_type=1)
    with torch.no_grad():
        layer.M.normal_(0, 0.05)
    x = torch.randn(8, 64)
    with torch.no_grad():
        unmerged = layer(x)
        base_error = ((layer.base(x) - linear(x)).norm() / linear(x).norm()).item()
    start = dense_weight(layer.base)
    packed = stored(layer.base)
    dW = layer.delta_weight()
    target = (start.float() + dW).to(start.dtype)
    with pytest.warns(UserWarning, match="quantized again"):
        layer.merge()
    assert type(layer.base.weight).__name__ in ("Params4bit", "Int8Params")
    assert layer.base.weight.dtype in (torch.uint8, torch.int8)  # still quantized
    merged = dense_weight(layer.base)
    bound = requantization_bound(layer.base, target)
    error = (merged.float() - target.float()).abs()
    assert (error <= bound).all()
    with torch.no_grad():
        out = layer(x)
    rel = ((out - unmerged).norm() / unmerged.norm()).item()
    print(f"{kind}: merge moves weights by <= {(error / bound).max().item():.2f} of the bound, mean |error| "
          f"{error.mean().item():.2e} (|dW| mean {dW.abs().mean().item():.2e}); outputs move by {rel:.2e} relative, "
          f"the base's own quantization error is {base_error:.2e}")
    # rounding W + dW to the grid errs as much as rounding W did: the outputs move by about the base's own error
    assert rel <= 2 * base_error

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is requantized: the packed weight from before the merge comes back
        layer.unmerge()
    assert all(torch.equal(a, b) for a, b in zip(stored(layer.base), packed))
    assert not layer.merged


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_peft_merge_unmerge_and_unload_on_a_quantized_model(kind):
    targets_ = ["q_proj", "v_proj"]  # in_features 64: not down_proj's 176, see the CPU refusal below
    model = adapt("peft", quantize(tiny_llama(), targets_, kind), targets_)
    fill_matrices(model)
    layers = mora_modules(model)

    def targets(sign):
        """Each base's dense weight plus sign * dW ((out, in): bitsandbytes' dense layout), in its dtype."""
        out = {}
        for name, layer in layers.items():
            weight = dense_weight(layer.base_layer)
            out[name] = (weight.float() + sign * layer.get_delta_weight("default")).to(weight.dtype)
        return out

    def check(expected):
        for name, target in expected.items():
            base = layers[name].base_layer
            assert type(base).__module__.startswith("bitsandbytes") and base.weight.dtype in (torch.uint8, torch.int8)
            error = (dense_weight(base).float() - target.float()).abs()
            assert (error <= requantization_bound(base, target)).all(), name

    expected = targets(+1)
    packed = {name: stored(layer.base_layer) for name, layer in layers.items()}
    with pytest.warns(UserWarning, match="quantized again"):
        model.merge_adapter(safe_merge=True)
    check(expected)
    model.unmerge_adapter()  # puts back the packed weights from before the merge, bit for bit
    for name, layer in layers.items():
        assert all(torch.equal(a, b) for a, b in zip(stored(layer.base_layer), packed[name])), name
    expected = targets(+1)
    with pytest.warns(UserWarning, match="quantized again"):
        merged = model.merge_and_unload()
    assert not mora_modules(merged)
    check(expected)


def misreading_rows(monkeypatch):
    """Make bitsandbytes' dequantizer misread 2-D weights whose rows are not whole blocks, as its CPU kernel does in
    some builds on some CPUs (0.50 on AVX512): the blocks are taken row by row instead of along the flat weight."""
    real = bnb.functional.dequantize_4bit

    def misread(data, state, *args, **kwargs):
        if len(state.shape) == 2 and state.shape[1] % state.blocksize:
            return real(data, state, *args, **kwargs).flip(-1)
        return real(data, state, *args, **kwargs)

    monkeypatch.setattr(bnb.functional, "dequantize_4bit", misread)


def reading_rows_right(monkeypatch):
    """Make bitsandbytes' dequantizer read 2-D weights as the quantizer wrote them, whatever this machine does."""
    real = bnb.functional.dequantize_4bit

    def right(data, state, *args, **kwargs):
        if len(state.shape) == 2:
            flat = copy.copy(state)
            flat.shape = torch.Size([state.shape.numel()])
            return real(data, flat, *args, **kwargs).reshape(state.shape)
        return real(data, state, *args, **kwargs)

    monkeypatch.setattr(bnb.functional, "dequantize_4bit", right)


def test_the_row_misreading_probe_sees_each_reading(monkeypatch):
    layer = quantize_linear(nn.Linear(176, 64), "nf4")  # rows of 176: two whole blocks of 64 and a part
    with monkeypatch.context() as patch:
        misreading_rows(patch)
        assert Bnb4bit.misreads_rows(layer)
    with monkeypatch.context() as patch:
        reading_rows_right(patch)
        assert not Bnb4bit.misreads_rows(layer)
    # This machine's own kernels: the probe says what a direct comparison of the two readings says.
    flat_state = copy.copy(layer.weight.quant_state)
    flat_state.shape = torch.Size([176 * 64])
    as_layer = bnb.functional.dequantize_4bit(layer.weight.data, copy.copy(layer.weight.quant_state))
    as_written = bnb.functional.dequantize_4bit(layer.weight.data, flat_state).reshape(64, 176)
    assert Bnb4bit.misreads_rows(layer) == (not torch.equal(as_layer, as_written))


def test_merge_refused_where_bitsandbytes_misreads_the_weight(monkeypatch):
    """Where bitsandbytes dequantizes a 4-bit weight whose rows are not whole blocks (here in_features 176, blocks of
    64) unlike its quantizer, a merge could not reproduce the unmerged layer, so it is refused, at model level before
    any layer changes."""
    misreading_rows(monkeypatch)
    for path in ("plain", "peft"):
        model = adapt(path, quantize(tiny_llama(), TARGETS, "nf4"))  # down_proj: in_features 176
        fill_matrices(model)
        before = {name: stored(layer.base_layer) for name, layer in mora_modules(model).items()}
        for merge in ((mka.merge,) if path == "plain" else (model.merge_adapter, model.merge_and_unload)):
            with pytest.raises(TypeError, match=r"in_features \(176\) is not a multiple of its block size \(64\)"):
                merge(model) if path == "plain" else merge()
        for name, layer in mora_modules(model).items():
            assert not layer.merged
            assert all(torch.equal(a, b) for a, b in zip(stored(layer.base_layer), before[name], strict=True))


@pytest.mark.parametrize("path", ["plain", "peft"])
def test_merge_of_partial_blocks_where_bitsandbytes_reads_them_right(monkeypatch, path):
    """Where the rows are read as written (GPUs, AVX2-only CPUs), the same merge is done, within the format's bound."""
    reading_rows_right(monkeypatch)
    model = adapt(path, quantize(tiny_llama(), TARGETS, "nf4"))
    fill_matrices(model)
    layers = mora_modules(model)
    down = {name: layer for name, layer in layers.items() if layer.in_features == 176}
    assert down
    expected = {name: dense_weight(layer.base_layer).float() + layer.mora_adapter("default").delta_weight(
        layer.mora_scaling("default")) for name, layer in down.items()}
    with pytest.warns(UserWarning, match="quantized again"):
        mka.merge(model) if path == "plain" else model.merge_adapter()
    for name, layer in down.items():
        base = layer.base_layer
        assert layer.merged and base.weight.dtype == torch.uint8
        error = (dense_weight(base).float() - expected[name]).abs()
        assert (error <= requantization_bound(base, expected[name])).all(), name


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_safe_merge_refuses_a_non_finite_update_and_leaves_the_base(kind):
    layer = mk.MoRALinear(quantize_linear(nn.Linear(64, 96), kind), r=4, mora_type=1)
    with torch.no_grad():
        layer.M.fill_(float("inf"))
    before = stored(layer.base)
    with pytest.raises(ValueError, match="non-finite; not merged"):
        layer.merge(safe_merge=True)
    assert all(torch.equal(a, b) for a, b in zip(stored(layer.base), before, strict=True))
    assert not layer.merged


def test_merge_after_the_cpu_inference_repacking():
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight at the first eval forward without gradients
    (here before MoRA wraps the layer); merge must read that layout back (dequantize_4bit alone returns garbage)."""
    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(64, 96), "nf4").eval()
    twin = copy.deepcopy(base)
    with torch.no_grad():
        base(torch.randn(2, 64))  # repacks only on such CPUs
    print("repacked:", getattr(base.weight.quant_state, "packing_format_for_cpu", False))
    layers = [mk.MoRALinear(b, r=4, mora_type=1) for b in (base, twin)]
    for layer in layers:
        with torch.no_grad():
            layer.M.copy_(torch.linspace(-0.1, 0.1, layer.R**2).reshape(layer.R, layer.R))
        with pytest.warns(UserWarning):
            layer.merge()
    # bitsandbytes' inverse of the repacking keeps the absmax in bfloat16, so a weight near a rounding boundary may
    # land one level away: at most nf4's widest gap (0.30 of the absmax), never garbage
    w, w_twin = dense_weight(base), dense_weight(twin)
    assert (w - w_twin).abs().max() <= 0.31 * w_twin.abs().max()
    assert (w - w_twin).abs().mean() <= 1e-2 * w_twin.abs().mean()


@pytest.mark.parametrize("path", ["plain", "peft"])
def test_training_after_an_evaluation(path):
    """An eval forward without gradients, then training (a Trainer's evaluation loop): bitsandbytes' CPU inference
    repacking would break the training forward, so the adapted 4-bit layers do not repack."""
    model = adapt(path, quantize(tiny_llama(), TARGETS, "nf4"))
    ids = batch()
    model.eval()
    with torch.no_grad():
        model(ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_remora_restart_is_refused_on_a_quantized_base():
    from mora_kernels.remora import restart

    model = mka.apply_mora(quantize(tiny_llama(), ["q_proj"], "nf4"), ["q_proj", "v_proj"], r=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # refused before any layer restarts: the float v_proj layers keep their M and weight too
    with pytest.raises(TypeError, match="layer .*q_proj.*: the base is a bitsandbytes Linear4bit"):
        restart(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("path", ["plain", "peft"])
@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_original_checkpoint_on_a_quantized_base(kind, path):
    """The original release's checkpoint on a QLoRA-style base (every decoder Linear quantized): logits differ from
    the float base's only by the base's quantization error."""
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = golden_expected()["input_ids"]

    def load(model):
        if path == "plain":
            return mka.load_adapter(model, GOLDEN / "adapter")
        from mora_kernels.peft_integration import from_pretrained

        return from_pretrained(model, GOLDEN / "adapter")

    def logits(model):
        with torch.no_grad():
            return model(ids).logits

    float_model = load(golden_base(torch.float32)).eval()
    quant_model = load(float_compute(quantize(golden_base(torch.float32), linears, kind))).eval()
    adapted_error = (logits(quant_model) - logits(float_model)).abs().max().item()
    # float32 base against the float64 reference: the adapter loads and computes the same update on float32
    reference_error = (logits(float_model) - golden_expected()["logits"].float()).abs().max().item()
    assert reference_error < 1e-4
    if path == "plain":
        with mka.disable_adapters(quant_model), mka.disable_adapters(float_model):
            base_error = (logits(quant_model) - logits(float_model)).abs().max().item()
    else:
        with quant_model.disable_adapter(), float_model.disable_adapter():
            base_error = (logits(quant_model) - logits(float_model)).abs().max().item()
    print(f"{kind} {path}: max |logit error| of the quantized base {base_error:.3e}, with the adapter "
          f"{adapted_error:.3e}")
    assert 0 < adapted_error <= 2 * base_error
    if kind != "int8":
        # exact decomposition: a float model holding the dequantized weights gives the same logits, so the adapter
        # adds no error of its own (int8 also quantizes activations in its matmul, so it has no float twin)
        twin = golden_base(torch.float32)
        for name, module in quant_model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                owner = name.replace("base_model.model.", "").replace(".base_layer", "").replace(".base", "")
                twin.get_submodule(owner).weight.data.copy_(dense_weight(module))
        twin = load(twin).eval()
        torch.testing.assert_close(logits(quant_model), logits(twin), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["plain", "peft"])
def test_torchao_weight_only_base(path):
    pytest.importorskip("torchao", reason="torchao is in the [quant] extra")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    float_model = adapt(path, tiny_llama(), ["q_proj"])
    quant_model = tiny_llama()
    quantize_(quant_model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: name.endswith("q_proj"))
    quant_model = adapt(path, quant_model, ["q_proj"])
    fill_matrices(float_model)
    fill_matrices(quant_model)
    (name, layer_q), = sorted(mora_modules(quant_model).items())[:1]
    layer_f = mora_modules(float_model)[name]
    x = torch.randn(3, 64)
    with torch.no_grad():
        u_f = layer_f(x) - layer_f.base_layer(x)
        b_q = layer_q.base_layer(x)
        u_q = layer_q(x) - b_q
    bound = EPS32 * (b_q.abs() + layer_f.base_layer(x).abs() + 2 * u_f.abs())
    assert ((u_q - u_f).abs() <= bound).all()
    y = layer_q(x)
    y.sum().backward()
    assert layer_q.mora_adapter("default").weight.grad is not None
    with pytest.raises(TypeError, match="torchao-quantized Linear.*float copy"):
        layer_q.merge()
    assert not layer_q.merged


def test_benchmark_quantized_providers_run_and_count_their_bytes():
    from benchmarks.providers import build_quantized, weight_bytes

    n, m = 256, 128
    float_base = nn.Linear(n, m, bias=False).requires_grad_(False)
    assert weight_bytes(float_base) == 4 * n * m
    x = torch.randn(4, n, requires_grad=True)
    for kind, low, high in (("int8", n * m + 4 * m, n * m + 4 * m),  # int8 codes + one float32 scale per row
                            ("nf4", n * m // 2 + 4 * n * m // 64, n * m // 2 + 4 * n * m // 64 + 1024)):  # + absmax
        providers = build_quantized(float_base, 4, (1, 6), torch.device("cpu"), kind)
        assert {f"base [{kind}]", f"LoRA PEFT [{kind}]", f"MoRA-1 reference [{kind}]",
                f"MoRA-6 reference [{kind}]"} <= {p.name for p in providers if p.layer is not None}
        base = providers[0].layer
        assert low <= weight_bytes(base) <= high  # (4-bit: plus the 16 levels and bitsandbytes' packed state)
        for p in providers[1:]:
            if p.layer is not None:
                p.layer(x).sum().backward()
                extra = weight_bytes(p.layer) - weight_bytes(base)
                assert extra >= 4 * sum(q.numel() for q in p.layer.parameters() if q.requires_grad), p.name


@pytest.mark.parametrize("path", ["plain", "peft"])
def test_gpt2_quantized_by_transformers(path, tmp_path):
    """transformers quantizes GPT-2's Conv1D layers into bitsandbytes Linears with (out, in) weights: MoRA's update
    there equals the float Conv1D model's, and fan_in_fan_out (True for the float GPT-2) is corrected to False."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .hf_helpers import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path)
    q4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
    targets = ["c_attn", "c_fc"]

    def adapted(model):
        if path == "plain":
            return mka.apply_mora(model, targets, r=4, mora_type=6)
        from peft import get_peft_model

        from mora_kernels.peft_integration import MoRAConfig

        return get_peft_model(model, MoRAConfig(r=4, mora_type=6, target_modules=targets, fan_in_fan_out=True))

    float_model = adapted(AutoModelForCausalLM.from_pretrained(tmp_path))
    if path == "peft":
        with pytest.warns(UserWarning, match="setting fan_in_fan_out to False"):
            quant_model = adapted(AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q4))
    else:
        quant_model = adapted(AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q4))
    fill_matrices(float_model)
    fill_matrices(quant_model)
    layers_f, layers_q = mora_modules(float_model), mora_modules(quant_model)
    assert layers_f.keys() == layers_q.keys() and len(layers_q) == 4
    x = torch.randn(3, 64)
    for name, layer_q in layers_q.items():
        layer_f = layers_f[name]
        assert isinstance(layer_q.base_layer, bnb.nn.Linear4bit) and type(layer_f.base_layer).__name__ == "Conv1D"
        with torch.no_grad():
            b_f, b_q = layer_f.base_layer(x), layer_q.base_layer(x)
            u_f, u_q = layer_f(x) - b_f, layer_q(x) - b_q
        assert ((u_q - u_f).abs() <= EPS32 * (b_f.abs() + b_q.abs() + 2 * u_f.abs())).all(), name
