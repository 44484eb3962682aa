"""Adversarial table: bad arguments, hostile checkpoints and failures half way through a model edit.

Every row asserts the exception type, that the message names the argument or the file at fault, and that the model
is exactly as before the call: its state dict bit for bit (NaN-safe), module tree (names, types and identities),
train/eval and ``requires_grad`` flags, forward hooks, every MoRA layer's adapters (active, merged, scaling, r, R,
type, restarts) and PEFT's ``peft_config``. Rows marked ``peft`` skip when peft is not installed.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import random
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import mora_kernels as mk
from mora_kernels.layer import AdapterMixin, MoRALinear, MoRAMatrix
from mora_kernels.remora import ReMoRA, restart


# --- the model's fingerprint: everything an edit may change
def _bits(tensor: torch.Tensor):
    t = tensor.detach().cpu().contiguous()
    return t.dtype, tuple(t.shape), t.view(torch.uint8).numpy().tobytes()


def fingerprint(model: nn.Module | None) -> dict:
    if model is None:
        return {}
    modules = list(model.named_modules(remove_duplicate=False))
    layers = {}
    for name, module in modules:
        if isinstance(module, AdapterMixin):
            names = module.mora_adapter_names()
            layers[name] = dict(
                adapters=names, active=list(module.active_adapters), merged=list(module.merged_adapters),
                disabled=module.disable_adapters,
                settings={n: (module.mora_adapter(n).r, module.mora_adapter(n).geo, module.mora_adapter(n).restarts,
                              module.mora_scaling(n), type(module.mora_dropout(n)).__name__) for n in names},
            )
    configs = getattr(model, "peft_config", None)
    return dict(
        state={key: _bits(value) for key, value in model.state_dict(keep_vars=True).items()},
        tree=[(name, type(module), id(module)) for name, module in modules],
        training=[(name, module.training) for name, module in modules],
        hooks=[(name, len(module._forward_hooks), len(module._forward_pre_hooks)) for name, module in modules],
        flags=[(name, p.requires_grad, id(p)) for name, p in model.named_parameters(remove_duplicate=False)],
        layers=layers,
        peft_config={k: _config_fields(v) for k, v in configs.items()} if isinstance(configs, dict) else None,
    )


def _config_fields(config) -> dict:
    """A PEFT config's fields as comparable values: a set (``target_modules``) by its sorted members, since a set
    rebuilt with the same members may print them in another order."""
    return {name: sorted(map(repr, value)) if isinstance(value, (set, frozenset)) else repr(value)
            for name, value in vars(config).items()}


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for part in before:
        if part == "state":
            assert before[part].keys() == after[part].keys(), "state dict keys changed"
            changed = [key for key in before[part] if before[part][key] != after[part][key]]
            assert not changed, f"tensors changed: {changed}"
        else:
            assert before[part] == after[part], f"{part} changed"


# --- small models
class Tiny(nn.Module):
    """Named like a transformer block, small enough for every row: embedding, q/v projections, head."""

    def __init__(self, seed: int = 0, tied: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(16, 32)
        self.block = nn.ModuleDict(dict(q_proj=nn.Linear(32, 32), v_proj=nn.Linear(32, 24), o_proj=nn.Linear(24, 32)))
        self.head = nn.Linear(32, 16, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.block.o_proj(self.block.v_proj(h) * self.block.q_proj(h)[..., :24])
        return self.head(h)


IDS = torch.arange(8).reshape(2, 4)


def randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, MoRAMatrix):
            module.weight.data.copy_(torch.randn(module.weight.shape, generator=g) * 0.1)
    return model


def adapted(**kwargs) -> Tiny:
    return randomize(mk.apply_mora(Tiny(**kwargs), ["q_proj", "v_proj"], r=2, mora_type=1))


def two_adapters() -> Tiny:
    model = adapted()
    mk.apply_mora(model, ["q_proj"], r=2, adapter_name="b")
    return randomize(model, 2)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))


def fail_on_call(monkeypatch, owner, attribute: str, call: int) -> list[int]:
    """Make ``owner.attribute`` raise on its ``call``-th call: a failure the operation cannot foresee. Returns the
    call counter (one item)."""
    original = getattr(owner, attribute)
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, failing)
    return calls


def peft():
    pytest.importorskip("peft")
    import mora_kernels.peft_integration as mkp

    return mkp


# --- checkpoints: a good one, then spoiled copies
def good_checkpoint(tmp_path) -> str:
    path = tmp_path / "good"
    if not path.exists():
        mk.save_adapter(adapted(), path)
    return str(path)


def spoiled(tmp_path, spoil) -> tuple[str, str, str]:
    """A copy of the good checkpoint changed by ``spoil(folder)``; returns (folder, config file, weights file)."""
    path = tmp_path / "bad"
    shutil.copytree(good_checkpoint(tmp_path), path)
    spoil(path)
    return str(path), str(path / "adapter_config.json"), str(path / "adapter_model.safetensors")


def edit_config(change):
    def spoil(path):
        config = json.loads((path / "adapter_config.json").read_text())
        change(config)
        (path / "adapter_config.json").write_text(json.dumps(config))

    return spoil


def edit_weights(change):
    def spoil(path):
        weights = load_file(path / "adapter_model.safetensors")
        change(weights)
        save_file(weights, path / "adapter_model.safetensors")

    return spoil


def write_bytes(name: str, data: bytes):
    return lambda path: (path / name).write_bytes(data)


def as_bin(obj):
    """Replace the safetensors file by a torch.save'd ``.bin`` holding ``obj``."""

    def spoil(path):
        os.remove(path / "adapter_model.safetensors")
        torch.save(obj, path / "adapter_model.bin")

    return spoil


