"""ReMoRA: restarts fold the update into the weight, zero M, move the type, drop M's optimizer state."""

import json

import pytest
import torch
from torch import nn

import mora_kernels.adapters as mka
from mora_kernels.core import MoRAType
from mora_kernels.remora import ReMoRA, next_type, restart


def model_and_data(mora_type=1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 40)).double()
    mka.apply_mora(model, ["0", "2"], r=3, mora_type=mora_type, dtype=torch.float64)
    x = torch.randn(16, 40, dtype=torch.float64)
    return model, x, torch.sin(x)


def test_plain_loop_cycles_types_and_keeps_the_function():
    model, x, target = model_and_data()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    remora = ReMoRA(model, every=3, optimizer=optimizer)
    R = model[0].R
    types = []
    for step in range(1, 13):
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            before, weight = model(x), model[0].base.weight.clone()
        restarted = remora.step()
        assert restarted == (step % 3 == 0)
        if restarted:
            # float64 throughout: folding dW into W changes the output only by rounding (~1e-16 relative)
            torch.testing.assert_close(model(x).detach(), before, atol=1e-12, rtol=0)
            assert not torch.equal(model[0].base.weight, weight)
            for layer in (model[0], model[2]):
                assert torch.count_nonzero(layer.M) == 0 and layer.R == R
                assert layer.M not in optimizer.state  # Adam restarts from step 0 for M
            types.append(int(model[0].mora_type))
    assert types == [2, 3, 4, 1]
    assert model[0].M.requires_grad and not model[0].base.weight.requires_grad


def test_types_6_and_7_keep_their_type():
    assert next_type(MoRAType.ROPE) == MoRAType.ROPE and next_type(MoRAType.DECOUPLED) == MoRAType.DECOUPLED
    model, x, _ = model_and_data(mora_type=6)
    for layer in (model[0], model[2]):
        layer.M.data.normal_()
    before = model(x).detach()
    assert restart(model) == 2
    assert int(model[0].mora_type) == 6 and torch.count_nonzero(model[0].M) == 0
    torch.testing.assert_close(model(x).detach(), before, atol=1e-12, rtol=0)


def test_checkpoints_after_a_restart_need_the_folded_base(tmp_path):
    model, x, _ = model_and_data()
    for layer in (model[0], model[2]):
        layer.M.data.normal_()
    restart(model)
    for layer in (model[0], model[2]):  # the second cycle trains
        layer.M.data.normal_()
    expected = model(x).detach()
    with pytest.raises(ValueError, match="went through 1 ReMoRA restart.*allow_restarted=True"):
        mka.save_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    mka.save_adapter(model, tmp_path, allow_restarted=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["mora_type"], config["remora_restarts"]) == (2, 1)  # the type M was trained for
    with pytest.raises(ValueError, match="saved after 1 ReMoRA restart"):
        mka.load_adapter(model_and_data()[0], tmp_path)
    # onto base weights that hold the first cycle, the checkpoint reproduces the model (float64: ~1e-16 relative)
    folded = nn.Sequential(nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 40)).double()
    folded.load_state_dict({f"{i}.{k}": v for i in (0, 2) for k, v in model[i].base.state_dict().items()})
    mka.load_adapter(folded, tmp_path, allow_restarted=True)
    torch.testing.assert_close(folded(x).detach(), expected, atol=1e-12, rtol=0)
    assert folded[0].adapters["default"].restarts == 1 and int(folded[0].mora_type) == 2


def test_peft_config_follows_restarts(tmp_path):
    from peft import get_peft_model

    import mora_kernels.peft_integration as mkp

    from .hf_helpers import tiny_llama

    model = get_peft_model(tiny_llama(), mkp.MoRAConfig(r=4, mora_type=1, target_modules=["q_proj"]))
    ids = torch.randint(0, 128, (2, 8))

    def train():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.data.normal_(0, 0.1)

    train()
    restart(model)
    train()
    with torch.no_grad():
        expected = model(ids).logits
    assert (model.peft_config["default"].mora_type, model.peft_config["default"].remora_restarts) == (2, 1)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["mora_type"], config["remora_restarts"]) == (2, 1)
    with pytest.raises(ValueError, match="saved after 1 ReMoRA restart"):
        mkp.from_pretrained(tiny_llama(), tmp_path)
    folded = tiny_llama()
    for layer, trained in zip(folded.model.layers, model.base_model.model.model.layers):
        layer.self_attn.q_proj.weight.data.copy_(trained.self_attn.q_proj.base_layer.weight)
    again = mkp.from_pretrained(folded, tmp_path, allow_restarted=True)
    with torch.no_grad():
        # float32 model, same weights and ops: equal up to float32 rounding
        torch.testing.assert_close(again(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match=r"every \(optimizer steps between restarts\) must be >= 1"):
        ReMoRA(model, every=0)
    with pytest.raises(ValueError, match="no MoRA layer"):
        restart(nn.Linear(3, 3))
    model[0].merge()
    with pytest.raises(ValueError, match=r"layers \['0'\] have merged adapters; unmerge them"):
        restart(model)


def test_trainer_callback(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from mora_kernels.remora import ReMoRACallback

    from .hf_helpers import batch, tiny_llama

    assert issubclass(ReMoRACallback, TrainerCallback)
    model = mka.apply_mora(tiny_llama(), ["q_proj", "v_proj"], r=8, mora_type=1)
    layer = model.model.layers[0].self_attn.q_proj
    seen = []

    class Record(TrainerCallback):  # runs after ReMoRACallback (callbacks run in order)
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen.append((state.global_step, int(layer.mora_type), layer.M in optimizer.state, bool(layer.M.any())))

    ids = batch(rows=8, length=8)
    args = TrainingArguments(
        tmp_path, per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    data = [{"input_ids": row, "labels": row} for row in ids]
    Trainer(model=model, args=args, train_dataset=data, callbacks=[ReMoRACallback(every=2), Record()]).train()
    # steps 2 and 4 restart: M back to zero, type moved on, Adam's state for M dropped (through accelerate's
    # optimizer wrapper)
    assert seen == [(1, 1, True, True), (2, 2, False, False), (3, 2, True, True), (4, 3, False, False)]
