"""Shared by the adapter tests: the golden adapter of the original release and a tiny offline Llama."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded

import torch  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "original_adapter_rope"


def golden_expected() -> dict:
    return torch.load(GOLDEN / "expected.pt", weights_only=True)


def golden_base(dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(GOLDEN / "base", dtype=dtype)


def tiny_llama(seed: int = 0, dtype=torch.float32):
    """A random LlamaForCausalLM, hidden 64, 2 layers, vocab 128, built offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def batch(seed: int = 1, rows: int = 4, length: int = 16) -> torch.Tensor:
    """Token ids with an easy pattern (each row counts up from a random start), so a few steps lower the loss."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 128, (rows, 1), generator=g)
    return (start + torch.arange(length)) % 128


def tiny_gpt2(seed: int = 0, dtype=torch.float32):
    """A random GPT2LMHeadModel (transformers' Conv1D layers), hidden 64, 2 layers, vocab 128, built offline."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).to(dtype).eval()
