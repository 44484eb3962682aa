"""``python -m mora_kernels tune``: measure, on the GPU at hand, the Triton tiles and the backend ``auto`` should run,
and write them as a ``tuning`` table entry (``--install`` merges such an entry into the package's ``tuned.json``).

The sweep is bounded by a time budget and runs its keys in order of use (float32 M, the layer's default, first;
types 6 and 1 before 7). For each tile key it times forward + backward of one representative problem per key
(n = m = 4096, bfloat16 x and base, R = 256; "few" rows: about 32 rows of A, "many": 4096 tokens) with the candidate
in ``tuning.OVERRIDES``, keeps only candidates whose compiled kernels report no spills and whose output matches the
default tile's, and records the fastest. The backend choice times Triton and CUDA on the same problems after checking
each against the float64 reference; a backend that fails the check or cannot run is never chosen.
"""

from __future__ import annotations

import datetime
import json
import math
import subprocess
import time
from pathlib import Path

import torch

from . import reference, tuning
from .core import Geometry, MoRAType, r_hat
from .files import write_file
from .tuning import Tile

N = M_OUT = 4096
RANK = 8  # R = r_hat(4096, 4096, 8) = 256
TOKENS_MANY = 4096

# Candidates per kernel and row class: powers of two, dot tiles >= 16 (the GPU compiler's minimum K).
CANDIDATES = {
    "project/few": [Tile(32, 32, 32, 4, 3), Tile(32, 32, 32, 4, 2), Tile(16, 32, 32, 4, 3), Tile(16, 64, 32, 4, 3),
                    Tile(16, 64, 16, 4, 3), Tile(32, 64, 32, 4, 3), Tile(16, 128, 32, 4, 3)],
    "project/many": [Tile(64, 64, 16, 8, 3), Tile(64, 64, 16, 8, 2), Tile(64, 64, 16, 4, 3), Tile(64, 64, 32, 8, 3),
                     Tile(128, 64, 16, 8, 3), Tile(64, 128, 16, 8, 3), Tile(128, 128, 16, 8, 3),
                     Tile(32, 64, 32, 4, 3)],
    "dm": [Tile(64, 64, 16, 8, 3), Tile(64, 64, 16, 8, 2), Tile(64, 64, 32, 8, 3), Tile(128, 64, 16, 8, 3),
           Tile(64, 128, 16, 8, 3), Tile(32, 32, 32, 4, 3), Tile(128, 128, 16, 8, 3)],
}
_TYPE_OF_KIND = {"rope": MoRAType.ROPE, "dense": MoRAType.SHARING, "gather": MoRAType.DECOUPLED}


def tile_keys_in_order() -> list[str]:
    keys = []
    for dot in tuning.DOTS:
        for a_kind in ("rope", "dense", "gather"):
            for rows in ("many", "few"):
                keys.append(tuning.tile_key("project", a_kind, dot, rows))
            keys.append(tuning.tile_key("dm", a_kind, dot))
    return keys


def _problem(t: MoRAType, rows: str, x_dtype: torch.dtype, m_dtype: torch.dtype, seed: int = 0):
    R = r_hat(N, M_OUT, RANK, int(t))
    geo = Geometry(N, M_OUT, R, t)
    Bu = geo.used_blocks if t.blockwise else 1
    tokens = TOKENS_MANY if rows == "many" else max(1, 32 // Bu)
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, N, device="cuda", generator=g).to(x_dtype)
    M = (torch.randn(R, R, device="cuda", generator=g) / math.sqrt(R)).to(m_dtype)
    base = torch.randn(tokens, M_OUT, device="cuda", generator=g).to(x_dtype)
    grad = torch.randn(tokens, M_OUT, device="cuda", generator=g).to(x_dtype)
    return geo, x, M, base, grad


def _fwd_bwd(backend: str, geo, x, M, base, grad):
    from .ops import apply

    x = x.detach().requires_grad_()
    M = M.detach().requires_grad_()
    out = apply(x, M, geo, None, 0.5, base, backend)
    dx, dM = torch.autograd.grad(out, (x, M), grad)
    return out, dx, dM


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=20))


def _new_spills(before: set) -> tuple[set, int]:
    """Compiled Triton kernels of the backend since ``before`` (ids), and the largest spill count among them."""
    from . import triton_mora

    now, spills = set(), 0
    for name in ("_project_kernel", "_dm_kernel"):
        for cache in getattr(triton_mora, name).device_caches.values():
            for compiled in cache[0].values():
                now.add(id(compiled))
                if id(compiled) not in before:
                    spills = max(spills, getattr(compiled, "n_spills", 0) or 0)
    return now, spills