def bin_bytes(data: bytes):
    def spoil(path):
        os.remove(path / "adapter_model.safetensors")
        (path / "adapter_model.bin").write_bytes(data)

    return spoil


class _Exploit:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


Q = "base_model.model.block.q_proj"
RANDOM_BYTES = random.Random(0).randbytes(300)


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _nan(weights):
    M = weights[f"{Q}.lora_A.weight"].clone()
    M[0, 0] = float("nan")
    weights[f"{Q}.lora_A.weight"], weights[f"{Q}.lora_B.weight"] = M, M.clone()


def _move(new_prefix):
    def change(weights):
        for part in ("lora_A", "lora_B"):
            weights[f"{new_prefix}.{part}.weight"] = weights.pop(f"{Q}.{part}.weight")

    return change


# (spoil, exception, which file the message must name: "config", "weights", "bin" or "folder", and a regex)
CHECKPOINTS = {
    "config missing": (lambda p: os.remove(p / "adapter_config.json"), FileNotFoundError, "folder",
                       "no adapter_config"),
    "config zero bytes": (write_bytes("adapter_config.json", b""), ValueError, "config", "malformed JSON"),
    "config malformed": (write_bytes("adapter_config.json", b'{"r": '), ValueError, "config", "malformed JSON"),
    "config a list": (write_bytes("adapter_config.json", b"[1, 2]"), ValueError, "config", "expected a JSON object"),
    "config a string": (write_bytes("adapter_config.json", b'"LORA"'), ValueError, "config", "JSON object"),
    "config not UTF-8": (write_bytes("adapter_config.json", b'{"r": "\xff\xfe"}'), ValueError, "config", "UTF-8"),
    "config deeply nested": (write_bytes("adapter_config.json", b"[" * 100000), ValueError, "config", "JSON"),
    "config mora_type superscript": (edit_config(_set("mora_type", "²")), TypeError, "config", "mora_type"),
    "config mora_type 5": (edit_config(_set("mora_type", 5)), ValueError, "config", "mora_type"),
    "config r beyond int64": (edit_config(_set("r", 2**70)), ValueError, "config", "r must be"),
    "config r string": (edit_config(_set("r", "2")), ValueError, "config", "r must be"),
    "config scaling NaN": (edit_config(_set("mora_scaling", float("nan"))), ValueError, "config", "mora_scaling"),
    "config target_modules int": (edit_config(_set("target_modules", 3)), ValueError, "config", "target_modules"),
    "config target_modules bad regex": (edit_config(_set("target_modules", "(")), ValueError, "config",
                                        "target_modules"),
    "config target names embedding": (edit_config(_set("target_modules", ["q_proj", "v_proj", "embed"])), TypeError,
                                      "config", "'embed'"),
    "config bias unknown to LoRA": (edit_config(_set("bias", "nonM")), ValueError, "config", "bias must be 'none'"),
    # (only mk.load_adapter: the PEFT loaders load trained biases as PEFT does for LoRA, test_peft_parity::test_bias)
    "config bias all": (edit_config(_set("bias", "all")), ValueError, "config", "bias must be 'none'"),
    # DoRA without its magnitude vectors (use_dora is supported: tests/test_dora.py), or with a bad flag
    "config use_dora without vectors": (edit_config(_set("use_dora", True)), ValueError, "weights",
                                        "use_dora: .*lora_magnitude_vector must be a vector .* got none"),
    "config use_dora string": (edit_config(_set("use_dora", "yes")), ValueError, "config", "use_dora must be true"),
    "config r contradicts the shapes": (edit_config(_set("r", 4)), ValueError, "weights", r"expected shape"),
    "weights missing": (lambda p: os.remove(p / "adapter_model.safetensors"), FileNotFoundError, "folder",
                        "no adapter_model"),
    "safetensors zero bytes": (write_bytes("adapter_model.safetensors", b""), ValueError, "weights", "safetensors"),
    "safetensors truncated": (
        lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:-50]),
        ValueError, "weights", "safetensors"),
    "safetensors random bytes": (write_bytes("adapter_model.safetensors", RANDOM_BYTES), ValueError, "weights",
                                 "safetensors"),
    "safetensors huge header length": (write_bytes("adapter_model.safetensors", (2**62).to_bytes(8, "little") + b"{}"),
                                       ValueError, "weights", "safetensors"),
    "bin random bytes": (bin_bytes(RANDOM_BYTES), ValueError, "bin", "not a readable file"),
    "bin zero bytes": (bin_bytes(b""), ValueError, "bin", "not a readable file"),
    "bin a list": (as_bin([torch.zeros(2, 2)]), ValueError, "bin", "expected a dict"),
    "bin an int": (as_bin(3), ValueError, "bin", "expected a dict"),
    "bin non-string keys": (as_bin({1: torch.zeros(2, 2)}), ValueError, "bin", "keys must be str"),
    "bin a non-tensor value": (as_bin({f"{Q}.lora_A.weight": 3}), ValueError, "bin", "expected a dense tensor"),
    "bin a sparse tensor": (as_bin({f"{Q}.lora_A.weight": torch.eye(26).to_sparse()}), ValueError, "bin",
                            "dense tensor"),
    "key empty module name": (edit_weights(_move("base_model.model.")), ValueError, "weights", "empty module name"),
    "key empty name part": (edit_weights(_move("base_model.model.block..q_proj")), ValueError, "weights",
                            "empty module name"),
    "key the root module": (edit_weights(_move("base_model.model")), ValueError, "weights", "empty module name"),
    "key an embedding": (edit_weights(_move("base_model.model.embed")), TypeError, "weights",
                         r"base_model\.model\.embed\.lora_A\.weight: module 'embed' cannot hold"),
    "key an unknown module": (edit_weights(_move("base_model.model.block.k_proj")), ValueError, "weights",
                              "no module 'block.k_proj'"),
    "key an unknown prefix": (edit_weights(_set("model.block.q_proj.lora_A.weight", torch.zeros(2, 2))), ValueError,
                              "weights", "unexpected key"),
    "key inside a linear": (edit_weights(_move(f"{Q}.weight")), ValueError, "weights", "no module|points inside"),
    "NaN in M": (edit_weights(_nan), ValueError, "weights", "NaN"),
    "lora_A and lora_B differ": (edit_weights(lambda w: w.__setitem__(f"{Q}.lora_B.weight",
                                                                       w[f"{Q}.lora_B.weight"] + 1)),
                                 ValueError, "weights", "lora_A and lora_B differ"),
    "integer M": (edit_weights(lambda w: w.update({k: v.to(torch.int32) for k, v in w.items()})), TypeError,
                  "weights", "must be float64, float32, float16 or bfloat16, got torch.int32"),
    "M not square": (edit_weights(lambda w: w.update({k: v[:, :-1].contiguous() for k, v in w.items()})), ValueError,
                     "weights", r"square \(R, R\)"),
    "a target without M": (edit_weights(lambda w: [w.pop(k) for k in list(w) if "v_proj" in k]), ValueError,
                           "weights", "has no M for"),
}

