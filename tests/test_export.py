"""LoRA export (mora_kernels.export): exact for types 1-4, SVD with a reported error for types 6/7, read by plain PEFT
(a subprocess that never imports mora_kernels)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import mora_kernels as mk
from mora_kernels import reference
from mora_kernels.adapters import mora_layers

from .helpers import golden, golden_case, golden_ids
from .hf_helpers import GOLDEN, tiny_gpt2, tiny_llama

pytest.importorskip("peft")

MODELS = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "c_proj"])}
# float32 logits of these tiny models are O(1); the LoRA form computes the same products as MoRA's maps in another
# order (C x as a matmul with 0/1/2 counts instead of a gather-sum), so they differ by float32 rounding of a few
# hundred chained terms per logit: well inside 1e-5 (2^-24 ~ 6e-8 per rounding), as in tests/test_peft.py.
FLOAT32_TOL = dict(atol=1e-5, rtol=1e-5)
# float64 base: both forms compute the same float32-exact factors in float64; only summation order differs (~1e-15).
FLOAT64_ATOL = 1e-10

PLAIN_PEFT = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    out = {}
    for job in jobs:
        base = AutoModelForCausalLM.from_pretrained(job["base"], dtype=getattr(torch, job["dtype"]))
        model = PeftModel.from_pretrained(base, job["lora"]).eval()
        with torch.no_grad():
            out[job["key"]] = model(torch.tensor(job["ids"])).logits
    assert not any(name.split(".")[0] == "mora_kernels" for name in sys.modules)
    torch.save(out, job["result"])
""")