def _max_rel_diff(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def sweep_tiles(deadline: float, log) -> tuple[dict, list]:
    from .triton_floor import float32_matmul_precision

    tiles, measurements = {}, []
    for key in tile_keys_in_order():
        if time.monotonic() > deadline:
            log(f"time budget spent: {key} and later keys keep their defaults")
            break
        parts = key.split("/")
        kernel, a_kind, dot = parts[0], parts[-2], parts[-1]
        rows = parts[1] if kernel == "project" else "many"
        # "b16": a bfloat16 M; else a float32 M under the float32 matmul precision giving that kind (DotMode.of)
        m_dtype = torch.bfloat16 if dot == "b16" else torch.float32
        precision = {"tf32": "high", "rb16": "medium"}.get(dot, "highest")
        problem = _problem(_TYPE_OF_KIND[a_kind], rows, torch.bfloat16, m_dtype)
        family = CANDIDATES[f"project/{rows}" if kernel == "project" else "dm"]
        default = tuning.default_tile(kernel, a_kind, dot, rows)
        results, baseline = {}, None
        seen, _ = _new_spills(set())
        for candidate in [default] + [c for c in family if c != default]:
            if time.monotonic() > deadline:
                break
            tuning.OVERRIDES[key] = candidate
            try:
                with float32_matmul_precision(precision):
                    out = _fwd_bwd("triton", *problem)
                    torch.cuda.synchronize()
                    seen, spills = _new_spills(seen)
                    if baseline is None:
                        baseline = out
                    diff = max(_max_rel_diff(a, b) for a, b in zip(out, baseline))
                    ms = _bench_ms(lambda: _fwd_bwd("triton", *problem))
                ok = spills == 0 and diff < 1e-2  # same maths: only the float32 summation order may differ
                results[candidate] = ms if ok else math.inf
                measurements.append(dict(key=key, tile=list(candidate), ms=ms, spills=spills, rel_diff=diff))
            except Exception as error:  # a tile the compiler rejects (shared memory, registers) is not a choice
                measurements.append(dict(key=key, tile=list(candidate), error=f"{type(error).__name__}: {error}"[:300]))
                results[candidate] = math.inf
            finally:
                tuning.OVERRIDES.pop(key, None)
        if results:
            best = min(results, key=results.get)
            if math.isfinite(results[best]):
                tiles[key] = list(best)
                log(f"{key}: {best} {results[best]:.3f} ms (default {results.get(default, math.inf):.3f} ms)")
    return tiles, measurements


def sweep_backends(deadline: float, log) -> tuple[dict, list]:
    from .ops import backend_status

    choices, measurements = {}, []
    usable = [name for name in ("triton", "cuda") if backend_status(name, "cuda")[0]]
    for family, t in (("blockwise", MoRAType.ROPE), ("dense", MoRAType.SHARING)):
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            for rows in ("many", "few"):
                if time.monotonic() > deadline:
                    log("time budget spent: remaining backend choices stay Triton")
                    return choices, measurements
                key = tuning.backend_key(family, dtype, rows)
                geo, x, M, base, grad = _problem(t, rows, dtype, torch.float32)
                want = reference.forward(x.double(), M.double(), geo, None, 0.5, base.double())
                plain = reference.forward(x, M.to(dtype), geo, None, 0.5, base)  # plain PyTorch in x's dtype
                allowed = 2 * _max_rel_diff(plain, want) + 1e-5
                timings = {}
                for name in usable:
                    try:
                        out = _fwd_bwd(name, geo, x, M, base, grad)[0]
                        error = _max_rel_diff(out, want)
                        ms = _bench_ms(lambda: _fwd_bwd(name, geo, x, M, base, grad))
                        measurements.append(dict(key=key, backend=name, ms=ms, rel_error=error, allowed=allowed))
                        if error <= allowed:
                            timings[name] = ms
                    except Exception as error:
                        measurements.append(dict(key=key, backend=name, error=f"{type(error).__name__}: {error}"[:300]))
                if timings:
                    choices[key] = min(timings, key=timings.get)
                    log(f"{key}: {choices[key]} ({', '.join(f'{k} {v:.3f} ms' for k, v in timings.items())})")
    return choices, measurements


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run(time_budget: float, output: Path, log=print) -> dict:
    """The sweep on the current CUDA device within ``time_budget`` seconds; writes ``{"entry", "measurements"}``."""
    if not torch.cuda.is_available():
        raise SystemExit("tune: needs a CUDA GPU (none available); the tuned table ships in the package")
    start = time.monotonic()
    device = torch.device("cuda")
    tiles, tile_measurements = sweep_tiles(start + 0.75 * time_budget, log)
    backends, backend_measurements = sweep_backends(start + time_budget, log)
    entry = dict(gpu=torch.cuda.get_device_properties(device).name, triton=tuning.triton_version(),
                 measured=f"{datetime.date.today().isoformat()} at {_commit()}, torch {torch.__version__}",
                 tiles=tiles, backend=backends)
    tuning.validate({"schema": tuning.SCHEMA, "entries": [entry]}, "the sweep's entry")
    result = dict(entry=entry, measurements=tile_measurements + backend_measurements,
                  seconds=round(time.monotonic() - start, 1))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_file(output, json.dumps(result, indent=1).encode("utf-8"))
    log(f"wrote {output} ({len(tiles)} tiles, {len(backends)} backend choices, {result['seconds']} s)")
    return result


def install(result_path: Path, table_path: Path = tuning.TABLE_PATH) -> dict:
    """Merge the entry of a sweep's output file into the table at ``table_path`` (replacing one for the same GPU
    and Triton version); both are validated first, so a bad file changes nothing."""
    try:
        result = json.loads(Path(result_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{result_path}: not a readable JSON file ({error})") from None
    if not isinstance(result, dict) or "entry" not in result:
        raise ValueError(f"{result_path}: expected the output of `python -m mora_kernels tune` (an 'entry' field)")
    entry = result["entry"]
    tuning.validate({"schema": tuning.SCHEMA, "entries": [entry]}, str(result_path))
    table = tuning.load(table_path)
    entries = [e for e in table["entries"] if (e["gpu"], e["triton"]) != (entry["gpu"], entry["triton"])]
    table = tuning.validate({"schema": tuning.SCHEMA, "entries": entries + [entry]}, str(table_path))
    write_file(table_path, (json.dumps(table, indent=1) + "\n").encode("utf-8"))
    return table