LOADERS = ["load_adapter", "peft from_pretrained", "peft load_adapter"]


def _loader(name, tmp_path):
    """(model to watch, load(path)) for each loading path."""
    if name == "load_adapter":
        model = Tiny()
        return model, lambda path: mk.load_adapter(model, path)
    mkp = peft()
    if name == "peft from_pretrained":
        model = Tiny()
        return model, lambda path: mkp.from_pretrained(model, path)
    model = mkp.from_pretrained(Tiny(), good_checkpoint(tmp_path))
    return model, lambda path: mkp.load_adapter(model, path, "b")


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_hostile_checkpoint(case, loader, tmp_path):
    spoil, error, names, message = CHECKPOINTS[case]
    if case == "config bias all" and loader != "load_adapter":
        pytest.skip("the PEFT loaders load bias='all' as PEFT does for LoRA (tested in test_peft_parity.py)")
    model, load = _loader(loader, tmp_path)
    folder, config, weights = spoiled(tmp_path, spoil)
    named = dict(config=config, weights=weights, bin=weights.replace(".safetensors", ".bin"), folder=folder)[names]
    before = fingerprint(model)
    with pytest.raises(error) as info:
        load(folder)
    assert named in str(info.value), f"the message does not name {named}: {info.value}"
    # matched without the path, which holds the test's name
    assert re.search(message, str(info.value).replace(folder, "<folder>")), info.value
    assert "weights_only=False" not in str(info.value)
    assert_unchanged(before, fingerprint(model))


@pytest.mark.parametrize("loader", LOADERS)
def test_a_hostile_pickle_is_never_run(loader, tmp_path):
    marker = tmp_path / "pwned"
    model, load = _loader(loader, tmp_path)
    folder, _, weights = spoiled(tmp_path, bin_bytes(pickle.dumps({f"{Q}.lora_A.weight": _Exploit(str(marker))})))
    before = fingerprint(model)
    with pytest.raises(ValueError, match="nothing in it is unpickled") as info:
        load(folder)
    assert weights.replace(".safetensors", ".bin") in str(info.value)
    assert "weights_only=False" not in str(info.value)
    assert not marker.exists()
    assert_unchanged(before, fingerprint(model))


