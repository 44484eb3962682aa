"""ReMoRA: restarts fold the update into the weight, zero M, move the type, drop M's optimizer state."""

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


def test_bad_arguments():
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match="every must be a positive int"):
        ReMoRA(model, every=0)
    with pytest.raises(ValueError, match="no MoRA layer"):
        restart(nn.Linear(3, 3))
    model[0].merge()
    with pytest.raises(RuntimeError, match="unmerge the adapters first"):
        restart(model)


def test_trainer_callback():
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import TrainerCallback, TrainerControl, TrainerState

    from mora_kernels.remora import ReMoRACallback

    assert issubclass(ReMoRACallback, TrainerCallback)
    model, x, target = model_and_data()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    callback = ReMoRACallback(every=2)
    state = TrainerState()
    for step in (1, 2):
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
        state.global_step = step
        callback.on_step_end(None, state, TrainerControl(), model=model, optimizer=optimizer)
        assert int(model[0].mora_type) == (1 if step == 1 else 2)
        assert (model[0].M in optimizer.state) == (step == 1)
