"""What every backend shares: the MoRA types, the square-size rule, index maps, rotary tables and input checks.

Everything here follows ``docs/design.md``. Backends (reference, Triton, CUDA) import from this module so that a
shape or dtype is accepted or refused in exactly the same way whichever backend runs.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# float64 runs the reference: no fused backend computes in it (MoRA in float64 is a testing configuration).
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT64_MAX = 2**63 - 1


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
        if key.isascii() and key.isdigit():  # not "²" or other Unicode digits, which int() may refuse or read
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


def check_int(value, argument: str, minimum: int = 1, error: type[Exception] | None = None) -> int:
    """``value`` as an int in ``[minimum, 2**63 - 1]`` (sizes become int64 index tensors; a bool is no int), else a
    TypeError (not an int) or ValueError (out of range) naming the argument; ``error`` raises that class for both
    (a field of a file, or an argument documented to raise one class)."""
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise (error or TypeError)(f"{argument} must be {kind}, got {value!r}")
    if value < minimum:
        raise (error or ValueError)(f"{argument} must be >= {minimum}, got {value}")
    if value > INT64_MAX:
        raise (error or ValueError)(f"{argument} must be <= 2**63 - 1, got {value}")
    return int(value)


def check_float_dtype(dtype, argument: str) -> torch.dtype:
    """``dtype`` if it is one MoRA computes in (float64, float32, float16, bfloat16), else a TypeError naming the
    argument."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{argument} must be float64, float32, float16 or bfloat16, got {dtype}")
    return dtype