@pytest.mark.parametrize("loader", ["load_adapter", "peft load_adapter"])
def test_key_inside_an_adapter_layer(loader, tmp_path):
    """A key that lands inside an existing MoRA layer would nest an adapter in it."""
    inner = {"load_adapter": "base", "peft load_adapter": "base_layer"}[loader]
    if loader == "load_adapter":
        model = adapted()
        load = lambda path: mk.load_adapter(model, path, "b")  # noqa: E731
    else:
        model, load = _loader(loader, tmp_path)
    folder, _, weights = spoiled(tmp_path, edit_weights(_move(f"{Q}.{inner}")))
    before = fingerprint(model)
    with pytest.raises(ValueError, match="points inside the adapter layer 'block.q_proj'") as info:
        load(folder)
    assert weights in str(info.value)
    assert_unchanged(before, fingerprint(model))


# --- model edits: (build the model, the call, exception, regex that names the argument)
def _inject(owner, attribute, call, action):
    """Row helper: ``action`` with ``owner.attribute`` failing on its ``call``-th call."""
    return ("inject", owner, attribute, call, action)


def _tied_head():
    model = Tiny(tied=True)
    mk.apply_mora(model, ["head"], r=2)
    return randomize(model)


def _shared_parameter():
    model = mlp()
    model[2].weight = model[0].weight
    return randomize(mk.apply_mora(model, ["0"], r=2))


def _shared_module():
    torch.manual_seed(0)
    linear = nn.Linear(32, 32)
    model = nn.Sequential(linear, nn.ReLU(), linear)  # one Linear at two places: adapted once, held twice
    return randomize(mk.apply_mora(model, ["0"], r=2))


def _merged(model):
    model.block.q_proj.merge()
    return model


def _all_merged(model):
    for _, layer in mk.adapters.mora_layers(model):
        layer.merge()
    return model


def _peft_model():
    mkp = peft()
    return randomize(mkp.from_pretrained(Tiny(), _CHECKPOINT_DIR[0], is_trainable=True))


_CHECKPOINT_DIR = [None]  # the good checkpoint of the running test (rows are built at import time)


