"""MoRALinear under DDP and FSDP2 (``fully_shard``): 2 CPU processes (gloo) give the single-process gradients."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mora_kernels.adapters as mka

WORLD = 2


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 40)).double()
    mka.apply_mora(model, ["0"], r=4, mora_type=6, dtype=torch.float64)
    mka.apply_mora(model, ["2"], r=3, mora_type=1, dtype=torch.float64)
    with torch.no_grad():  # M at zero would make the first layer's M gradient trivially small; start elsewhere
        for _, layer in mka.mora_layers(model):
            layer.M.normal_(0, 0.1)
    x = torch.randn(8, 40, dtype=torch.float64)
    return model, x, torch.sin(x)


def grads(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            out[name.removeprefix("module.")] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def worker(rank, port, folder):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel

        for mode in ("ddp", "fsdp2"):
            model, x, y = model_and_batch()
            if mode == "ddp":
                model = DistributedDataParallel(model)
            else:
                for _, layer in mka.mora_layers(model):
                    fully_shard(layer)
                fully_shard(model)
            rows = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
            nn.functional.mse_loss(model(x[rows]), y[rows]).backward()  # both reduce by averaging over ranks
            g = grads(model)
            if rank == 0:
                torch.save(g, f"{folder}/{mode}.pt")
        # Both ranks done before either tears gloo down: rank 1 leaving while rank 0 still worked aborted once in CI
        # ("terminate called without an active exception", SIGABRT in process 1) on a loaded 2-core machine.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_and_fsdp2_gradients_equal_single_process(tmp_path):
    model, x, y = model_and_batch()
    nn.functional.mse_loss(model(x), y).backward()
    expected = grads(model)
    assert sorted(expected) == ["0.adapters.default.weight", "2.adapters.default.weight"]
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = {mode: torch.load(tmp_path / f"{mode}.pt", weights_only=True) for mode in ("ddp", "fsdp2")}
    for mode in ("ddp", "fsdp2"):
        assert sorted(results[mode]) == sorted(expected), mode
        for name, g in expected.items():
            # float64; the mean over 8 rows is split into two means of 4 averaged across ranks: rounding ~1e-16
            torch.testing.assert_close(results[mode][name], g, atol=1e-12, rtol=0, msg=f"{mode} {name}")
