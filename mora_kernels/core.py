"""What every backend shares: the MoRA types, the square-size rule, index maps, rotary tables and input checks.

Everything here follows ``docs/design.md``. Backends (reference, Triton, CUDA) import from this module so that a
shape or dtype is accepted or refused in exactly the same way whichever backend runs.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class MoRAType(enum.IntEnum):
    """The compress/decompress pairs. Values 1-4 and 6 are the original release's ``mora_type``."""

    SHARING = 1  # compress: strided sum of blocks;   decompress: tile
    GROUPED = 2  # compress: contiguous groups;        decompress: repeat-interleave
    GROUPED_TILE = 3  # compress: contiguous groups;   decompress: tile
    SHARING_GROUPED = 4  # compress: strided sum;      decompress: repeat-interleave
    ROPE = 6  # decoupled blocks, each rotated, then one shared M per block
    DECOUPLED = 7  # type 6 without the rotation (not in the original release; this package's number)

    @property
    def blockwise(self) -> bool:
        """Types 6 and 7 apply M to each block of the padded input instead of to one compressed vector."""
        return self in (MoRAType.ROPE, MoRAType.DECOUPLED)

    @property
    def compress_groups(self) -> bool:
        return self in (MoRAType.GROUPED, MoRAType.GROUPED_TILE)

    @property
    def decompress_groups(self) -> bool:
        return self in (MoRAType.GROUPED, MoRAType.SHARING_GROUPED)


_TYPE_NAMES = {"sharing": MoRAType.SHARING, "rope": MoRAType.ROPE, "decoupled": MoRAType.DECOUPLED}


def mora_type_of(mora_type: int | str | MoRAType, argument: str = "mora_type") -> MoRAType:
    """Normalise ``mora_type`` (1, 2, 3, 4, 6, 7, or "sharing" / "rope" / "decoupled") or raise ValueError."""
    if isinstance(mora_type, str):
        key = mora_type.strip().lower()
        if key in _TYPE_NAMES:
            return _TYPE_NAMES[key]
        if key.isdigit():
            mora_type = int(key)
    if isinstance(mora_type, bool) or not isinstance(mora_type, int):
        raise TypeError(
            f"{argument} must be one of 1, 2, 3, 4, 6, 7 or 'sharing', 'rope', 'decoupled'; got {mora_type!r}"
        )
    try:
        return MoRAType(int(mora_type))
    except ValueError:
        raise ValueError(
            f"{argument} must be one of 1, 2, 3, 4, 6 (the original release's types) or 7 ('decoupled'); "
            f"got {mora_type!r}"
        ) from None


def _positive_int(value, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{argument} must be >= 1, got {value}")
    return int(value)


def check_scaling(scaling, argument: str = "scaling") -> float:
    """``scaling`` as a finite float, or a TypeError / ValueError naming the argument."""
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"{argument} must be a real number, got {scaling!r}")
    if not math.isfinite(scaling):
        raise ValueError(f"{argument} must be finite, got {scaling}")
    return float(scaling)


