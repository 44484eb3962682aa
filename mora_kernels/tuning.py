"""Measured tile configurations and backend choices, keyed by GPU name and Triton version.

``tuned.json`` (shipped in the package) holds entries written by ``python -m mora_kernels tune`` on a GPU. Each
entry names the GPU (``torch.cuda.get_device_properties(d).name``) and the Triton ``major.minor`` it was measured
with, and holds:

- ``tiles``: the Triton launch configuration ``[BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages]`` of the
  projection kernel per ``project/<rows>/<a>/<dot>`` and of the dM kernel per ``dm/<a>/<dot>`` (``tile_key``);
- ``backend``: which backend ``"auto"`` runs per ``<family>/<dtype>/<rows>`` (``backend_key``), chosen from
  measured forward+backward times of backends whose output matched the reference on that shape.

A key missing from the entry, or a GPU / Triton version without an entry, uses the defaults below: the tiles chosen
by compiling for sm_80/sm_90 without a GPU (no spills on Triton 3.6, 3.8 and 3.9), and the Triton backend for
``auto``. ``python -m mora_kernels info`` prints which applies. The table is read and validated once at import
(never inside a traced function): ``load`` raises a ``ValueError`` naming the file and the field of a malformed
table; the shipped table, if damaged, is ignored with a warning naming the file (the defaults apply).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

TABLE_PATH = Path(__file__).with_name("tuned.json")
SCHEMA = 1

ROWS = ("few", "many")  # rows of A below FEW_ROWS (decode) or not (prefill / training)
A_KINDS = ("dense", "gather", "rope")  # C(x) or h (types 1-4, backward), x's blocks (type 7), rotated blocks (6)
# float32 operands as 3xTF32 (float32 matmul precision "highest"), one TF32 pass ("high") or rounded to bfloat16
# ("medium"), or 16-bit x and M: triton_floor.DotMode.kind
DOTS = ("f32", "tf32", "rb16", "b16")
FAMILIES = ("dense", "blockwise")  # types 1-4, types 6/7
DTYPES = ("float32", "float16", "bfloat16")
BACKEND_CHOICES = ("triton", "cuda", "reference")
FEW_ROWS = 64


class Tile(NamedTuple):
    block_t: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Defaults, compiled for sm_80 and sm_90 without spills on Triton 3.6, 3.8 and 3.9 (``python -m mora_kernels
# kernels``, run by CI for each version). Projection, decode: 32 rows (twice the tensor-core minimum of 16) and 32
# columns of M per program, so decode gets R / 32 programs per row tile; every 16-row tile tried spilled on Triton 3.6
# with a float32 operand (3xTF32 holds each operand tile twice): 16x64x64 8-176 bytes (rotated gather, type 6),
# 16x64x32 8 bytes on sm_80, 16x32x32 and 16x32x16 8 bytes on sm_90 (dense C(x)), while 32x32x32 spills nowhere.
# Prefill: 64x64 accumulators reuse each loaded M tile over 64 rows, at 8 warps (at 4 the rotated gather's index
# math spilled 400-800 bytes on sm_90) and BLOCK_K 16 (at 32 the rotated gather spilled on sm_80). dM: 64x64 output
# tiles, 16 rows per step, 8 warps (4 warps x 32 rows spilled 1.5-4.3 KB). num_stages 3 is Triton's own default for
# CUDA; the tuning sweep tries 2 as well.
# Per dot kind (``<kernel>/<dot>``, before ``<kernel>``) where the shared tile spills: 8-16 bytes, on sm_80 with
# Triton 3.6 at 72-80 registers, and on 3.8 and 3.9. "tf32" (one TF32 pass): the 32x32x32 decode tile spilled on
# 3.6 and 3.9, also at 2 stages; BLOCK_K 16 (the same MMAs per element of the reduction, half the operand
# registers) at 2 stages does not (at 3 it spilled 8 bytes on 3.8, sm_90, rotated with base). dM spilled in the
# mixed kernel at 8 warps (3.6: 3 stages over gathered 16-bit x; 3.9: 2 stages over rotated float32 x), and 64x32
# with float32 x; 4 warps at 2 stages spill nowhere. "rb16" (float32 operands rounded to
# bfloat16, loaded as float32): the decode tile spilled at 32x32x32 (3 stages: dense; 2 stages: the mixed kernel)
# and at 32x32x16 (the mixed rotated decode, 2 or 3 stages), 16x32x16 does not; prefill spilled at 3 stages (3.9,
# dense, 16-bit out) and at BLOCK_K 32 (3.6, rotated, 56-72 bytes), 2 stages does not.
# Per operand kind and dot kind (``<kernel>/<a_kind>/<dot>``, before ``<kernel>/<dot>``), for the single-adapter
# kernels only (the mixed ones keep the shared keys: ``tile(operand_defaults=False)``), where reading x's blocks one
# block per tile (triton_floor.block_tile) and padding M (triton_floor.padded_m) changed the machine code. The
# rotated decode: under "highest" (3xTF32, Triton's own below 64 rows) 32x32x32 spilled 8 bytes on sm_90 with
# Triton 3.8 (16-bit x, with base) and 32x32x16 at 3 stages on sm_90 with 3.9 (float32 x, 16-bit M, with base), 2
# stages does not; 16-bit dots at 32x32x32 and "high" at 32x32x16, 3 and 2 stages, spilled 8 bytes on sm_80 with
# 3.6 (with base; at 128 and 80 registers), 2 and 3 stages respectively do not. The gathered decode (type 7) under
# "high" at 32x32x16 spilled 16 bytes on sm_80 with 3.8 at 2 stages (72 registers), and 8 at 3 stages once x's
# columns were known to be multiples of 4 (VEC = 4; 32x32x32 spilled at 4 stages): 32x16x16 spills at neither.
# With VEC (triton_mora.vector_width) the rotated decode spilled 8 bytes under "highest" at 32x32x16, 2 stages, on
# sm_80 with 3.6 (VEC 4; 32x16x16 spilled on 3.8), 16x32x16 spills nowhere, and under "high" at 32x32x16, 3 stages,
# on sm_90 with 3.9 (VEC 4), 32x16x16 does not; dense prefill under "high" at 64x64x16, 3 stages, spilled 16 bytes
# on sm_80 with 3.6 (type 2/4 groups, VEC 8), 64x32x16 at 2 stages does not; the rotated decode with 16-bit dots at
# 32x32x32, 2 stages, spilled 8 bytes on sm_80 with 3.6 (VEC 8, with base), 32x32x16 at 3 stages does not. Dense
# prefill under "medium" at 64x64x16 spilled 8 bytes on sm_80 with 3.9 (type 2/4 groups, 80 registers), and at 3
# stages on 3.8; 64x32x16 does not. dM of the gathered blocks under "highest" spilled 8 bytes at 3 stages on sm_80
# with 3.9 (float16 x); 2 does not. Each checked on 3.6, 3.8 and 3.9.
# Aligned projections over x's blocks (``<kernel>/<dot>/aligned``, looked up first for launches that
# ``triton_mora.aligned`` accepts, compiled with that specialization): vectorized loads and one epilogue leave room
# for 128 x 128 x 32 prefill tiles (up to 208 registers with 16-bit or "medium" dots, 254 under "high", no spills on
# 3.6, 3.8 and 3.9), which read each x tile for 128 columns of M and each M tile for 128 tokens: the static model
# puts q_proj's type 6 prefill (bf16) at 97 us against 192 with 64 x 64 (L2-bound). 128 x 256 (70 us) spilled
# 184-744 bytes with a base (a 128 x 256 base tile beside the accumulator); under "highest" (three accumulators)
# every tile above 64 x 64 spilled and the model has it latency-bound anyway, so it keeps the shared tile. The
# aligned decode under "highest" spilled 8 bytes at 32 x 32 x 16 (rotated, sm_90 with 3.8, sm_80 with 3.6) and 32 x
# 32 x 32 (gathered, 3.8): 32 x 16 x 16 at 2 stages (80 registers) models the same 8 us for q_proj.
DEFAULT_TILES = {
    "project/few": Tile(32, 32, 32, 4, 3),
    "project/many": Tile(64, 64, 16, 8, 3),
    "dm": Tile(64, 64, 16, 8, 3),
    "project/few/tf32": Tile(32, 32, 16, 4, 2),
    "project/few/rb16": Tile(16, 32, 16, 4, 3),
    "project/many/rb16": Tile(64, 64, 16, 8, 2),
    "dm/tf32": Tile(64, 64, 16, 4, 2),
    # per operand kind and dot kind: the single-adapter kernels only (see above)
    "project/few/rope/f32": Tile(16, 32, 16, 4, 2),
    "project/few/rope/tf32": Tile(32, 16, 16, 4, 3),
    "project/few/rope/b16": Tile(32, 32, 16, 4, 3),
    "project/few/gather/tf32": Tile(32, 16, 16, 4, 3),
    "project/many/dense/tf32": Tile(64, 32, 16, 8, 2),
    "project/many/dense/rb16": Tile(64, 32, 16, 8, 2),
    "dm/gather/f32": Tile(64, 64, 16, 8, 2),
    # aligned projections over x's blocks (triton_mora.aligned; see above)
    "project/few/f32/aligned": Tile(32, 16, 16, 4, 2),
    "project/many/b16/aligned": Tile(128, 128, 32, 8, 3),
    "project/many/tf32/aligned": Tile(128, 128, 32, 8, 3),
    "project/many/rb16/aligned": Tile(128, 128, 32, 8, 3),
}


def tile_key(kernel: str, a_kind: str, dot: str, rows: str | None = None) -> str:
    """``project/<rows>/<a_kind>/<dot>`` or ``dm/<a_kind>/<dot>``."""
    return f"{kernel}/{rows}/{a_kind}/{dot}" if kernel == "project" else f"{kernel}/{a_kind}/{dot}"


def backend_key(family: str, dtype: torch.dtype, rows: str) -> str:
    return f"{family}/{str(dtype).removeprefix('torch.')}/{rows}"


def _valid_keys():
    tiles = {tile_key("project", a, d, r) for r in ROWS for a in A_KINDS for d in DOTS}
    tiles |= {tile_key("dm", a, d) for a in A_KINDS for d in DOTS}
    backends = {f"{f}/{t}/{r}" for f in FAMILIES for t in DTYPES for r in ROWS}
    return tiles, backends


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _power_of_two(v) -> bool:
    return _positive_int(v) and v & (v - 1) == 0


def validate(table, where: str = str(TABLE_PATH)) -> dict:
    """``table`` if it is a well-formed tuning table; else a ValueError naming ``where`` and the field."""
    if not isinstance(table, dict) or table.get("schema") != SCHEMA or not isinstance(table.get("entries"), list):
        raise ValueError(f"{where}: expected a JSON object with 'schema': {SCHEMA} and an 'entries' list")
    tile_keys, backend_keys = _valid_keys()
    seen = set()
    for i, entry in enumerate(table["entries"]):
        field = f"{where}: entries[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{field} must be an object")
        gpu, version = entry.get("gpu"), entry.get("triton")
        if not isinstance(gpu, str) or not gpu:
            raise ValueError(f"{field}.gpu must be a non-empty string (the device name)")
        if not isinstance(version, str) or len(version.split(".")) != 2 or not all(
                p.isdigit() for p in version.split(".")):
            raise ValueError(f"{field}.triton must be 'major.minor', got {version!r}")
        if (gpu, version) in seen:
            raise ValueError(f"{field}: a second entry for {gpu!r} with Triton {version}")
        seen.add((gpu, version))
        tiles, backends = entry.get("tiles", {}), entry.get("backend", {})
        if not isinstance(tiles, dict) or not isinstance(backends, dict):
            raise ValueError(f"{field}.tiles and .backend must be objects")
        for key, tile in tiles.items():
            if key not in tile_keys:
                raise ValueError(f"{field}.tiles: unknown key {key!r} (expected one of {sorted(tile_keys)})")
            if not (isinstance(tile, list) and len(tile) == 5 and all(map(_power_of_two, tile[:4]))
                    and _positive_int(tile[4])):
                raise ValueError(f"{field}.tiles[{key!r}] must be [BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages], "
                                 f"4 powers of two and a positive integer, got {tile!r}")
            # tl.dot needs every tile dimension >= 16 on a GPU; more than 16 warps or 8 stages is not a tile.
            if min(tile[:3]) < 16 or max(tile[:3]) > 256 or tile[3] > 16 or tile[4] > 8:
                raise ValueError(f"{field}.tiles[{key!r}] = {tile}: blocks must be 16..256, warps <= 16, "
                                 "stages <= 8")
        for key, choice in backends.items():
            if key not in backend_keys:
                raise ValueError(f"{field}.backend: unknown key {key!r} (expected one of {sorted(backend_keys)})")
            if choice not in BACKEND_CHOICES:
                raise ValueError(f"{field}.backend[{key!r}] must be one of {BACKEND_CHOICES}, got {choice!r}")
    return table


def load(path: Path | str = TABLE_PATH) -> dict:
    """The validated table at ``path``; an empty table when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return {"schema": SCHEMA, "entries": []}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{path}: not a UTF-8 JSON file ({error})") from None
    return validate(table, str(path))