def plain_peft(jobs, result) -> dict:
    """Logits of each ``{key, base, lora, dtype, ids}`` job from PEFT alone, in a fresh process."""
    jobs = [dict(job, ids=job["ids"].tolist(), result=str(result)) for job in jobs]
    run = subprocess.run([sys.executable, "-c", PLAIN_PEFT, json.dumps(jobs)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    return torch.load(result, weights_only=True)


def adapted(kind: str, mora_type: int, base_dir, scaling: float = 0.5):
    """A tiny model saved (without adapter) to ``base_dir``, then adapted with a random M of ``mora_type``."""
    build, targets = MODELS[kind]
    model = build()
    model.save_pretrained(base_dir)
    mk.apply_mora(model, targets, r=4, mora_type=mora_type, scaling=scaling)
    torch.manual_seed(mora_type)
    for _, layer in mora_layers(model):
        layer.M.data.normal_(0, 0.1)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", MODELS)
def test_plain_peft_reproduces_every_type(kind, tmp_path):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    jobs, expected = [], {}
    for mora_type in (1, 2, 3, 4, 6, 7):
        model = adapted(kind, mora_type, tmp_path / f"base{mora_type}")
        # types 6/7 at full rank (min(n, m) = 64 on every layer): the SVD is then exact up to rounding
        report = mk.export_lora(model, tmp_path / f"lora{mora_type}", rank=None if mora_type < 6 else 64)
        assert report["exact"] == (mora_type < 6)
        config = json.loads((tmp_path / f"lora{mora_type}" / "adapter_config.json").read_text())
        assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", report["rank"], report["rank"])
        assert config["fan_in_fan_out"] == (kind == "gpt2") and not config["use_rslora"]
        assert set(config["target_modules"]) == set(MODELS[kind][1])
        expected[f"{mora_type}/float32"] = logits(model, ids)
        expected[f"{mora_type}/float64"] = logits(model.double(), ids)
        jobs += [dict(key=f"{mora_type}/{dtype}", base=str(tmp_path / f"base{mora_type}"),
                      lora=str(tmp_path / f"lora{mora_type}"), dtype=dtype, ids=ids)
                 for dtype in ("float32", "float64")]
    got = plain_peft(jobs, tmp_path / "result.pt")
    for key, want in expected.items():
        mora_type = int(key[0])
        if key.endswith("float32"):
            torch.testing.assert_close(got[key], want, **FLOAT32_TOL)
        elif mora_type < 6:
            assert (got[key] - want).abs().max().item() <= FLOAT64_ATOL, key
        else:  # float32 factors of an SVD: relative error of dW below 2 * 2^-24 * sqrt(64) per layer (see below)
            torch.testing.assert_close(got[key], want, **FLOAT32_TOL)


def stored_factors(path) -> dict:
    state = load_file(path / "adapter_model.safetensors")
    names = {key[len("base_model.model."):-len(".lora_A.weight")] for key in state if key.endswith(".lora_A.weight")}
    return {name: (state[f"base_model.model.{name}.lora_A.weight"].double(),
                   state[f"base_model.model.{name}.lora_B.weight"].double()) for name in names}


@pytest.mark.parametrize("case_id", [c for c in golden_ids() if f"{c}/dW" in golden()[1]])
def test_export_matches_the_golden_dW(case_id, tmp_path):
    """Against the golden float64 dW (computed from the definition, not by delta_weight): types 1-4 exact with integer
    lora_A; type 6 at full rank from a float64 SVD."""
    case, t = golden_case(case_id)
    model = nn.Sequential(mk.MoRALinear(nn.Linear(case["n"], case["m"], dtype=torch.float64), case["r"],
                                        case["mora_type"], dtype=torch.float64))
    model[0].M.data.copy_(t["M"])
    exact = case["mora_type"] < 6
    report = mk.export_lora(model, tmp_path, rank=None if exact else min(case["n"], case["m"]))
    ((A, B),) = stored_factors(tmp_path).values()
    if exact:
        assert report["rank"] == case["r_hat"] and torch.equal(A, A.round())
        torch.testing.assert_close(B @ A, t["dW"], atol=1e-12 * t["dW"].abs().max().item(), rtol=0)
    else:
        error = torch.linalg.matrix_norm(B @ A - t["dW"]) / torch.linalg.matrix_norm(t["dW"])
        assert error <= 1e-10 and report["layers"][0]["relative_error"] <= 1e-10


@pytest.mark.parametrize("mora_type", [1, 2, 3, 4, 6, 7])
def test_every_type_against_the_float64_reference_layer_by_layer(mora_type, tmp_path):
    model = adapted("llama", mora_type, tmp_path / "base")
    full = mk.export_lora(model, tmp_path / "full", rank=64)  # rank >= R: exact for types 1-4, full SVD for 6/7
    cut = mk.export_lora(model, tmp_path / "cut", max_error=0.25)
    for report, folder in ((full, "full"), (cut, "cut")):
        factors = stored_factors(tmp_path / folder)
        rows = {row["module"]: row for row in report["layers"]}
        assert set(factors) == set(rows) == {name for name, _ in mora_layers(model)}
        for name, layer in mora_layers(model):
            adapter = layer.adapters["default"]
            dW = reference.delta_weight(adapter.weight.double(), adapter.geo, adapter.rope) * 0.5
            A, B = factors[name]
            error = (torch.linalg.matrix_norm(B @ A - dW) / torch.linalg.matrix_norm(dW)).item()
            assert error == pytest.approx(rows[name]["relative_error"], rel=1e-6, abs=1e-15)
            if folder == "cut":
                assert error <= 0.25 and rows[name]["method"] == ("svd" if rows[name]["rank"] < adapter.geo.R
                                                                  or mora_type >= 6 else "exact")
            elif mora_type < 6:
                assert rows[name]["method"] == "exact" and error <= 1e-15
            else:
                # float32 factors B = U sqrt(S), A = sqrt(S) V^T, each entry rounded by 2^-24: the product errs by at
                # most 2 * 2^-24 * sum(S) <= 2 * 2^-24 * sqrt(k) ||S|| (float64 SVD error far below)
                assert error <= 2 * 2**-24 * math.sqrt(rows[name]["rank"])
    assert full["exact"] == (mora_type < 6) and not cut["exact"]


def test_types_6_and_7_need_a_rank_or_max_error(tmp_path):
    model = adapted("llama", 6, tmp_path / "base")
    with pytest.raises(ValueError, match="high rank.*choose rank= .*or max_error="):
        mk.export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    with pytest.raises(ValueError, match="rank or max_error, not both"):
        mk.export_lora(model, tmp_path / "lora", rank=4, max_error=0.1)
    with pytest.raises(ValueError, match=r"max_error must be in \[0, 1\)"):
        mk.export_lora(model, tmp_path / "lora", max_error=1.5)
    with pytest.raises(ValueError, match="no MoRA layer .* named 'other'"):
        mk.export_lora(model, tmp_path / "lora", adapter_name="other", rank=4)


def test_a_smaller_rank_compresses_types_1_to_4(tmp_path):
    model = adapted("llama", 1, tmp_path / "base")
    report = mk.export_lora(model, tmp_path / "lora", rank=8)
    assert report["rank"] == 8 and all(row["method"] == "svd" and row["rank"] == 8 for row in report["layers"])
    assert 0 < report["max_relative_error"] < 1


def test_ranks_above_vllms_limit_are_flagged(tmp_path):
    model = nn.Sequential(mk.MoRALinear(nn.Linear(2048, 2048), r=64))  # R = 512 exactly: not above
    assert not mk.export_lora(model, tmp_path / "a")["exceeds_vllm_max_lora_rank"]
    model = nn.Sequential(mk.MoRALinear(nn.Linear(2048, 2048), r=65))  # R = 516
    with pytest.warns(UserWarning, match="rank 516, above vLLM's largest LoRA rank 512"):
        report = mk.export_lora(model, tmp_path / "b")
    assert report["exceeds_vllm_max_lora_rank"]
    assert json.loads((tmp_path / "b" / "export_report.json").read_text())["exceeds_vllm_max_lora_rank"]


def test_peft_mora_model_exports_like_the_plain_one(tmp_path):
    from peft import get_peft_model

    import mora_kernels.peft_integration as mkp

    model = adapted("llama", 2, tmp_path / "base")
    mk.save_adapter(model, tmp_path / "mora")
    peft_model = mkp.from_pretrained(tiny_llama(), tmp_path / "mora")
    mk.export_lora(model, tmp_path / "plain")
    mk.export_lora(peft_model, tmp_path / "peft")
    a, b = stored_factors(tmp_path / "plain"), stored_factors(tmp_path / "peft")
    assert a.keys() == b.keys() and all(torch.equal(a[k][i], b[k][i]) for k in a for i in (0, 1))
    trained = get_peft_model(tiny_llama(), mkp.MoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        mk.export_lora(trained, tmp_path / "x")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mora_kernels", "export-lora", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_cli_on_the_original_release_adapter(tmp_path):
    run = cli("--base", GOLDEN / "base", GOLDEN / "adapter", tmp_path / "lora")
    assert run.returncode == 1 and "high rank" in run.stderr and "Traceback" not in run.stderr
    run = cli("--base", GOLDEN / "base", GOLDEN / "adapter", tmp_path / "lora", "--rank", "0")
    assert run.returncode == 2 and "--rank: expected an integer >= 1" in run.stderr
    run = cli("--base", GOLDEN / "base", GOLDEN / "adapter", tmp_path / "lora", "--max-error", "0.01")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "lora" / "export_report.json").read_text())
    assert report["max_relative_error"] <= 0.01
    for row in report["layers"]:
        assert f"{row['module']}: type 6" in run.stdout and f"{row['relative_error']:.3e}" in run.stdout


def test_cli_exact_export_read_by_plain_peft(tmp_path):
    model = adapted("gpt2", 4, tmp_path / "base", scaling=1.0)
    mk.save_adapter(model, tmp_path / "mora")
    run = cli("--base", tmp_path / "base", tmp_path / "mora", tmp_path / "lora")
    assert run.returncode == 0, run.stderr
    assert "exact" in run.stdout
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    got = plain_peft([dict(key="x", base=str(tmp_path / "base"), lora=str(tmp_path / "lora"), dtype="float64",
                           ids=ids)], tmp_path / "result.pt")
    assert (got["x"] - logits(model.double(), ids)).abs().max().item() <= FLOAT64_ATOL


def test_alpha_pattern_factors_are_exported(tmp_path):
    """A per-layer factor (alpha_pattern) goes into that layer's lora_B: the export reproduces each layer's own
    update, not the adapter's common scaling."""
    model = adapted("llama", 1, tmp_path / "base")
    mk.save_adapter(model, tmp_path / "mora")
    config_file = tmp_path / "mora" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["alpha_pattern"] = {"q_proj": 3 * config["lora_alpha"]}
    config_file.write_text(json.dumps(config))
    patterned = mk.load_adapter(tiny_llama(), tmp_path / "mora")
    mk.export_lora(model, tmp_path / "plain")
    mk.export_lora(patterned, tmp_path / "patterned")
    plain, scaled = stored_factors(tmp_path / "plain"), stored_factors(tmp_path / "patterned")
    assert plain.keys() == scaled.keys()
    for name, (a, b) in plain.items():
        factor = 3 if name.endswith("q_proj") else 1
        # the factors are stored in float32, each rounded once (2^-24 relative): FLOAT32_TOL covers the products
        torch.testing.assert_close(scaled[name][1] @ scaled[name][0], factor * (b @ a), **FLOAT32_TOL)
