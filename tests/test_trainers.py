"""MoRA trained inside training frameworks, without the original release's fork (docs/trainers.md).

transformers' ``Trainer`` (MoRA through PEFT's ``get_peft_model`` and through the package's ``apply_mora``) and TRL's
``SFTTrainer`` (MoRA as its ``peft_config``) each train a tiny random Llama on CPU, with and without ReMoRA restarts
(``ReMoRACallback``). Each run is checked end to end: only the MoRA matrices train, the loss goes down, a saved
adapter reloads to the same logits, restarts happen at the right steps (update folded into the base, M back to
zero, the next type), and the trained model equals a reference built independently from the base weights and the
M of every cycle. axolotl cannot be installed next to this package's test environment: its test says why.
"""

from __future__ import annotations

import pytest
import torch

import mora_kernels as mk
from mora_kernels.layer import AdapterMixin
from mora_kernels.remora import ReMoRACallback

from .hf_helpers import batch, tiny_llama

TARGETS = ["q_proj", "v_proj"]
STEPS, EVERY = 5, 2  # restarts after steps 2 and 4; the third cycle (step 5) leaves a non-zero M
IDS = batch(rows=8, length=16)  # two batches of 4 rows per epoch


def mora_layers(model):
    """``{name: layer}`` of the MoRA layers, named as in the bare Llama (PEFT's prefix dropped)."""
    return {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
            if isinstance(module, AdapterMixin)}


def matrix(layer):
    return layer.mora_adapter("default")


def loss(model) -> float:
    """Mean next-token loss on the training rows, without dropout."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, labels=IDS).loss.item()


def logits(model, ids=IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def training_args(tmp_path, cls=None, **extra):
    from transformers import TrainingArguments

    return (cls or TrainingArguments)(
        tmp_path / "run", per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, **extra,
    )


def recorder():
    """A TrainerCallback that, placed before ReMoRACallback, sees every step's M just before a restart could fold it:
    ``cycles`` gets ``(step, {layer: (M in float64, type)})`` at each step, ``after`` what the restart left."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def __init__(self):
            self.cycles, self.after = [], []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.cycles.append((state.global_step, {name: (matrix(layer).weight.detach().double().clone(),
                                                           int(matrix(layer).mora_type))
                                                    for name, layer in mora_layers(model).items()}))

    class After(TrainerCallback):
        def __init__(self, record):
            self.record = record

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.record.after.append({name: (int(matrix(layer).mora_type), bool(matrix(layer).weight.any()),
                                             matrix(layer).weight in optimizer.state)
                                      for name, layer in mora_layers(model).items()})

    record = Record()
    return record, After(record)


def reference_model(record, steps):
    """The tiny Llama in float64 with ``W0 + dW(M, type)`` added for the M recorded at each of ``steps``, built with
    ``mk.delta_weight`` from the recorded matrices alone (not from the trained model's base weights)."""
    reference = tiny_llama().double()
    recorded = dict(record.cycles)
    for name, module in reference.named_modules():
        for step in steps:
            if name in recorded[step]:
                M, mora_type = recorded[step][name]
                module.weight.data += mk.delta_weight(M, module.in_features, module.out_features, mora_type)
    return reference


def check_trained(model, record, every: int | None):
    """The run's outcome: only M trained, restarts at the right steps, the base weights hold exactly the folded
    cycles, and the trained model equals the reference rebuilt from the recorded matrices."""
    layers = mora_layers(model)
    assert sorted(layers) == sorted(f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(matrix(layer).weight) for layer in layers.values()}, "only the MoRA matrices train"
    assert [step for step, _ in record.cycles] == list(range(1, STEPS + 1))
    restarts = [] if every is None else [step for step in range(1, STEPS + 1) if step % every == 0]
    # What each step left: a restart zeroes M, moves 1 -> 2 -> 3 and drops M's optimizer state; between restarts
    # M trains (non-zero, with Adam state).
    types, expected = 1, []
    for step in range(1, STEPS + 1):
        restarted = step in restarts
        types += restarted
        expected.append({name: (types, not restarted, not restarted) for name in layers})
    assert record.after == expected
    for step in restarts:  # each folded M was a real update (the reference below would miss a dropped one)
        assert all(M.abs().max() > 1e-3 for M, _ in dict(record.cycles)[step].values())
    # A fresh base in float64 plus every cycle's dW (the restarted steps' M and the last step's) against the trained
    # float32 model: they differ by the float32 rounding of the folds (W += dW, twice here) and of the forward
    # (2 layers, sums of 64 to 176 terms): float32 rounds at 6e-8 relative, logits are of size ~1, and the errors of
    # those sums grow like their square roots, so a few 1e-7 (measured 2e-7 to 3e-7); 1e-5 bounds that with room.
    # Leaving out one cycle's update moves the logits by more than 1e-2 (asserted; measured 0.6 and 0.77).
    reference = reference_model(record, sorted({*restarts, STEPS}))
    want = logits(reference)
    torch.testing.assert_close(logits(model).double(), want, atol=1e-5, rtol=0)
    for step in restarts:
        assert (logits(reference_model(record, sorted({*restarts, STEPS} - {step}))) - want).abs().max() > 1e-2
    # The base weights hold the folded cycles up to float32 rounding, and are untouched when no restart happened.
    # Entries are below 0.125 (initialised with std 0.02), where a float32 ulp is at most 7.5e-9; each of the two
    # folds rounds once, and dW computed in float32 adds a few ulps: 5e-8 (measured 8e-9).
    folded = reference_model(record, restarts)
    for name, layer in layers.items():
        base = layer.base_layer.weight
        assert base.abs().max() < 0.125
        torch.testing.assert_close(base.double(), folded.get_submodule(name).weight, atol=5e-8, rtol=0)
        assert torch.equal(base, tiny_llama().get_submodule(name).weight) == (not restarts)