def _load_shipped(path: Path = TABLE_PATH) -> dict:
    """The table ``auto`` and the launchers use: ``load(path)``, or, if that file is damaged (a failed edit,
    a bad merge), the empty table with a warning naming the file, so that ``import mora_kernels`` still works."""
    try:
        return load(path)
    except (OSError, ValueError) as error:
        warnings.warn(f"{path}: ignored, the default tiles and backends apply ({error})", RuntimeWarning,
                      stacklevel=2)
        return {"schema": SCHEMA, "entries": []}


_TABLE = _load_shipped()
# Tiles a tuning sweep tries (key -> Tile), consulted before the table; empty outside ``python -m mora_kernels tune``.
OVERRIDES: dict[str, Tile] = {}


def triton_version() -> str:
    import triton

    return ".".join(triton.__version__.split(".")[:2])


def entry_for(gpu: str, version: str) -> dict | None:
    return next((e for e in _TABLE["entries"] if e["gpu"] == gpu and e["triton"] == version), None)


def _device_entry(device: torch.device) -> dict | None:
    # Called by every launch: without entries (nothing measured) it asks nothing of the device, and a device with an
    # index asks once (_ENTRIES; ops.forget_choices forgets them).
    if device.type != "cuda" or not _TABLE["entries"]:
        return None
    if device in _ENTRIES:
        return _ENTRIES[device]
    entry = entry_for(torch.cuda.get_device_properties(device).name, triton_version())
    if device.index is not None:  # "cuda" alone is whichever GPU is current
        _ENTRIES[device] = entry
    return entry