EDITS = {
    # apply_mora / replace_linears / MoRALinear
    "apply_mora: adapter exists on one target": (
        lambda: randomize(mk.apply_mora(Tiny(), ["v_proj"], r=2)),
        lambda m: mk.apply_mora(m, ["q_proj", "v_proj"], r=2), ValueError, r"adapter_name.*'default'.*block\.v_proj"),
    "apply_mora: second layer refuses r": (
        lambda: nn.Sequential(nn.Linear(32, 32), nn.Linear(1, 1)),
        lambda m: mk.apply_mora(m, ["0", "1"], 1, 6), ValueError, r"r=1 is too small.*layer '1'"),
    "replace_linears: second layer refuses r": (
        lambda: nn.Sequential(nn.Linear(32, 32), nn.Linear(1, 1)),
        lambda m: mk.replace_linears(m, ["0", "1"], 1, 6), ValueError, "r=1 is too small"),
    "apply_mora: r=0": (Tiny, lambda m: mk.apply_mora(m, ["q_proj", "v_proj"], r=0), ValueError, "r must be >= 1"),
    "apply_mora: r float": (Tiny, lambda m: mk.apply_mora(m, ["q_proj"], r=2.0), TypeError, "r must be a positive int"),
    "apply_mora: mora_type superscript": (Tiny, lambda m: mk.apply_mora(m, ["q_proj"], 2, "²"), TypeError,
                                          "mora_type must be one of"),
    "apply_mora: target is an embedding": (Tiny, lambda m: mk.apply_mora(m, ["q_proj", "embed"], r=2), TypeError,
                                           r"target_modules: module 'embed'.*Embedding"),
    "apply_mora: adapter name with a dot": (Tiny, lambda m: mk.apply_mora(m, ["q_proj"], 2, adapter_name="a.b"),
                                            ValueError, "adapter_name"),
    "apply_mora: adapter name None": (Tiny, lambda m: mk.apply_mora(m, ["q_proj"], 2, adapter_name=None), TypeError,
                                      "adapter_name"),
    "apply_mora: integer dtype": (Tiny, lambda m: mk.apply_mora(m, ["q_proj"], 2, dtype=torch.int8), TypeError,
                                  "dtype must be"),
    "apply_mora: unknown backend": (Tiny, lambda m: mk.apply_mora(m, ["q_proj"], 2, backend="tpu"), ValueError,
                                    "backend must be one of"),
    "apply_mora: targets a dict": (Tiny, lambda m: mk.apply_mora(m, 3, 2), TypeError, "target_modules"),
    "apply_mora: model not a module": (lambda: None, lambda m: mk.apply_mora("model", ["q_proj"], 2), TypeError,
                                       "model must be a torch.nn.Module"),
    "apply_mora: failure in the second layer": (
        Tiny, _inject(MoRAMatrix, "__init__", 2, lambda m: mk.apply_mora(m, ["q_proj", "v_proj"], r=2)),
        RuntimeError, "injected failure"),
    "apply_mora: failure adding to existing layers": (
        adapted, _inject(MoRAMatrix, "__init__", 2, lambda m: mk.apply_mora(m, ["q_proj", "v_proj"], 2,
                                                                            adapter_name="c")),
        RuntimeError, "injected failure"),
    "replace_linears: failure in the second layer": (
        Tiny, _inject(MoRAMatrix, "__init__", 2, lambda m: mk.replace_linears(m, ["q_proj", "v_proj"], r=2)),
        RuntimeError, "injected failure"),
    "MoRALinear: r=0": (lambda: nn.Linear(32, 32), lambda m: MoRALinear(m, 0), ValueError, "r must be >= 1"),
    "MoRALinear: bad mora_type": (lambda: nn.Linear(32, 32), lambda m: MoRALinear(m, 2, "²"), TypeError, "mora_type"),
    "MoRALinear: bad dropout": (lambda: nn.Linear(32, 32), lambda m: MoRALinear(m, 2, dropout=1.5), ValueError,
                                "dropout"),
    "MoRALinear: bad adapter name": (lambda: nn.Linear(32, 32), lambda m: MoRALinear(m, 2, adapter_name=""),
                                     ValueError, "adapter_name"),
    # load_adapter: failures the checks cannot foresee
    "load_adapter: failure in the second layer": (
        Tiny, _inject(MoRAMatrix, "__init__", 2, lambda m: mk.load_adapter(m, _CHECKPOINT_DIR[0])),
        RuntimeError, "injected failure"),
    "load_adapter: failure into an existing adapter": (
        adapted, _inject(MoRAMatrix, "__init__", 2, lambda m: mk.load_adapter(m, _CHECKPOINT_DIR[0], "c")),
        RuntimeError, "injected failure"),
    "load_adapter: over a merged adapter": (
        lambda: _merged(adapted()), lambda m: mk.load_adapter(m, _CHECKPOINT_DIR[0]), ValueError,
        "adapter 'default' is merged into layer 'block.q_proj'"),
    "load_adapter: path an int": (Tiny, lambda m: mk.load_adapter(m, 3), TypeError, "path must be"),
    "load_adapter: adapter name with a dot": (Tiny, lambda m: mk.load_adapter(m, _CHECKPOINT_DIR[0], "a.b"),
                                              ValueError, "adapter_name"),
    # set_adapter / delete_adapter / disable_adapters / adapter_per_row
    "set_adapter: None": (two_adapters, lambda m: mk.set_adapter(m, None), TypeError, "adapter_name"),
    "set_adapter: an int": (two_adapters, lambda m: mk.set_adapter(m, 3), TypeError, "adapter_name"),
    "set_adapter: an int in a list": (two_adapters, lambda m: mk.set_adapter(m, ["b", 3]), TypeError,
                                      "adapter_name"),
    "set_adapter: unknown name": (two_adapters, lambda m: mk.set_adapter(m, ["b", "nope"]), ValueError,
                                  "adapter_name: unknown adapter"),
    "set_adapter: empty list": (two_adapters, lambda m: mk.set_adapter(m, []), ValueError, "adapter_name"),
    "set_adapter: failure unmerging a merged layer": (
        lambda: _all_merged(two_adapters()), _inject(MoRAMatrix, "delta_weight", 2, lambda m: mk.set_adapter(m, "b")),
        RuntimeError, "injected failure"),
    "delete_adapter: the only adapter of one layer": (
        two_adapters, lambda m: mk.delete_adapter(m, "default"), ValueError,
        r"adapter_name: adapter 'default' is the only adapter of layers \['block.v_proj'\]"),
    "delete_adapter: merged": (lambda: _merged(two_adapters()), lambda m: mk.delete_adapter(m, "default"), ValueError,
                               "adapter_name: adapter 'default' is merged"),
    "delete_adapter: None": (two_adapters, lambda m: mk.delete_adapter(m, None), TypeError, "adapter_name"),
    "delete_adapter: unknown": (two_adapters, lambda m: mk.delete_adapter(m, "zz"), ValueError, "adapter_name"),
    "delete_adapter: failure in the second layer": (
        lambda: mk.apply_mora(two_adapters(), ["v_proj"], 2, adapter_name="b"),
        _inject(MoRALinear, "delete_adapter", 2, lambda m: mk.delete_adapter(m, "b")),
        RuntimeError, "injected failure"),
    "disable_adapters: failure unmerging": (
        lambda: _all_merged(adapted()), _inject(MoRAMatrix, "delta_weight", 2,
                                                lambda m: mk.disable_adapters(m).__enter__()),
        RuntimeError, "injected failure"),
    "adapter_per_row: a str": (two_adapters, lambda m: mk.adapter_per_row(m, "bb").__enter__(), TypeError,
                               "adapter_names"),
    "adapter_per_row: unknown name": (two_adapters, lambda m: mk.adapter_per_row(m, ["b", "x"]).__enter__(),
                                      ValueError, "adapter_names"),
    # merge
    "merge: tied head and embedding": (_tied_head, mk.merge, ValueError,
                                       r"layer 'head' is shared with \['embed.weight'\] \(tied weights\)"),
    "merge: one Parameter in two Linears": (_shared_parameter, mk.merge, ValueError,
                                            r"layer '0' is shared with \['2.weight'\]"),
    "merge: one Linear at two places": (_shared_module, mk.merge, ValueError,
                                        r"layer '0' is shared with \['2.weight'\]"),
    "merge: failure in the second layer": (
        adapted, _inject(MoRAMatrix, "delta_weight", 2, mk.merge), RuntimeError, "injected failure"),
    "merge: model not a module": (lambda: None, lambda m: mk.merge([1]), TypeError, "model must be"),
    "layer merge: safe_merge refuses the second adapter": (
        lambda: _nonfinite_second(two_adapters()),
        lambda m: m.block.q_proj.merge(safe_merge=True, adapter_names=["default", "b"]), ValueError,
        "adapter 'b' would make the base weight non-finite"),
    "layer unmerge: failure in the second adapter": (
        lambda: _both_merged(two_adapters()),
        _inject(MoRAMatrix, "delta_weight", 2, lambda m: m.block.q_proj.unmerge()), RuntimeError, "injected failure"),
    # ReMoRA
    "restart: optimizer not an optimizer": (adapted, lambda m: restart(m, optimizer=3), TypeError, "optimizer must be"),
    "restart: one layer merged": (lambda: _merged(adapted()), restart, ValueError,
                                  r"model: layers \['block.q_proj'\] have merged adapters"),
    "restart: tied head": (_tied_head, restart, ValueError, "layer 'head' is shared with"),
    "restart: failure in the second layer": (
        adapted, _inject(MoRAMatrix, "delta_weight", 2, restart), RuntimeError, "injected failure"),
    "restart: failure switching types": (
        adapted, _inject(MoRAMatrix, "set_type", 2, restart), RuntimeError, "injected failure"),
    "ReMoRA: optimizer a string": (adapted, lambda m: ReMoRA(m, 1, optimizer="adam"), TypeError, "optimizer must be"),
    "ReMoRA.step: one layer merged": (lambda: _merged(adapted()), lambda m: ReMoRA(m, 1).step(), ValueError,
                                      "have merged adapters"),
    # PEFT path
    "peft from_pretrained: failure in the second layer": (
        Tiny, _inject("mora_kernels.peft_integration:MoRAPeftLinear", "update_layer", 2,
                      lambda m: peft().from_pretrained(m, _CHECKPOINT_DIR[0])),
        RuntimeError, "injected failure"),
    "peft load_adapter: failure in PEFT's load": (
        _peft_model, _inject("peft.peft_model", "set_peft_model_state_dict", 1,
                             lambda m: peft().load_adapter(m, _CHECKPOINT_DIR[0], "b")),
        RuntimeError, "injected failure"),
    "peft load_adapter: existing name": (_peft_model, lambda m: peft().load_adapter(m, _CHECKPOINT_DIR[0], "default"),
                                         ValueError, "'default'"),
    "peft from_pretrained: adapter name with a dot": (
        Tiny, lambda m: peft().from_pretrained(m, _CHECKPOINT_DIR[0], adapter_name="a.b"), ValueError, "adapter_name"),
    "peft load_adapter: adapter name None": (
        _peft_model, lambda m: peft().load_adapter(m, _CHECKPOINT_DIR[0], None), TypeError, "adapter_name"),
    "peft load_adapter: not a PeftModel": (Tiny, lambda m: peft().load_adapter(m, _CHECKPOINT_DIR[0], "b"), TypeError,
                                           "peft_model must be"),
    "peft restart: failure in the second layer": (
        _peft_model, _inject(MoRAMatrix, "delta_weight", 2, restart), RuntimeError, "injected failure"),
}