def apply_peft(model):
    from peft import get_peft_model

    from mora_kernels.peft_integration import MoRAConfig

    return get_peft_model(model, MoRAConfig(r=8, mora_type=1, target_modules=TARGETS))


def apply_package(model):
    return mk.apply_mora(model, TARGETS, r=8, mora_type=1)


def reload_peft(model, path, restarted: bool):
    from mora_kernels.peft_integration import from_pretrained

    model.save_pretrained(path)
    return from_pretrained(folded_base(model), path, allow_restarted=restarted)


def reload_package(model, path, restarted: bool):
    mk.save_adapter(model, path, allow_restarted=restarted)
    return mk.load_adapter(folded_base(model), path, allow_restarted=restarted)


def folded_base(model):
    """A fresh tiny Llama holding the trained model's base weights (the earlier ReMoRA cycles, if any)."""
    fresh = tiny_llama()
    for name, layer in mora_layers(model).items():
        fresh.get_submodule(name).weight.data.copy_(layer.base_layer.weight)
    return fresh


def check_reload(model, tmp_path, reload, restarted: bool):
    """Saved and loaded again onto its base, the adapter gives the trained model's logits: same weights, same
    float32 operations in the same order, so the same bits."""
    again = reload(model, tmp_path / "adapter", restarted)
    ids = batch(seed=5, rows=2, length=12)
    assert torch.equal(logits(again, ids), logits(model, ids))


ROUTES = {"peft": (apply_peft, reload_peft), "apply_mora": (apply_package, reload_package)}


@pytest.mark.parametrize("remora", [False, True], ids=["plain", "remora"])
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_transformers_trainer(route, remora, tmp_path):
    from transformers import Trainer

    apply, reload = ROUTES[route]
    model = apply(tiny_llama())
    before = loss(model)
    record, after = recorder()
    callbacks = [record, *([ReMoRACallback(every=EVERY)] if remora else []), after]
    data = [{"input_ids": row, "labels": row} for row in IDS]
    Trainer(model=model, args=training_args(tmp_path), train_dataset=data, callbacks=callbacks).train()
    assert loss(model) < before - 0.1  # measured: 4.86 -> 4.63 (4.65 without restarts)
    check_trained(model, record, EVERY if remora else None)
    check_reload(model, tmp_path, reload, restarted=remora)


def tiny_tokenizer():
    """A word-level tokenizer over the tiny Llama's 128 ids, built offline (SFTTrainer needs one; the data below is
    already token ids, so it only supplies the pad and end-of-sequence ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1")


@pytest.mark.parametrize("remora", [False, True], ids=["plain", "remora"])
def test_trl_sft_trainer(remora, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from mora_kernels.peft_integration import MoRAConfig

    record, after = recorder()
    callbacks = [record, *([ReMoRACallback(every=EVERY)] if remora else []), after]
    # float32 throughout (no bf16 autocast): the comparisons are argued for float32. SFTConfig's default gradient
    # checkpointing stays on, as users get it.
    args = training_args(tmp_path, SFTConfig, bf16=False)
    trainer = SFTTrainer(
        model=tiny_llama(), args=args, train_dataset=Dataset.from_dict({"input_ids": IDS.tolist()}),
        processing_class=tiny_tokenizer(), peft_config=MoRAConfig(r=8, mora_type=1, target_modules=TARGETS),
        callbacks=callbacks,
    )
    model = trainer.model
    before = loss(model)
    trainer.train()
    assert loss(model) < before - 0.1
    check_trained(model, record, EVERY if remora else None)
    check_reload(model, tmp_path, reload_peft, restarted=remora)


# Measured on 2026-12-04 with `pip install --dry-run axolotl` in the [test] environment and with
# `pip install --dry-run axolotl .` (this package without extras).
AXOLOTL_CANNOT_RUN_HERE = (
    "axolotl cannot be installed next to this package's [test] environment: axolotl 0.19.0 (the newest) pins "
    "peft==0.20.0, transformers==5.16.1, trl==1.9.0, torchao==0.17.0 and torch<=2.13.0, so pip would downgrade "
    "torch 2.14.1, transformers 5.25.0, peft 0.21.2 and trl 1.16.0 here, and peft 0.20.0 is below the [peft] "
    "extra's floor (0.21). `pip install axolotl mora_kernels` (no extras) resolves (torch 2.13.0): the recipe of "
    "docs/trainers.md#axolotl uses that route; untested here"
)


def test_axolotl_own_mora_plugin_needs_the_fork():
    """Where axolotl is installed: its own MoRA plugin (``adapter: mora``) builds PEFT's ``LoraConfig`` with
    ``use_mora``, which only the original release's fork has, so it refuses stock PEFT even with
    ``mora_kernels.peft_integration`` imported; docs/trainers.md's plugin goes through ``mk.apply_mora`` instead."""
    pytest.importorskip("axolotl", reason=AXOLOTL_CANNOT_RUN_HERE)
    from axolotl.integrations.mora import MoraPlugin
    from axolotl.utils.dict import DictDefault

    import mora_kernels.peft_integration  # noqa: F401

    cfg = DictDefault({"adapter": "mora", "mora": {"use_mora": True, "mora_type": "rope"}})
    with pytest.raises(ImportError, match="MoRA support"):
        MoraPlugin().get_lora_config_kwargs(cfg)