_ENTRIES: dict[torch.device, dict | None] = {}


def forget_entries() -> None:
    """Forget which table entry each device uses (the table, the Triton version or the device changed)."""
    _ENTRIES.clear()


def tile(device: torch.device, kernel: str, a_kind: str, dot: str, rows: str | None = None,
         operand_defaults: bool = True, aligned: bool = False) -> Tile:
    """The launch configuration of ``kernel`` ("project" or "dm") for this device: override, table, default.
    ``operand_defaults=False`` (the mixed kernels) skips the defaults chosen per operand kind, which were chosen for
    the single-adapter kernels' machine code; ``aligned``: the launch is one of ``triton_mora.aligned``'s, which
    has default tiles of its own (``default_tile``)."""
    key = tile_key(kernel, a_kind, dot, rows)
    if key in OVERRIDES:
        return OVERRIDES[key]
    entry = _device_entry(device)
    if entry is not None and key in entry.get("tiles", {}):
        return Tile(*entry["tiles"][key])
    return default_tile(kernel, a_kind if operand_defaults else None, dot, rows, aligned)


def default_tile(kernel: str, a_kind: str | None, dot: str, rows: str | None = None, aligned: bool = False) -> Tile:
    """``DEFAULT_TILES``' tile for ``kernel`` ("project" with ``rows``, or "dm"), the left operand's kind ``a_kind``
    (None: none of the per-operand keys), the dot kind ``dot`` and, for ``aligned`` launches, the keys ending in
    ``/aligned`` first: the most specific key present."""
    family = f"project/{rows}" if kernel == "project" else kernel
    keys = (f"{family}/{a_kind}/{dot}", f"{family}/{dot}")
    for key in (*(f"{key}/aligned" for key in keys if aligned), *keys):
        if key in DEFAULT_TILES:
            return DEFAULT_TILES[key]
    return DEFAULT_TILES[family]


def auto_backend(device: torch.device, blockwise: bool, dtype: torch.dtype, rows: int) -> str | None:
    """The measured backend for ``auto`` on this device and shape class, or None when nothing was measured."""
    entry = _device_entry(device)
    if entry is None:
        return None
    key = backend_key("blockwise" if blockwise else "dense", dtype, "few" if rows < FEW_ROWS else "many")
    return entry.get("backend", {}).get(key)


def describe(device: torch.device | str | None = None) -> str:
    """One line for ``info``: which table entry the launchers and ``auto`` use on ``device``."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return f"tuning: {len(_TABLE['entries'])} measured entries in {TABLE_PATH.name}; none applies on {device}"
    try:
        version = triton_version()
    except ImportError:
        return "tuning: Triton not installed"
    name = torch.cuda.get_device_properties(device).name
    entry = entry_for(name, version)
    if entry is None:
        return (f"tuning: no measured entry for {name} with Triton {version}: default tiles, and auto runs Triton "
                "(run `python -m mora_kernels tune` to measure)")
    return (f"tuning: measured entry for {name} with Triton {version} ({entry.get('measured', 'date unknown')}): "
            f"{len(entry.get('tiles', {}))} tiles, {len(entry.get('backend', {}))} backend choices")