def _both_merged(model):
    model.block.q_proj.merge(adapter_names=["default", "b"])
    return model


def _nonfinite_second(model):
    model.block.q_proj.adapters["b"].weight.data.fill_(3e38)
    return model


def _resolve(owner):
    """``owner``, or the module (``"pkg.mod"``) or class (``"pkg.mod:Class"``) it names; such rows need peft."""
    if not isinstance(owner, str):
        return owner
    peft()
    module, _, name = owner.partition(":")
    resolved = importlib.import_module(module)
    return getattr(resolved, name) if name else resolved


@pytest.mark.parametrize("case", list(EDITS))
def test_model_edit_is_all_or_nothing(case, tmp_path, monkeypatch):
    build, action, error, message = EDITS[case]
    _CHECKPOINT_DIR[0] = good_checkpoint(tmp_path)
    model = build()
    before = fingerprint(model)
    if isinstance(action, tuple):  # a failure injected half way
        _, owner, attribute, call, action = action
        fail_on_call(monkeypatch, _resolve(owner), attribute, call)
    with pytest.raises(error, match=message):
        action(model)
    assert_unchanged(before, fingerprint(model))


# --- no silent wrong result
def test_merge_of_an_untied_head_keeps_the_embedding():
    """The tied case is refused (table above); untied, the merge folds only into the head and keeps the output."""
    model = Tiny(tied=True).double()
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())  # untie explicitly
    randomize(mk.apply_mora(model, ["head", "q_proj"], r=2, dtype=torch.float64))
    embedding = model.embed.weight.detach().clone()
    with torch.no_grad():
        expected = model(IDS)
        merged = mk.merge(model)(IDS)
    assert torch.equal(model.embed.weight, embedding)
    assert type(model.head) is nn.Linear
    # float64 throughout: the merged and unmerged forwards differ by the rounding of reordered sums (~1e-16)
    torch.testing.assert_close(merged, expected, atol=1e-12, rtol=0)


