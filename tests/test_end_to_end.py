"""A tiny Llama trains with MoRA on CPU; save, reload and merge give the adapted model's logits (both paths)."""

import pytest
import torch

import mora_kernels.adapters as mka

from .hf_helpers import batch, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def adapt(path, model):
    if path == "plain":
        return mka.apply_mora(model, TARGETS, r=4, mora_type=6)
    from peft import get_peft_model

    from mora_kernels.peft_integration import MoRAConfig

    return get_peft_model(model, MoRAConfig(r=4, mora_type=6, target_modules=TARGETS))


def save(path, model, folder):
    if path == "plain":
        mka.save_adapter(model, folder)
    else:
        model.save_pretrained(folder)


def load(path, folder):
    if path == "plain":
        return mka.load_adapter(tiny_llama(), folder)
    from mora_kernels.peft_integration import from_pretrained

    return from_pretrained(tiny_llama(), folder)


def merge(path, model):
    return mka.merge(model) if path == "plain" else model.merge_and_unload()


@pytest.mark.parametrize("path", ["plain", "peft"])
def test_train_save_reload_merge(path, tmp_path):
    model = adapt(path, tiny_llama())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.shape[0] == p.shape[1] for p in trainable)  # only the square matrices M
    optimizer = torch.optim.AdamW(trainable, lr=5e-2)
    ids = batch()
    model.train()
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(f"{path}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    # Full batch, no dropout: the loss is deterministic, so a fall is the adapter learning, not noise. The base
    # model alone stays at ~ln(128) = 4.85; MoRA on three projections of a model with 0.02-scale weights moves it
    # by ~0.5 nats in 12 steps.
    assert losses[-1] < losses[0] - 0.3

    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
    save(path, model, tmp_path)
    reloaded = load(path, tmp_path)
    with torch.no_grad():
        # the same float32 weights through the same ops: identical
        torch.testing.assert_close(reloaded(ids).logits, adapted, atol=0, rtol=0)
        merged = merge(path, reloaded)
        # merged W + dW rounds each weight once in float32 (~6e-8 relative); through two layers to logits of
        # size ~1 that stays far below 1e-5, while a wrong merge changes logits by ~1e-2 or more
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=0)
    assert not any("lora" in n or "adapters" in n for n, _ in merged.named_parameters())