def check_dropout(dropout, argument: str = "dropout") -> float:
    """``dropout`` as a float probability in [0, 1), or a TypeError / ValueError naming the argument."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"{argument} must be a float in [0, 1), got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{argument} must be in [0, 1), got {dropout}")
    return float(dropout)


def r_hat(in_features: int, out_features: int, r: int, mora_type: int | str = 1) -> int:
    """Square size R of MoRA's matrix from the LoRA rank r: ``round(sqrt((n + m) r))``, even for types 6/7.

    Checkpoints store only ``r``, so this must match the original release exactly. It computes
    ``floor(sqrt(N) + 0.5)`` with integers: ``k = isqrt(N)`` rounds up exactly when ``N > k^2 + k``
    (``sqrt(N)`` is never exactly ``k + 0.5`` for an integer N), so no float rounding can move the result.
    """
    n = _positive_int(in_features, "in_features")
    m = _positive_int(out_features, "out_features")
    r = _positive_int(r, "r")
    t = mora_type_of(mora_type)
    total = (n + m) * r
    size = math.isqrt(total)
    if total > size * size + size:
        size += 1
    if t.blockwise:
        size = 2 * (size // 2)
        if size < 2:
            raise ValueError(
                f"r={r} is too small for type {int(t)} with in_features={n}, out_features={m}: "
                f"the square size rounds to {size}, and rotation blocks need an even size >= 2"
            )
    return size


def group_index(length: int, groups: int, device=None) -> torch.Tensor:
    """Group of each of ``length`` positions split into ``groups`` contiguous groups (docs/design.md#group-split).

    The first ``s = length mod groups`` groups hold ``q + 1`` positions, the rest ``q``; groups may be empty.
    """
    q, s = divmod(length, groups)
    i = torch.arange(length, device=device)
    if q == 0:
        return i
    head = s * (q + 1)
    return torch.where(i < head, i // (q + 1), s + (i - head) // q)


def rope_tables(size: int, blocks: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of type 6's angles, shape ``(blocks, size)``, float32.

    As in the original release: frequencies ``1 / 10000^(2t/R)`` in float32, angle ``b * f`` in float32, the two
    halves of a block share angles. Never computed in reduced precision (docs/design.md, D3).
    """
    freqs = 1.0 / (10000 ** (torch.arange(0, size, 2, device=device, dtype=torch.float32) / size))
    angles = torch.outer(torch.arange(blocks, device=device, dtype=torch.float32), freqs)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


@dataclass(frozen=True)
class Geometry:
    """Sizes of one MoRA application: ``n`` inputs, ``m`` outputs, square size ``R``, type ``t``."""

    n: int
    m: int
    R: int
    t: MoRAType

    @property
    def blocks(self) -> int:
        """B = ceil(n / R): blocks of the padded input."""
        return -(-self.n // self.R)

    @property
    def pad(self) -> int:
        """P = B*R - n, filled cyclically from x."""
        return self.blocks * self.R - self.n

    @property
    def used_blocks(self) -> int:
        """Blocks that can reach the output. Types 6/7 skip the rest when m < B*R (docs/design.md#used-blocks)."""
        if self.t.blockwise:
            return min(self.blocks, -(-self.m // self.R))
        return self.blocks


def check_matrix(M, in_features, out_features, mora_type) -> Geometry:
    """Validate M against the layer sizes and the type; every message names the argument and what was expected."""
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"M must be a torch.Tensor, got {type(M).__name__}")
    if M.dtype not in FLOAT_DTYPES:
        raise TypeError(f"M must be float64, float32, float16 or bfloat16, got {M.dtype}")
    if M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 1:
        raise ValueError(f"M must be a square matrix (R, R) with R >= 1, got shape {tuple(M.shape)}")
    n = _positive_int(in_features, "in_features")
    m = _positive_int(out_features, "out_features")
    t = mora_type_of(mora_type)
    R = M.shape[0]
    if t.blockwise and R % 2:
        raise ValueError(f"M: type {int(t)} rotates half blocks and needs an even square size R, got R={R}")
    return Geometry(n=n, m=m, R=R, t=t)


def check_inputs(x, M, out_features, mora_type, base=None, rope=None, inplace: bool = False) -> Geometry:
    """Validate the functional op's arguments; every message names the argument and what was expected."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., in_features) with in_features >= 1, got {tuple(x.shape)}")
    geo = check_matrix(M, x.shape[-1], out_features, mora_type)
    if x.device != M.device:
        raise ValueError(f"x and M must be on the same device, got x on {x.device} and M on {M.device}")
    if base is not None:
        if not isinstance(base, torch.Tensor):
            raise TypeError(f"base must be a torch.Tensor or None, got {type(base).__name__}")
        expected = (*x.shape[:-1], geo.m)
        if tuple(base.shape) != expected:
            raise ValueError(
                f"base must have shape {expected} (x's leading dims, out_features), got {tuple(base.shape)}"
            )
        if base.dtype not in FLOAT_DTYPES:
            raise TypeError(f"base must be float64, float32, float16 or bfloat16, got {base.dtype}")
        if base.device != x.device:
            raise ValueError(f"base must be on x's device {x.device}, got {base.device}")
        if inplace:
            # Written while x (and M) are read: any shared or self-overlapping memory would race on a GPU.
            if any(stride == 0 and size > 1 for stride, size in zip(base.stride(), base.shape)):
                raise ValueError("base: inplace=True needs a base whose elements do not overlap (not an expand())")
            shared = {t.untyped_storage().data_ptr() for t in (x, M)}
            if base.numel() and base.untyped_storage().data_ptr() in shared:
                raise ValueError("base: inplace=True needs a base that does not share memory with x or M")
    check_rope(rope, geo, x.device)
    return geo


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any operand is float64, else float32: MoRA is always computed in at least float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_rope(rope, geo: Geometry, device) -> None:
    """Validate optional type-6 tables ``(cos, sin)``: float32, ``(>= used blocks, R)``, on ``device``."""
    if rope is None:
        return
    if geo.t != MoRAType.ROPE:
        raise ValueError(f"rope tables are only used by type 6, got mora_type={int(geo.t)}")
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise TypeError("rope must be a pair (cos, sin) of float32 tensors")
    for name, table in zip(("rope cos", "rope sin"), rope):
        if not isinstance(table, torch.Tensor) or table.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor")
        if table.dim() != 2 or table.shape[1] != geo.R or table.shape[0] < geo.used_blocks:
            raise ValueError(
                f"{name} must have shape (>= {geo.used_blocks}, {geo.R}) for R={geo.R}, got {tuple(table.shape)}"
            )
        if table.device != torch.device(device):
            raise ValueError(f"{name} must be on {device}, got {table.device}")
