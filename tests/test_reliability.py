"""Nothing silently stale, nothing lost on disk: the cases of issue 18 (docs/reliability.md).

Mixed batches that follow every write to M, float64 bases kept exact, whole-or-nothing files, quantized merges
that leave the base byte-identical, nesting ``disable_adapters``, clear errors instead of crashes, and per-row
adapter selection that concurrent threads do not share. Every row failed before its fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import mora_kernels as mk
from mora_kernels import files, tuning
from mora_kernels.layer import MoRALinear

from .test_adversarial import IDS, Tiny, assert_unchanged, fingerprint, randomize, two_adapters

N, M_OUT = 32, 24


# --- 1. mixed batches never use a stale copy of M
def _mixed_layer() -> MoRALinear:
    torch.manual_seed(0)
    layer = MoRALinear(nn.Linear(N, M_OUT), r=2, mora_type=1, backend="reference")
    layer.add_adapter("b", r=2, mora_type=1)
    for adapter in layer.adapters.values():
        nn.init.normal_(adapter.weight, std=0.3)
    return layer.eval()


def _per_row_expected(layer: MoRALinear, x: torch.Tensor, rows: list[str]) -> torch.Tensor:
    out = []
    for i, name in enumerate(rows):
        a = layer.adapters[name]
        out.append(mk.mora(x[i], a.weight, M_OUT, a.mora_type, scaling=layer.scalings[name], base=layer.base(x[i]),
                           backend="reference"))
    return torch.stack(out)


def _fused_adamw(layer):
    layer.set_adapter(["default", "b"])
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True)
    loss = layer(torch.randn(4, N)).square().sum()
    loss.backward()
    optimizer.step()


def _foreach_sgd(layer):
    layer.set_adapter(["default", "b"])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5, foreach=True)
    layer(torch.randn(4, N)).square().sum().backward()
    optimizer.step()


def _data_write(layer):
    layer.adapters["b"].weight.data.copy_(torch.randn_like(layer.adapters["b"].weight))


def _data_assign(layer):
    layer.adapters["b"].weight.data = torch.randn_like(layer.adapters["b"].weight)


def _load_state_dict(layer):
    state = {k: torch.randn_like(v) if k.endswith(".weight") and "adapters" in k else v
             for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)


@pytest.mark.parametrize("change", [_fused_adamw, _foreach_sgd, _data_write, _data_assign, _load_state_dict])
def test_a_mixed_batch_uses_the_current_matrices(change):
    """Whatever changed M (fused optimizers bump no version counter, ``.data`` has its own), the next mixed batch
    computes with the new M: the layer keeps no copy of the stacked matrices between calls."""
    layer = _mixed_layer()
    x = torch.randn(3, 2, N)
    rows = ["b", "default", "b"]
    with torch.no_grad():
        layer(x, adapter_names=rows)  # a first inference batch (used to fill the cache)
    change(layer)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, adapter_names=rows), _per_row_expected(layer, x, rows),
                                   rtol=1e-5, atol=1e-5)


# --- 5. float64 base with float32 x and M
@pytest.mark.parametrize("mora_type", [1, 6])
def test_a_float64_base_is_not_rounded_through_float32(mora_type):
    torch.manual_seed(0)
    x = torch.randn(5, N)
    R = mk.r_hat(N, M_OUT, 2, mora_type)
    base = torch.randn(5, M_OUT, dtype=torch.float64) * (1 + 1e-12)
    zeros = torch.zeros(R, R)
    out = mk.mora(x, zeros, M_OUT, mora_type, base=base)
    assert out.dtype == torch.float64 and torch.equal(out, base)
    M = torch.randn(R, R)
    want = base + mk.mora(x.double(), M.double(), M_OUT, mora_type)
    torch.testing.assert_close(mk.mora(x, M, M_OUT, mora_type, base=base), want, rtol=1e-12, atol=1e-12)
    target = base.clone()
    with torch.no_grad():
        mk.mora(x, M, M_OUT, mora_type, base=target, inplace=True)
    torch.testing.assert_close(target, want, rtol=1e-12, atol=1e-12)  # not truncated to float32


def test_mixed_rows_without_adapter_get_the_float64_base_itself():
    torch.manual_seed(0)
    x = torch.randn(4, N)
    R = mk.r_hat(N, M_OUT, 2, 1)
    M = torch.randn(2, R, R)
    base = torch.randn(4, M_OUT, dtype=torch.float64) * (1 + 1e-12)
    index = torch.tensor([-1, 0, 1, -1])
    out = mk.mora_mixed(x, M, index, M_OUT, 1, base=base)
    assert out.dtype == torch.float64
    assert torch.equal(out[index == -1], base[index == -1])
    for t in (1, 2):
        want = base[t] + mk.mora(x[t].double(), M[index[t]].double(), M_OUT, 1)
        torch.testing.assert_close(out[t], want, rtol=1e-12, atol=1e-12)


# --- 6. files written whole or not at all
def _folder_bytes(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _saved(tmp_path):
    model = two_adapters()
    folder = tmp_path / "adapter"
    mk.save_adapter(model, folder)
    return model, folder


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch, fail_at):
    """A failure while writing the second file (or moving it into place) leaves the folder as it was."""
    model, folder = _saved(tmp_path)
    before = _folder_bytes(folder)
    randomize(model, 7)
    calls = [0]
    original = os.replace if fail_at == 2 else os.fdopen

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(28, "No space left on device (injected)")
        return original(*args, **kwargs)

    monkeypatch.setattr(os, "replace" if fail_at == 2 else "fdopen", failing)
    with pytest.raises(OSError, match="injected"):
        mk.save_adapter(model, folder)
    monkeypatch.undo()
    assert _folder_bytes(folder) == before  # no temporary file left either
    mk.load_adapter(Tiny(), folder)


def test_an_unserializable_config_writes_nothing(tmp_path):
    model, folder = _saved(tmp_path)
    before = _folder_bytes(folder)
    randomize(model, 7)
    model.name_or_path = object()
    with pytest.raises(ValueError, match="save_adapter: the config cannot be written as JSON"):
        mk.save_adapter(model, folder)
    assert _folder_bytes(folder) == before


def test_a_path_as_name_or_path_is_saved_as_its_string(tmp_path):
    model = two_adapters()
    model.name_or_path = tmp_path / "base-model"
    mk.save_adapter(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base-model")


def test_a_symlink_in_the_folder_is_replaced_not_written_through(tmp_path):
    model, folder = _saved(tmp_path)
    outside = tmp_path / "outside.json"
    outside.write_text("keep me")
    os.unlink(folder / "adapter_config.json")
    os.symlink(outside, folder / "adapter_config.json")
    mk.save_adapter(model, folder)
    assert outside.read_text() == "keep me"
    assert not os.path.islink(folder / "adapter_config.json")
    mk.load_adapter(Tiny(), folder)


@pytest.mark.parametrize("hard_links", [True, False])
def test_write_files_puts_the_first_file_back_when_the_second_fails(tmp_path, monkeypatch, hard_links):
    (tmp_path / "a").write_bytes(b"old a")
    if not hard_links:  # a file system without them: the old file is copied aside instead
        monkeypatch.setattr(os, "link", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("no links")))
    calls = [0]
    original = os.replace

    def failing(source, target):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("injected")
        return original(source, target)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        files.write_files({tmp_path / "a": b"new a", tmp_path / "b": b"new b"})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a"] and (tmp_path / "a").read_bytes() == b"old a"


def test_a_failed_install_keeps_the_table(tmp_path, monkeypatch):
    from mora_kernels import autotune

    table = tmp_path / "tuned.json"
    table.write_text(json.dumps({"schema": tuning.SCHEMA, "entries": []}))
    before = table.read_bytes()
    result = tmp_path / "result.json"
    entry = {"gpu": "G", "triton": "3.8", "tiles": {}, "backend": {"dense/float32/few": "triton"}}
    result.write_text(json.dumps({"entry": entry}))
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("injected")))
    with pytest.raises(OSError, match="injected"):
        autotune.install(result, table)
    monkeypatch.undo()
    assert table.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["result.json", "tuned.json"]  # no temporary file left
    autotune.install(result, table)
    assert tuning.load(table)["entries"] == [entry]


def test_a_damaged_table_does_not_stop_the_import(tmp_path, monkeypatch):
    damaged = tmp_path / "tuned.json"
    damaged.write_text('{"schema": 1, "entries": [')
    monkeypatch.setattr(tuning, "TABLE_PATH", damaged)
    with pytest.warns(RuntimeWarning, match=str(damaged).replace("\\", r"\\")):
        table = tuning._load_shipped(damaged)
    assert table == {"schema": tuning.SCHEMA, "entries": []}


# --- 3. quantized merges leave the base byte-identical
def _quantized_layer(kind: str) -> MoRALinear:
    from .quant_helpers import quantize_linear

    torch.manual_seed(0)
    layer = MoRALinear(quantize_linear(nn.Linear(64, 96), kind), r=4, mora_type=1)
    layer.add_adapter("b", r=4, mora_type=1)
    with torch.no_grad():
        for adapter in layer.adapters.values():
            adapter.weight.normal_(0, 0.05)
    return layer


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_quantized_merge_cycles_and_switches_keep_the_base_bytes(kind):
    from .quant_helpers import stored

    layer = _quantized_layer(kind)
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer(x)  # the 8-bit layer moves its codes and scales to the matmul state on the first forward
    original = stored(layer.base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the requantization warning of each merge
        layer.merge()
        with torch.no_grad():
            first = layer(x)
        once = stored(layer.base)
        for _ in range(5):
            layer.unmerge()
            layer.merge()
        assert all(torch.equal(a, b) for a, b in zip(stored(layer.base), once))
        for names in (["b"], ["default"], ["b"], ["default"]):
            layer.set_adapter(names)  # leaving a merged adapter unmerges it
            layer.merge()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
        layer.unmerge()
    assert all(torch.equal(a, b) for a, b in zip(stored(layer.base), original))
    assert "_unmerged_base" not in layer.__dict__ or layer.__dict__["_unmerged_base"] is None


# --- 4. disable_adapters nests and restores exactly
def test_disable_adapters_nests_and_restores_flags():
    model = two_adapters()
    layer = model.block.v_proj
    layer.enable_adapters(False)  # disabled before the block: stays disabled after it
    model.block.q_proj.adapters["default"].weight.requires_grad_(False)  # frozen by the user
    before = fingerprint(model)
    with torch.no_grad():
        base_out = Tiny()(IDS)
    with mk.disable_adapters(model):
        with mk.disable_adapters(model):
            pass
        with torch.no_grad():  # the outer block is still active after the inner one ends
            torch.testing.assert_close(model(IDS), base_out, rtol=0, atol=0)
    assert_unchanged(before, fingerprint(model))


def test_disable_adapters_merges_again_what_was_merged():
    model = two_adapters()
    model.block.q_proj.merge()
    before = fingerprint(model)
    with torch.no_grad():
        merged_out = model(IDS)
    with mk.disable_adapters(model):
        assert not model.block.q_proj.merged_adapters
    assert model.block.q_proj.merged_adapters == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), merged_out, rtol=1e-6, atol=1e-6)
    after = fingerprint(model)
    del before["state"], after["state"]  # the weight is merged again (float32 rounding)
    assert_unchanged(before, after)


# --- 7. clear errors instead of crashes (or the case works)
@pytest.mark.parametrize("name", ["train", "to", "keys", "forward", "half", "type"])
def test_adapter_names_that_are_module_dict_attributes_are_refused(name):
    model = two_adapters()
    before = fingerprint(model)
    with pytest.raises(ValueError, match=f"adapter_name: '{name}' cannot name an adapter"):
        mk.apply_mora(model, ["q_proj"], r=2, adapter_name=name)
    assert_unchanged(before, fingerprint(model))
    with pytest.raises(ValueError, match=f"adapter_name: '{name}' cannot name an adapter"):
        MoRALinear(nn.Linear(8, 8), r=2, adapter_name=name)


def test_multihead_attention_out_proj_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(16, 2))
    with pytest.raises(TypeError, match=r"target_modules: module '0.out_proj' is the output projection of an "
                                        r"nn.MultiheadAttention"):
        mk.apply_mora(model, ["out_proj"], r=2)
    assert type(model[0].out_proj) is not MoRALinear


def test_a_model_that_is_itself_the_only_linear_is_refused():
    model = nn.Linear(16, 16)
    with pytest.raises(ValueError, match="target_modules: matched the model itself"):
        mk.apply_mora(model, ".*", r=2)
    assert not list(model.children())


def test_save_of_a_compiled_model_writes_loadable_keys(tmp_path):
    model = two_adapters()
    compiled = torch.compile(model)
    mk.save_adapter(compiled, tmp_path / "out")
    keys = load_file(tmp_path / "out" / "adapter_model.safetensors").keys()
    assert not any("_orig_mod" in key for key in keys)
    loaded = mk.load_adapter(Tiny(), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_wide_adapter_index_is_refused(dtype):
    R = mk.r_hat(N, M_OUT, 2, 1)
    with pytest.raises(TypeError, match=r"adapter_index must be an integer tensor of dtype int8, int16, int32, int64 "
                                        r"or uint8, got torch\.uint"):
        mk.mora_mixed(torch.randn(3, N), torch.randn(2, R, R), torch.zeros(3, dtype=dtype), M_OUT, 1)


def test_mora_mixed_on_meta_tensors_gives_the_shape():
    R = mk.r_hat(N, M_OUT, 2, 1)
    meta = dict(device="meta")
    out = mk.mora_mixed(torch.empty(3, 5, N, **meta), torch.empty(2, R, R, **meta),
                        torch.empty(3, 5, dtype=torch.long, **meta), M_OUT, 1,
                        base=torch.empty(3, 5, M_OUT, dtype=torch.float64, **meta))
    assert out.device.type == "meta" and out.shape == (3, 5, M_OUT) and out.dtype == torch.float64


def test_save_of_a_meta_model_is_refused(tmp_path):
    with torch.device("meta"):
        model = mk.apply_mora(Tiny(), ["q_proj"], r=2)
    with pytest.raises(ValueError, match=r"save_adapter: adapter 'default' has no values on layers "
                                        r"\['block.q_proj'\] \(meta device\)"):
        mk.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inplace", ["no", 0, None])
def test_mora_mixed_refuses_a_non_bool_inplace(inplace):
    R = mk.r_hat(N, M_OUT, 2, 1)
    base = torch.randn(3, M_OUT)
    before = base.clone()
    with pytest.raises(TypeError, match="inplace must be a bool"):
        mk.mora_mixed(torch.randn(3, N), torch.randn(2, R, R), torch.zeros(3, dtype=torch.long), M_OUT, 1,
                      base=base, inplace=inplace)
    assert torch.equal(base, before)


def test_a_rope_layer_moved_under_inference_mode_still_trains():
    layer = MoRALinear(nn.Linear(N, N), r=4, mora_type=6)
    with torch.inference_mode():
        layer.to(torch.float32)
    assert not layer.rope_cos.is_inference()
    layer(torch.randn(2, N)).sum().backward()
    assert layer.M.grad is not None


def test_deleting_a_selected_adapter_inside_adapter_per_row_raises():
    model = two_adapters()
    with mk.adapter_per_row(model, ["b", "default"]):
        mk.delete_adapter(model, "b")
        with pytest.raises(RuntimeError, match=r"adapter_per_row: adapter\(s\) \['b'\] were deleted from layer "
                                               r"'block.q_proj'"):
            model(IDS)


# --- 2. per-row selection belongs to the call: threads do not share it
def _serve(model, rows, barrier, results, key):
    barrier.wait()
    with torch.no_grad():  # grad mode is per thread
        for _ in range(30):
            with mk.adapter_per_row(model, rows) if rows is not None else contextlib.nullcontext():
                results[key].append(model(IDS))


def test_concurrent_forwards_with_different_selections_are_independent():
    model = two_adapters().eval()
    selections = {"ab": ["b", "default"], "ba": ["default", "b"], "base": ["__base__", "__base__"], "plain": None}
    expected = {}
    with torch.no_grad():
        for key, rows in selections.items():
            with mk.adapter_per_row(model, rows) if rows is not None else contextlib.nullcontext():
                expected[key] = model(IDS)
    results = {key: [] for key in selections}
    barrier = threading.Barrier(len(selections))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: interleave the blocks
    try:
        threads = [threading.Thread(target=_serve, args=(model, rows, barrier, results, key))
                   for key, rows in selections.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    for key, outs in results.items():
        assert len(outs) == 30, key
        for out in outs:
            torch.testing.assert_close(out, expected[key], rtol=0, atol=0, msg=key)
    assert not any(module._forward_pre_hooks for module in model.modules())  # nothing was registered on the model


def test_adapter_per_row_is_not_seen_by_another_model():
    model, other = two_adapters(), two_adapters()
    with torch.no_grad():
        plain = other(IDS)
        with mk.adapter_per_row(model, ["b", "__base__"]):
            torch.testing.assert_close(other(IDS), plain, rtol=0, atol=0)


def test_a_compiled_model_follows_each_selection():
    """torch.compile guards on the selection the layers read: a graph traced for one selection is not reused for
    another. (The reference's mixed op reads the index values, so it breaks the graph: not fullgraph here.)"""
    model = two_adapters().eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        for rows in (["b", "default"], ["default", "b"], ["__base__", "b"], ["b", "default"]):
            with mk.adapter_per_row(model, rows):
                expected = model(IDS)
            with mk.adapter_per_row(compiled, rows):
                torch.testing.assert_close(compiled(IDS), expected, rtol=1e-6, atol=1e-6)