def check_float_tensor(tensor, argument: str) -> torch.Tensor:
    """``tensor`` if it is a dense floating tensor of a dtype MoRA computes in, else a TypeError naming it."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {type(tensor).__name__}")
    check_float_dtype(tensor.dtype, argument)
    if tensor.layout != torch.strided:
        raise TypeError(f"{argument} must be a dense (strided) tensor, got layout {tensor.layout}")
    return tensor


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


def check_target_modules(target_modules) -> str | list[str]:
    """``target_modules`` as a regex str (that compiles) or a list of str, or an error naming it."""
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as error:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regex ({error})") from None
        return target_modules
    if not isinstance(target_modules, Iterable):
        raise TypeError(f"target_modules must be a regex str or a list of module names, got {target_modules!r}")
    names = list(target_modules)
    bad = [t for t in names if not isinstance(t, str)]
    if bad:
        raise TypeError(f"target_modules: module names must be str, got {bad!r}")
    return names


def r_hat(in_features: int, out_features: int, r: int, mora_type: int | str = 1) -> int:
    """Square size R of MoRA's matrix from the LoRA rank r: ``round(sqrt((n + m) r))``, even for types 6/7.

    Checkpoints store only ``r``, so this must match the original release exactly. It computes
    ``floor(sqrt(N) + 0.5)`` with integers: ``k = isqrt(N)`` rounds up exactly when ``N > k^2 + k``
    (``sqrt(N)`` is never exactly ``k + 0.5`` for an integer N), so no float rounding can move the result.
    """
    n = check_int(in_features, "in_features")
    m = check_int(out_features, "out_features")
    r = check_int(r, "r")
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

    @property
    def one_to_one(self) -> bool:
        """Whether the update dW = D M C determines M: exactly when R <= min(n, m), for every type
        (docs/design.md#one-to-one). Pruning merges (TIES, DARE) of M are merges of the updates only then."""
        return self.R <= min(self.n, self.m)


def check_matrix(M, in_features, out_features, mora_type) -> Geometry:
    """Validate M against the layer sizes and the type; every message names the argument and what was expected."""
    check_float_tensor(M, "M")
    if M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 1:
        raise ValueError(f"M must be a square matrix (R, R) with R >= 1, got shape {tuple(M.shape)}")
    n = check_int(in_features, "in_features")
    m = check_int(out_features, "out_features")
    t = mora_type_of(mora_type)
    R = M.shape[0]
    if t.blockwise and R % 2:
        raise ValueError(f"M: type {int(t)} rotates half blocks and needs an even square size R, got R={R}")
    return Geometry(n=n, m=m, R=R, t=t)


def check_inputs(x, M, out_features, mora_type, base=None, rope=None, inplace: bool = False) -> Geometry:
    """Validate the functional op's arguments; every message names the argument and what was expected."""
    check_float_tensor(x, "x")
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
        check_float_tensor(base, "base")
        if base.device != x.device:
            raise ValueError(f"base must be on x's device {x.device}, got {base.device}")
        if inplace:
            # Written while x (and M) are read: any shared or self-overlapping memory would race on a GPU.
            if overlaps_itself(base):
                raise ValueError(
                    "base: inplace=True needs a base whose elements do not overlap in memory (not an expand() or an "
                    f"overlapping as_strided view; got shape {tuple(base.shape)}, strides {base.stride()})"
                )
            shared = {t.untyped_storage().data_ptr() for t in (x, M)}
            if base.numel() and base.untyped_storage().data_ptr() in shared:
                raise ValueError("base: inplace=True needs a base that does not share memory with x or M")
    check_rope(rope, geo, x.device)
    return geo


def overlaps_itself(tensor: torch.Tensor) -> bool:
    """Whether two elements of ``tensor`` may share memory (conservative: True unless provably disjoint).

    Provably disjoint: with the dims of size > 1 sorted by stride, each stride is at least the extent of the dims
    before it (``stride_k >= sum_j<k (size_j - 1) stride_j + 1``), as in every contiguous or permuted tensor and
    every slice of one. ``expand()`` (stride 0) and ``as_strided`` views whose rows overlap fail it.
    """
    if tensor.numel() == 0:
        return False
    extent = 0  # the largest offset reachable through the dims visited so far
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape) if sz > 1):
        if stride <= extent:
            return True
        extent += (size - 1) * stride
    return False


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any operand is float64, else float32: MoRA is always computed in at least float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def padded_width(R: int) -> int:
    """R rounded up to a multiple of 16: the row length of the Triton kernels' dense operands (M, ``C(x)``, h)."""
    return -(-R // 16) * 16


def sixteen_bit_products(x_dtype: torch.dtype, m_dtype: torch.dtype) -> torch.dtype | None:
    """The 16-bit dtype a fused backend's products with M run in when x and M are both in it (float16 or bfloat16),
    else None (the other pairs have float32 operands)."""
    return x_dtype if x_dtype == m_dtype and x_dtype in (torch.float16, torch.bfloat16) else None


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


INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_mixed_inputs(x, M, adapter_index, out_features, mora_type, base=None, rope=None,
                       inplace: bool = False) -> Geometry:
    """``check_inputs`` for a mixed-adapter batch: M stacked ``(K, R, R)``, ``adapter_index`` an integer tensor of
    x's leading shape on x's device (its values are checked by ``check_index_values``, which needs them on the host).
    """
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"M must be a torch.Tensor, got {type(M).__name__}")
    if M.dim() != 3 or M.shape[0] < 1:
        raise ValueError(f"M must stack K >= 1 adapters as (K, R, R), got shape {tuple(M.shape)}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    geo = check_inputs(x, M[0], out_features, mora_type, base=base, rope=rope, inplace=inplace)
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index must be a torch.Tensor, got {type(adapter_index).__name__}")
    if adapter_index.dtype not in INDEX_DTYPES:  # torch has few kernels for uint16/32/64 (aminmax, comparisons)
        raise TypeError(f"adapter_index must be an integer tensor of dtype int8, int16, int32, int64 or uint8, "
                        f"got {adapter_index.dtype}")
    if tuple(adapter_index.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"adapter_index must have x's leading shape {tuple(x.shape[:-1])} (one adapter per token), "
            f"got {tuple(adapter_index.shape)}"
        )
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index must be on x's device {x.device}, got {adapter_index.device}")
    return geo


def check_index_values(index: torch.Tensor, K: int) -> None:
    """ValueError unless every value of ``index`` is in [-1, K): a wrong index would read another adapter or memory
    past M. Needs the values on the host (one sync on a GPU); a meta tensor has none to check."""
    if index.numel() and index.device.type != "meta":
        low, high = (int(v) for v in torch.aminmax(index))
        if low < -1 or high >= K:
            raise ValueError(
                f"adapter_index must hold values in [-1, {K}) (-1: no adapter; M holds {K} adapters), "
                f"got values from {low} to {high}"
            )


def check_mixed_scaling(scaling, K: int, device) -> float | torch.Tensor:
    """A float, or a floating ``(K,)`` tensor on ``device`` of finite factors (one per adapter; not differentiated,
    so one that requires grad is refused rather than silently given none)."""
    if not isinstance(scaling, torch.Tensor):
        return check_scaling(scaling)
    if not scaling.is_floating_point():
        raise TypeError(f"scaling must be a float or a floating-point tensor, got {scaling.dtype}")
    if tuple(scaling.shape) != (K,):
        raise ValueError(
            f"scaling: a tensor must hold one factor per adapter, shape ({K},), got {tuple(scaling.shape)}"
        )
    if scaling.device != torch.device(device):
        raise ValueError(f"scaling must be on x's device {device}, got {scaling.device}")
    if scaling.requires_grad:
        raise ValueError("scaling: gradients of the factors are not computed; pass scaling.detach()")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(scaling).all()):
        raise ValueError("scaling must be finite")
    return scaling