def test_backward_through_a_merged_layer_says_it_is_merged():
    layer = MoRALinear(nn.Linear(32, 24), r=2)
    layer.M.data.normal_()
    layer.merge()
    x = torch.randn(3, 32, requires_grad=True)
    with pytest.raises(ValueError, match=r"merged MoRA layer: adapter\(s\) \['default'\] are merged"):
        layer(x).sum().backward()
    layer.M.requires_grad_(False)  # a frozen M: the gradient to x through the merged weight is right
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.base.weight.sum(0).expand(3, 32))
    layer.M.requires_grad_(True)
    layer.unmerge()
    layer(x).sum().backward()
    assert layer.M.grad is not None


def test_a_failed_restart_keeps_the_optimizer_state_and_the_step_count(monkeypatch):
    model = adapted()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = {id(p): s["momentum_buffer"].clone() for p, s in optimizer.state.items()}
    assert len(state) == 2
    remora = ReMoRA(model, every=1, optimizer=optimizer)
    fail_on_call(monkeypatch, MoRAMatrix, "delta_weight", 2)
    with pytest.raises(RuntimeError, match="injected failure"):
        remora.step()
    assert remora.steps == 0
    kept = {id(p): s["momentum_buffer"] for p, s in optimizer.state.items()}
    assert state.keys() == kept.keys() and all(torch.equal(state[k], kept[k]) for k in state)
    monkeypatch.undo()
    assert remora.step() and remora.steps == 1
    assert not any(p in optimizer.state for p in optimizer.param_groups[0]["params"])


@pytest.mark.parametrize(
    "shape, stride, overlaps",
    [
        ((4, 6), (6, 1), False),  # contiguous
        ((4, 6), (1, 4), False),  # transposed
        ((4, 6), (12, 2), False),  # every other column of every other row
        ((4, 6), (0, 1), True),  # expand()
        ((4, 6), (3, 1), True),  # rows overlap by half
        ((4, 6), (1, 1), True),  # a sliding window
        ((2, 3, 4), (1, 8, 2), False),  # permuted dims, disjoint
        ((3, 2), (2, 3), True),  # disjoint but interleaved (0 2 4 / 3 5 7): refused, only nested layouts pass
    ],
)
def test_overlapping_inplace_base_is_refused(shape, stride, overlaps):
    """Brute force on the offsets: a base ``inplace=True`` accepts has distinct elements, and the sum is right."""
    from mora_kernels.core import overlaps_itself

    base = torch.zeros(100).as_strided(shape, stride)
    offsets = torch.zeros(100, dtype=torch.long).index_put_(
        (torch.arange(100).as_strided(shape, stride).flatten(),), torch.tensor(1), accumulate=True)
    assert overlaps_itself(base) == overlaps
    if not overlaps:
        assert offsets.max() <= 1
    x, M = torch.randn(*shape[:-1], 40), torch.randn(16, 16)
    if overlaps:
        with pytest.raises(ValueError, match="base: inplace=True needs a base whose elements do not overlap"):
            mk.mora(x, M, shape[-1], 1, base=base, inplace=True)
    else:
        expected = mk.mora(x, M, shape[-1], 1, base=base.clone())
        assert mk.mora(x, M, shape[-1], 1, base=base, inplace=True) is base
        torch.testing.assert_close(base, expected, atol=0, rtol=0)


