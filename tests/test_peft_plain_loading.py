"""PEFT's and transformers' own loaders on MoRA folders once mora_kernels.peft_integration is imported (its
``PeftConfigMixin.from_peft_type`` routing), and the errors left to a user who loads one without it."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("peft")

from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel  # noqa: E402

import mora_kernels as mk  # noqa: E402
import mora_kernels.peft_integration as mkp  # noqa: E402

from .hf_helpers import GOLDEN, golden_base, golden_expected, tiny_llama  # noqa: E402
from .test_peft import GOLDEN_ATOL, logits  # noqa: E402


def golden_error(model) -> float:
    return (logits(model.eval()) - golden_expected()["logits"]).abs().max().item()


def test_peft_model_from_pretrained_and_load_adapter():
    model = PeftModel.from_pretrained(golden_base(), GOLDEN / "adapter", adapter_name="first")
    assert isinstance(model.peft_config["first"], mkp.MoRAConfig) and model.peft_config["first"].mora_type == 6
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, mkp.MoRAPeftLinear)
    assert golden_error(model) <= GOLDEN_ATOL
    model.load_adapter(GOLDEN / "adapter", adapter_name="second", is_trainable=True)
    model.set_adapter("second")
    assert golden_error(model) <= GOLDEN_ATOL
    matrix = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["second"]
    assert matrix.weight.requires_grad and not model.peft_config["second"].inference_mode


def test_transformers_load_adapter():
    model = golden_base()
    model.load_adapter(str(GOLDEN / "adapter"), adapter_name="mora")
    assert isinstance(model.model.layers[0].self_attn.q_proj, mkp.MoRAPeftLinear)
    assert golden_error(model) <= GOLDEN_ATOL


def test_auto_peft_model(tmp_path):
    shutil.copytree(GOLDEN / "adapter", tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": str(GOLDEN / "base")}))
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float64)
    assert isinstance(model.peft_config["default"], mkp.MoRAConfig)
    assert golden_error(model) <= GOLDEN_ATOL


def test_this_packages_and_peft_saves_load_with_peft_arguments(tmp_path):
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    plain = mk.apply_mora(tiny_llama(), ["q_proj", "v_proj"], r=4, mora_type=1, scaling=0.5)
    for _, layer in mk.adapters.mora_layers(plain):
        layer.M.data.normal_(0, 0.1)
    mk.save_adapter(plain, tmp_path / "plain")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain", is_trainable=True, low_cpu_mem_usage=True)
    assert model.peft_config["default"].mora_scaling == 0.5 and not model.peft_config["default"].inference_mode
    # float32 model, the same ops on both paths in the same order: equal up to float32 rounding (as test_peft)
    torch.testing.assert_close(logits(model.eval(), ids), logits(plain, ids), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "peft")
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(again, ids), logits(plain, ids), atol=1e-5, rtol=1e-5)


def test_lora_folders_stay_lora(tmp_path):
    model = mk.apply_mora(tiny_llama(), ["q_proj"], r=2)
    mk.export_lora(model, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert type(loaded.peft_config["default"]) is LoraConfig


def test_restarted_checkpoints_need_this_packages_loader(tmp_path):
    model = mk.apply_mora(tiny_llama(), ["q_proj"], r=2)
    for _, layer in mk.adapters.mora_layers(model):
        layer.adapters["default"].restarts = 1
    mk.save_adapter(model, tmp_path, allow_restarted=True)
    with pytest.raises(ValueError, match="ReMoRA restart.*allow_restarted=True"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert mkp.from_pretrained(tiny_llama(), tmp_path, allow_restarted=True).peft_config["default"].remora_restarts


WITHOUT_THE_IMPORT = textwrap.dedent("""
    import sys, warnings
    sys.path.insert(0, ".")
    from peft import PeftModel
    from tests.hf_helpers import GOLDEN, golden_base
    base = golden_base()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            PeftModel.from_pretrained(base, GOLDEN / "adapter")
        except RuntimeError as error:
            print("PEFT:", str(error).splitlines()[1].strip())
    print("WARNING:", [str(w.message) for w in caught if "use_mora" in str(w.message)][0])
    import mora_kernels as mk
    import mora_kernels.peft_integration
    for load in (mk.load_adapter, PeftModel.from_pretrained):
        try:
            load(base, GOLDEN / "adapter")
        except (TypeError, ValueError) as error:
            print("AFTER:", error)
""")


def test_without_the_import_peft_fails_and_the_left_layers_are_named():
    run = subprocess.run([sys.executable, "-c", WITHOUT_THE_IMPORT], capture_output=True, text=True, timeout=600,
                         cwd=GOLDEN.parents[2])
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    # PEFT alone: its own warning names the dropped fields, then the size mismatch (all PEFT allows)
    assert any(line.startswith("PEFT: size mismatch") for line in lines)
    assert any(line.startswith("WARNING: Unexpected keyword arguments ['mora_type', 'use_mora']") for line in lines)
    after = [line for line in lines if line.startswith("AFTER:")]
    assert len(after) == 2 and all("PEFT LoRA layer" in line and "reload the base model" in line for line in after)
