"""MoRA computed the way the original release computes it: the "original" baseline of the benchmarks.

Written from the description of the original release in docs/design.md (no code copied): the input is upcast to M's
dtype, padded by concatenating its own first ``P`` columns, viewed as ``(B, R)`` blocks, then summed (type 1) or
rotated block by block with cached cos/sin tables (type 6); ``M`` is applied as an ``nn.Linear`` without bias, and
the output is decompressed by concatenating copies of the result and slicing to ``m``. Each of these steps is a
separate PyTorch op with its own memory round trip, which is what the fused kernels remove.

Only types 1 and 6 (the ones used for fine-tuning) are implemented, and like the original it refuses ``P > n``.
The cos/sin tables are built once at construction and kept in float32, as the original's cache would be after its
first call (their creation is not part of the timed work, as in a training loop).
"""

from __future__ import annotations

import torch
from torch import nn

from mora_kernels import r_hat
from mora_kernels.core import rope_tables


class OriginalMoRALinear(nn.Module):
    """``base(x) + scaling * D(M C(x))`` with the original release's sequence of ops; ``M`` float32,
    zero-initialised."""

    def __init__(self, base: nn.Linear, r: int, mora_type: int, scaling: float = 1.0):
        super().__init__()
        if mora_type not in (1, 6):
            raise ValueError(f"mora_type must be 1 or 6 for the original-release baseline, got {mora_type!r}")
        self.base = base.requires_grad_(False)
        self.n, self.m = base.in_features, base.out_features
        self.mora_type = mora_type
        self.R = R = r_hat(self.n, self.m, r, mora_type)
        self.blocks = -(-self.n // R)
        self.pad = self.blocks * R - self.n
        if self.pad > self.n:
            raise ValueError(
                f"the original release cannot pad in_features={self.n} to {self.blocks * R} (P={self.pad} > n)"
            )
        # The original stores M as the weight of an nn.Linear(R, R, bias=False) in float32.
        self.lora_A = nn.Linear(R, R, bias=False, device=base.weight.device, dtype=torch.float32)
        nn.init.zeros_(self.lora_A.weight)
        self.scaling = scaling
        if mora_type == 6:
            cos, sin = rope_tables(R, self.blocks, base.weight.device)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    @property
    def M(self) -> nn.Parameter:
        return self.lora_A.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        x = x.to(self.lora_A.weight.dtype)
        if self.pad:
            x = torch.cat([x, x[..., : self.pad]], dim=-1)
        x = x.view(*x.shape[:-1], self.blocks, self.R)
        if self.mora_type == 1:
            y = self.lora_A(x.sum(dim=-2))
            copies = -(-self.m // self.R)
            out = torch.cat([y] * copies, dim=-1)[..., : self.m]
        else:
            half = self.R // 2
            rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
            y = self.lora_A(x * self.cos + rotated * self.sin)
            out = y.reshape(*y.shape[:-2], self.blocks * self.R)
            if out.shape[-1] < self.m:
                copies = -(-self.m // out.shape[-1])
                out = torch.cat([out] * copies, dim=-1)
            out = out[..., : self.m]
        return (result + out * self.scaling).to(result.dtype)


def original_merge_delta(M: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Type 1's dW built as the original release's merge does (docs/design.md, D5): a Python loop over the ``n + P``
    columns of the padded input, each adding M's column ``c mod R`` (rows tiled to m) into x's column ``c mod n``."""
    R = M.shape[0]
    padded = -(-in_features // R) * R
    rows = M.repeat(-(-out_features // R), 1)[:out_features]
    delta = M.new_zeros(out_features, in_features)
    for c in range(padded):
        delta[:, c % in_features] += rows[:, c % R]
    return delta