def test_slices_of_one_fused_weight_merge():
    """Two Linears whose weights are disjoint slices of one tensor (a fused qkv) share a storage, not elements."""
    torch.manual_seed(0)
    fused = torch.randn(64, 32, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)).double()
    model[0].weight, model[1].weight = nn.Parameter(fused[:32]), nn.Parameter(fused[32:])
    randomize(mk.apply_mora(model, ["0"], r=2, dtype=torch.float64))
    second = model[1].weight.detach().clone()
    x = torch.randn(3, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model[0](x)
        mk.merge(model)
        torch.testing.assert_close(model[0](x), expected, atol=1e-12, rtol=0)  # float64: reordered sums only
    assert torch.equal(model[1].weight, second)


def test_peft_config_errors_name_the_file(tmp_path):
    """A field that only PEFT's LoraConfig checks (and refuses) is reported with the config file's name."""
    mkp = peft()
    for change, message in [(_set("layers_pattern", "layers"), "layers_to_transform"),
                            (lambda c: c.pop("target_modules"), "target_modules is missing")]:
        folder, config, _ = spoiled(tmp_path / message, edit_config(change))
        with pytest.raises(ValueError, match=message) as info:
            mkp.load_config(folder)
        assert config in str(info.value)


# --- every model edit x a failure at every point it can be made to fail
SWEEP_OPERATIONS = {
    "apply_mora": (Tiny, lambda m: mk.apply_mora(m, ["q_proj", "v_proj", "o_proj"], 2)),
    "apply_mora onto adapted layers": (adapted, lambda m: mk.apply_mora(m, ["q_proj", "v_proj"], 2, adapter_name="c")),
    "replace_linears": (Tiny, lambda m: mk.replace_linears(m, ["q_proj", "v_proj"], 2)),
    "load_adapter": (Tiny, lambda m: mk.load_adapter(m, _CHECKPOINT_DIR[0])),
    "load_adapter over an adapter": (adapted, lambda m: mk.load_adapter(m, _CHECKPOINT_DIR[0])),
    "merge": (two_adapters, mk.merge),
    "restart": (two_adapters, restart),
    "set_adapter unmerging": (lambda: _all_merged(two_adapters()), lambda m: mk.set_adapter(m, "b")),
    "delete_adapter": (lambda: mk.apply_mora(two_adapters(), ["v_proj"], 2, adapter_name="b"),
                       lambda m: mk.delete_adapter(m, "b")),
    "peft from_pretrained": (Tiny, lambda m: peft().from_pretrained(m, _CHECKPOINT_DIR[0])),
    "peft load_adapter": (_peft_model, lambda m: peft().load_adapter(m, _CHECKPOINT_DIR[0], "b")),
    "peft restart": (_peft_model, restart),
}
SWEEP_POINTS = [(MoRAMatrix, "__init__"), (MoRAMatrix, "delta_weight"), (torch.Tensor, "copy_"),
                (nn.Module, "requires_grad_"), (nn.Module, "add_module"), (nn.Module, "__setattr__")]


@pytest.mark.parametrize("operation", list(SWEEP_OPERATIONS))
def test_a_failure_anywhere_leaves_the_model_as_it_was(operation, tmp_path, monkeypatch):
    """For each point, the operation fails at the point's 1st, 2nd, ... call (until it no longer reaches that
    call): the model must come back bit for bit each time."""
    build, action = SWEEP_OPERATIONS[operation]
    _CHECKPOINT_DIR[0] = good_checkpoint(tmp_path)
    failed = []
    for owner, attribute in SWEEP_POINTS:
        for call in range(1, 5):
            model = build()
            before = fingerprint(model)
            calls = fail_on_call(monkeypatch, owner, attribute, call)
            try:
                action(model)
            except RuntimeError as error:
                assert "injected failure" in str(error)
                failed.append((attribute, call))
            finally:
                monkeypatch.undo()
            if calls[0] < call:
                break  # completed without reaching the call
            assert_unchanged(before, fingerprint(model))
    assert len(failed) >= 3, f"too few failure points reached: {failed}"


def test_a_non_finite_matrix_is_not_saved(tmp_path):
    """Every loader refuses a NaN or inf M, so saving one would write a checkpoint that cannot be read back."""
    model = adapted()
    model.block.v_proj.M.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"adapter 'default' holds NaN or inf on layers \['block.v_proj'\]"):
        mk.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_some_layers_loads_through_every_path(tmp_path):
    """PEFT's layers_to_transform / exclude_modules narrow target_modules: such a checkpoint holds M only for the
    layers they leave, and must load (the check that every target has an M leaves them to the keys)."""
    model = randomize(mk.apply_mora(Tiny(), ["q_proj"], r=2))
    folder = tmp_path / "partial"
    mk.save_adapter(model, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with torch.no_grad():
        expected = model(IDS)
        torch.testing.assert_close(mk.load_adapter(Tiny(), folder)(IDS), expected, atol=0, rtol=0)
        mkp = peft()
        torch.testing.assert_close(mkp.from_pretrained(Tiny(), folder)(IDS), expected, atol=0, rtol=0)
