"""Time, memory and modelled GPU (H100 or H200) cost of MoRA against LoRA and the base Linear on real model shapes.

Run with ``python -m mora_kernels bench [--quick | --full]``. Each configuration (shape, LoRA rank r, tokens) builds
one frozen base Linear and every provider of ``providers.py`` around it; LoRA has rank r and MoRA the square size
``R = r_hat(n, m, r)``, the same trainable parameter count.

Modes: ``forward`` (a training forward: autograd records the graph), ``backward`` (``y.backward(g)`` of a recorded
forward, gradients of x and of the trainable parameters) and ``forward+backward``. Times are the median and 20%/80%
quantiles: ``triton.testing.do_bench`` on a GPU; on a CPU a ``perf_counter`` loop with one warm-up call, the garbage
collector off, gradients reset outside the timed region, at least ``--repeats`` samples and at least 0.1 s.
Memory: bytes autograd saves for backward beyond the parameters and the input (any device), and on a GPU the peak
allocation of a forward+backward beyond what was allocated before it. On a GPU, GB/s is the provider's modelled
bytes (``bytes_model.py``, same shape and dtype) over its measured time, and % HBM is that over 3.35 TB/s.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

import mora_kernels
from mora_kernels import files, r_hat

from . import bytes_model
from .original import original_merge_delta
from .providers import QUANT_KINDS, build, build_quantized, trainable_params, weight_bytes

# name -> (in_features, out_features, what it is)
SHAPES = {
    "L2-qkvo": (4096, 4096, "Llama-2-7B q/k/v/o_proj"),
    "L2-up": (4096, 11008, "Llama-2-7B gate/up_proj"),
    "L2-down": (11008, 4096, "Llama-2-7B down_proj"),
    "L3-kv": (4096, 1024, "Llama-3-8B k/v_proj"),
    "L3-up": (4096, 14336, "Llama-3-8B gate/up_proj"),
    "L3-down": (14336, 4096, "Llama-3-8B down_proj"),
}
MODES = ("forward", "backward", "forward+backward")
MORA_TYPES = (1, 6)

# Grids. The CPU default is a subset that finishes in about a minute on 2 idle cores; --full is the whole grid.
FULL = {"shapes": list(SHAPES), "ranks": [8, 256], "tokens": [1024, 8192]}
DEFAULT = {
    "cuda": FULL,
    "cpu": {"shapes": ["L2-qkvo", "L3-kv"], "ranks": [8, 256], "tokens": [256]},
}
QUICK = {"shapes": ["L3-kv"], "ranks": [8], "tokens": [64]}


def grid(args, device: torch.device) -> dict:
    chosen = dict(QUICK if args.quick else FULL if args.full else DEFAULT.get(device.type, DEFAULT["cpu"]))
    for key in ("shapes", "ranks", "tokens"):
        if getattr(args, key):
            chosen[key] = getattr(args, key)
    unknown = [s for s in chosen["shapes"] if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    return chosen


# ---- timing -------------------------------------------------------------------------------------------------------


def quantiles(samples_ms) -> list[float]:
    """[median, q20, q80] in milliseconds (linear interpolation, as numpy.percentile)."""
    return [float(np.percentile(samples_ms, q)) for q in (50, 20, 80)]


def cpu_time(fn, reset, repeats: int, min_seconds: float = 0.1, max_samples: int = 100) -> list[float]:
    reset()
    fn()  # warm-up: first-call allocations and caches
    samples = []
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(samples) < repeats or (sum(samples) < min_seconds * 1e3 and len(samples) < max_samples):
            reset()
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    finally:
        if gc_enabled:
            gc.enable()
    return quantiles(samples)


def gpu_time(fn, grads, warmup_ms: int, rep_ms: int) -> list[float]:
    import triton.testing

    return list(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads,
                                        quantiles=[0.5, 0.2, 0.8]))


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward: each storage once, parameters and the input excluded."""
    seen = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen.add(x.untyped_storage().data_ptr())
    total = 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return total


def measure(layer, x, g, device, args) -> dict:
    """Times of every mode, saved bytes, and GPU peak memory of one provider."""
    grads = [x, *(p for p in layer.parameters() if p.requires_grad)]

    def reset():
        for t in grads:
            t.grad = None

    def forward():
        layer(x)

    def forward_backward():
        layer(x).backward(g)

    y = layer(x)

    def backward():
        y.backward(g, retain_graph=True)

    result = {}
    for mode, fn in zip(MODES, (forward, backward, forward_backward)):
        if device.type == "cuda":
            result[mode] = gpu_time(fn, grads, args.warmup_ms, args.rep_ms)
        else:
            result[mode] = cpu_time(fn, reset, args.repeats)
    y = None  # the closure holds the graph: let it go before measuring memory
    result["saved_bytes"] = saved_bytes(layer, x)
    if device.type == "cuda":
        reset()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward()
        torch.cuda.synchronize()
        result["peak_bytes"] = torch.cuda.max_memory_allocated() - before
    reset()
    return result


# ---- the run -------------------------------------------------------------------------------------------------------


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent, timeout=10,
        )  # fmt: skip
        dirty = subprocess.run(  # results files being rewritten by this very run do not make the code dirty
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
             ":(top,exclude)benchmarks/results"],
            capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10,
        ).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "device": name, "device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton_version, "peft": peft_version, "mora_kernels": mora_kernels.__version__,
        "python": platform.python_version(), "git_commit": git_commit(),
        "load_average_1min": os.getloadavg()[0],  # other processes on the machine make CPU timings noisy
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


MERGE_SHAPE = "L2-up"  # the 4096 x 11008 layer
MERGE_CONFIGS = ((1, 8), (6, 8), (1, 256), (6, 256))  # (mora_type, r)


def merge_times(device: torch.device, dtype: torch.dtype, repeats: int, quick: bool) -> list[dict]:
    """Time of ``MoRALinear.merge()`` (closed-form dW added to W) on the 4096 x 11008 layer, and of the original
    release's column loop for type 1 (``original_merge_delta``), each checked to give the same dW."""
    n, m, _ = SHAPES[MERGE_SHAPE]
    rows = []
    for mora_type, r in MERGE_CONFIGS[:1] if quick else MERGE_CONFIGS:
        layer = mora_kernels.MoRALinear(nn.Linear(n, m, bias=False, device=device, dtype=dtype), r, mora_type)
        nn.init.normal_(layer.M, std=0.02)

        def merge():
            layer.merge()
            if device.type == "cuda":
                torch.cuda.synchronize()

        samples = []
        for _ in range(max(3, min(repeats, 5))):
            start = time.perf_counter()
            merge()
            samples.append((time.perf_counter() - start) * 1e3)
            layer.unmerge()
        key = {"shape": f"{MERGE_SHAPE} {n}x{m}", "mora_type": mora_type, "r": r, "R": layer.R, "dtype": str(dtype)}
        rows.append({**key, "provider": "MoRALinear.merge (closed form)", "ms": quantiles(samples)})
        if mora_type == 1 and r == 8:
            with torch.no_grad():
                start = time.perf_counter()
                looped = original_merge_delta(layer.M.detach(), n, m)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = (time.perf_counter() - start) * 1e3
                agree = torch.allclose(looped, layer.delta_weight().detach(), rtol=1e-5, atol=1e-6)
            rows.append({**key, "provider": "original release (column loop)", "ms": [elapsed] * 3, "same_dW": agree})
        layer = None  # the closure holds it: free it before the next shape
    return rows


# The experts rows (issue 21): a Qwen3-MoE-like experts layer (Qwen3-30B-A3B's: hidden 2048, moe_intermediate 768,
# top 8 experts per token; a quarter of each size on a CPU) with MoRA on gate_up_proj and down_proj through PEFT's
# target_parameters, per expert count: fused (mora_kernels.experts, one mora_mixed per parameter) against the
# parametrization (every expert's W + s dW built per forward, ParamWrapper.fuse = False).
EXPERT_COUNTS = (8, 64, 128)
EXPERTS_LAYER = {"cuda": (2048, 768, 2048), "cpu": (512, 192, 128)}  # hidden, intermediate, tokens
EXPERTS_TOP_K, EXPERTS_R, EXPERTS_TYPE = 8, 8, 6


class _ExpertsLayer(nn.Module):
    """An experts module called with one fixed routing, so that ``measure`` times it as a layer of x."""

    def __init__(self, experts, index, weights):
        super().__init__()
        self.experts = experts
        self.index, self.weights = index, weights

    def forward(self, x):
        return self.experts(x, self.index, self.weights)


def experts_rows(device: torch.device, dtype: torch.dtype, args, skipped: dict) -> list[dict]:
    """Time and memory of the experts layer, fused and parametrized, per expert count (8 only with --quick)."""
    try:
        from peft import get_peft_model
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        from mora_kernels.peft_integration import MoRAConfig, ParamWrapper
    except ImportError as error:
        skipped["experts rows"] = f"need peft and transformers: {error}"
        return []
    hidden, intermediate, tokens = EXPERTS_LAYER.get(device.type, EXPERTS_LAYER["cpu"])
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for count in EXPERT_COUNTS[:1] if args.quick else EXPERT_COUNTS:
        config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=count,
                                num_experts_per_tok=EXPERTS_TOP_K, experts_implementation="grouped_mm")
        experts = Qwen3MoeExperts(config).to(device, dtype)
        with torch.no_grad():
            for weight in (experts.gate_up_proj, experts.down_proj):
                weight.normal_(0, 0.02, generator=generator)
        x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=generator).requires_grad_(True)
        logits = torch.randn(tokens, count, device=device, generator=generator)
        weights, index = torch.topk(logits.softmax(-1), EXPERTS_TOP_K, dim=-1)
        model = get_peft_model(_ExpertsLayer(experts, index, weights.to(dtype)), MoRAConfig(
            r=EXPERTS_R, mora_type=EXPERTS_TYPE, target_modules=[], init_lora_weights=False,
            target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
        wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
        g = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=generator)
        key = {"layer": f"Qwen3-MoE-like experts {hidden}x{intermediate}", "experts": count, "top_k": EXPERTS_TOP_K,
               "tokens": tokens, "r": EXPERTS_R, "mora_type": EXPERTS_TYPE,
               "R": {w.parameter_name: w.lora_A["default"].geo.R for w in wrappers},
               "delta_bytes": sum(w.get_param().numel() for w in wrappers) * 4}  # float32 s dW per forward
        for fuse in (True, False):
            for wrapper in wrappers:
                wrapper.fuse = fuse
            row = {**key, "path": "fused (mora_mixed)" if fuse else "parametrization (W + s dW)"}
            try:
                row.update(measure(model, x, g, device, args))
            except Exception as error:  # noqa: BLE001 - one failing path must not lose the whole run
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            row["warnings"] = timing_warnings(row)
            rows.append(row)
        del experts, model, wrappers, x, g
    return rows


def experts_table(result: dict) -> str:
    cuda = result["environment"]["device_type"] == "cuda"
    lines = ["MoRA on mixture-of-experts weights (PEFT target_parameters, gate_up_proj and down_proj, one M per "
             "expert): fused vs the parametrization, median [q20, q80] ms; saved MiB: what autograd keeps for "
             "backward" + ("; peak MiB: the forward+backward's peak allocation" if cuda else "") + "; s dW MiB: "
             "what the parametrization builds per forward (float32, every expert).", "",
             "| layer | experts | tokens x top_k | R (gate_up, down) | path | fwd ms | bwd ms | fwd+bwd ms | timing | "
             "saved MiB | " + ("peak MiB | " if cuda else "") + "s dW MiB |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "") + "---|"]
    for row in result.get("experts", []):
        fb = row.get("forward+backward")
        cells = [row["layer"], row["experts"], f"{row['tokens']} x {row['top_k']}",
                 f"{row['R']['gate_up_proj']}, {row['R']['down_proj']}", row["path"], _ms(row, "forward"),
                 _ms(row, "backward"),
                 f"{fb[0]:.3f} [{fb[1]:.3f}, {fb[2]:.3f}]" if fb else f"FAILED: {row.get('error', '')[:60]}",
                 "flagged: " + "; ".join(row["warnings"]) if row.get("warnings") else "ok",
                 f"{row['saved_bytes'] / 2**20:.1f}" if "saved_bytes" in row else "-"]
        if cuda:
            cells.append(f"{row['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in row else "-")
        cells.append(f"{row['delta_bytes'] / 2**20:.1f}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def run(args, save=None) -> dict:
    """The whole benchmark; ``save(result)`` is called after each configuration with the results so far, so that a
    run cut short (an error, a kill, --time-budget) keeps what it finished."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    chosen = grid(args, device)
    configs = [(s, r, t) for s in chosen["shapes"] for r in chosen["ranks"] for t in chosen["tokens"]]
    hw = bytes_model.h200(args.launch_us) if args.model == "h200" else (
        bytes_model.h100(args.launch_us) if args.model == "h100" else bytes_model.for_device(device, args.launch_us))
    quants = list(getattr(args, "quant", None) or [])
    if set(quants) - set(QUANT_KINDS):
        raise SystemExit(f"--quant: unknown {sorted(set(quants) - set(QUANT_KINDS))}; choose from {list(QUANT_KINDS)}")
    result = {
        "environment": environment(device),  # before timing: the load average and timestamp of the start
        "settings": {
            "dtype": str(dtype).removeprefix("torch."), **chosen, "mora_types": list(MORA_TYPES), "quant": quants,
            "model_only": bool(args.model_only),
            "grid": "quick" if args.quick else "full" if args.full else f"default for {device.type}",
            "timer": "triton.testing.do_bench" if device.type == "cuda" else "perf_counter loop",
            "not_run_time_budget": [], "time_budget": args.time_budget, "repeats": args.repeats,
            "model_hardware": hw.describe(), "model_dtype": "bfloat16", "complete": False,
            "experts_only": bool(getattr(args, "experts_only", False)),
        },
        "skipped": {},
        "rows": [],
        "merge": [],
        "model": [],
        "experts": [],
    }  # fmt: skip
    rows, model, skipped = result["rows"], result["model"], result["skipped"]
    if not args.model_only:  # first: a few rows, within any time budget
        result["experts"] = experts_rows(device, dtype, args, skipped)
        if getattr(args, "experts_only", False):
            result["settings"]["complete"] = True
            return result
    not_run = result["settings"]["not_run_time_budget"]
    per_config = len(MODES) * (3 + len(MORA_TYPES) * 4 + len(quants) * (2 + len(MORA_TYPES) * 3))
    bar = progress(len(configs) * per_config, "bench", args.no_progress)
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    for shape, r, tokens in configs:
        if args.time_budget and time.perf_counter() - start > args.time_budget:
            not_run.append(f"{shape} r={r} tokens={tokens}")  # out of time: say so rather than be killed
            bar.update(per_config)
            continue
        n, m, _ = SHAPES[shape]
        key = {"shape": shape, "in_features": n, "out_features": m, "r": r, "tokens": tokens}
        modelled = {(row["provider"], row["mode"]): row
                    for row in bytes_model.model_rows(n, m, r, tokens, MORA_TYPES, hw)}
        model += [{**key, **row} for row in modelled.values()]
        if args.model_only:
            bar.update(per_config)
            continue
        base = nn.Linear(n, m, bias=False, device=device, dtype=dtype).requires_grad_(False)
        x = torch.randn(tokens, n, device=device, dtype=dtype, generator=generator).requires_grad_(True)
        g = torch.randn(tokens, m, device=device, dtype=dtype, generator=generator)
        providers = build(base, r, MORA_TYPES, device)
        for kind in quants:  # the same base quantized: QLoRA and QMoRA rows beside the float ones
            providers += build_quantized(base, r, MORA_TYPES, device, kind)
        base_bytes = {p.quant: weight_bytes(p.layer) for p in providers if p.family == "base" and p.layer is not None}
        for p in providers:
            extra = {"R": r_hat(n, m, r, p.mora_type) if p.mora_type else None, "provider": p.name}
            if p.layer is None:
                skipped[p.name] = p.skip_reason
                bar.update(len(MODES))
                continue
            row = {**key, **extra, "mora_type": p.mora_type, "trainable_params": trainable_params(p.layer),
                   "base": p.quant or "float", "base_bytes": base_bytes.get(p.quant),
                   "layer_bytes": weight_bytes(p.layer), "ran": what_ran(p.name)}  # fmt: skip
            try:
                row.update(measure(p.layer, x, g, device, args))
            except Exception as error:  # noqa: BLE001 - one failing provider must not lose the whole run
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            row["warnings"] = timing_warnings(row)
            model_name = p.name.replace("triton", "fused").replace("cuda", "fused")
            for mode in MODES:
                model_row = modelled.get((model_name, mode))
                if model_row is not None:
                    row[f"{mode} model_us"] = model_row["model_us"]
                    if device.type == "cuda" and mode in row:
                        gbps = model_row["bytes"] / (row[mode][0] * 1e-3) / 1e9
                        row[f"{mode} GB/s"] = gbps
                        row[f"{mode} %HBM"] = 100 * gbps * 1e9 / hw.bandwidth
            rows.append(row)
            bar.update(len(MODES))
        del base, x, g, providers
        if save is not None:
            save(result)
    bar.close()
    if not args.model_only:
        result["merge"] = merge_times(device, dtype, args.repeats, args.quick)
    result["settings"]["complete"] = True
    return result


def progress(total: int, desc: str, disable: bool, unit: str = "run"):
    """A progress bar on stderr (tqdm), or one that shows nothing when disabled or tqdm is missing."""
    try:
        from tqdm import tqdm
    except ImportError:
        disable = True
    return _Silent() if disable else tqdm(total=total, desc=desc, unit=unit)


class _Silent:
    def update(self, _count: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


# What computed each provider's numbers: the tables say which rows ran a fused kernel and which ran PyTorch ops.
def what_ran(provider: str) -> str:
    if " triton" in provider:
        return "fused Triton kernel"
    if " cuda" in provider:
        return "fused CUDA kernel"
    if " reference" in provider:
        return "reference backend (PyTorch ops)"
    return "PyTorch ops"


# A CPU timing is flagged, not rated, when its spread is wide or its modes contradict each other (another process
# took the cores during some samples): q80 more than 1.5x q20, or forward+backward faster than the forward alone.
SPREAD_LIMIT = 1.5


def timing_warnings(row: dict) -> list[str]:
    warnings = []
    for mode in MODES:
        if mode in row and row[mode][1] > 0 and row[mode][2] / row[mode][1] > SPREAD_LIMIT:
            warnings.append(f"{mode}: q80/q20 = {row[mode][2] / row[mode][1]:.1f} (runs disagree)")
    if "forward" in row and "forward+backward" in row and row["forward+backward"][0] < row["forward"][0]:
        warnings.append("forward+backward faster than forward (runs disagree)")
    return warnings


# ---- output --------------------------------------------------------------------------------------------------------


def _ms(row, mode) -> str:
    return f"{row[mode][0]:.3f}" if mode in row else "-"


def table(result: dict) -> str:
    """Markdown table of the measured rows, with the modelled GPU forward+backward time beside them."""
    cuda = result["environment"]["device_type"] == "cuda"
    header = ["shape (n x m)", "tokens", "r", "provider", "ran", "R", "params", "fwd ms", "bwd ms",
              "fwd+bwd ms [q20, q80]", "vs LoRA fused", "saved MiB", "base MiB", "layer MiB"] + (
              ["peak MiB", "fwd+bwd GB/s", "% HBM"] if cuda else []) + [
              "GPU model us"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lora = {  # the reference of the ratio column, unless its own timing is flagged
        (r["shape"], r["r"], r["tokens"]): r["forward+backward"][0]
        for r in result["rows"] if r["provider"] == "LoRA fused addmm" and "forward+backward" in r
        and not r.get("warnings")
    }  # fmt: skip
    for row in result["rows"]:
        fb = row.get("forward+backward")
        ref = lora.get((row["shape"], row["r"], row["tokens"]))
        rating = "flagged" if row.get("warnings") else f"{fb[0] / ref:.2f}x" if fb and ref else "-"
        cells = [
            f"{row['shape']} ({row['in_features']}x{row['out_features']})", row["tokens"], row["r"], row["provider"],
            row.get("ran", "-"), row["R"] or "-", row["trainable_params"], _ms(row, "forward"), _ms(row, "backward"),
            f"{fb[0]:.3f} [{fb[1]:.3f}, {fb[2]:.3f}]" if fb else f"FAILED: {row.get('error', '')[:60]}", rating,
            f"{row['saved_bytes'] / 2**20:.2f}" if "saved_bytes" in row else "-",
            f"{row['base_bytes'] / 2**20:.2f}" if row.get("base_bytes") else "-",
            f"{row['layer_bytes'] / 2**20:.2f}" if row.get("layer_bytes") else "-",
        ]  # fmt: skip
        if cuda:
            cells += [f"{row['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in row else "-",
                      f"{row['forward+backward GB/s']:.0f}" if "forward+backward GB/s" in row else "-",
                      f"{row['forward+backward %HBM']:.1f}" if "forward+backward %HBM" in row else "-"]  # fmt: skip
        model_us = row.get("forward+backward model_us")
        cells.append(f"{model_us:.0f}" if model_us is not None else "-")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def model_table(result: dict) -> str:
    header = ["shape", "tokens", "r", "provider", "fwd launches", "fwd+bwd launches", "fwd+bwd MB", "fwd+bwd GFLOP",
              "model fwd us", "model fwd+bwd us", "counted as"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key = {}
    for row in result["model"]:
        by_key.setdefault((row["shape"], row["tokens"], row["r"], row["provider"]), {})[row["mode"]] = row
    for (shape, tokens, r, provider), modes in by_key.items():
        fwd, fb = modes["forward"], modes["forward+backward"]
        lines.append(
            f"| {shape} | {tokens} | {r} | {provider} | {fwd['launches']} | {fb['launches']} | {fb['bytes'] / 1e6:.0f} "
            f"| {fb['flops'] / 1e9:.1f} | {fwd['model_us']:.0f} | {fb['model_us']:.0f} | {fb['counted_as'][:48]} |"
        )
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
    return buffer.getvalue()


def measured_csv_rows(result: dict) -> list[dict]:
    """One CSV row per provider and mode, with the run's device and versions on each row."""
    env = result["environment"]
    out = []
    for row in result["rows"]:
        for mode in MODES:
            if mode not in row and "error" not in row:
                continue
            median, q20, q80 = row.get(mode, (None, None, None))
            out.append({
                "device": env["device"], "dtype": result["settings"]["dtype"], "torch": env["torch"],
                "git_commit": env["git_commit"], "timestamp": env["timestamp"],
                **{k: row[k] for k in ("shape", "in_features", "out_features", "tokens", "r", "R", "provider",
                                       "trainable_params")},
                "base": row.get("base"), "base_bytes": row.get("base_bytes"), "layer_bytes": row.get("layer_bytes"),
                "ran": row.get("ran"), "warnings": "; ".join(row.get("warnings", [])),
                "mode": mode, "median_ms": median, "q20_ms": q20, "q80_ms": q80,
                "saved_bytes": row.get("saved_bytes"), "peak_bytes": row.get("peak_bytes"),
                "GB/s": row.get(f"{mode} GB/s"), "%HBM": row.get(f"{mode} %HBM"),
                "model_us": row.get(f"{mode} model_us"), "error": row.get("error"),
            })  # fmt: skip
    return out


def plot(result: dict, path: Path, modelled: bool) -> None:
    """One panel per configuration: forward+backward time of each provider (median, q20-q80 bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = result["model"] if modelled else result["rows"]
    panels = {}
    for row in source:
        if modelled and row["mode"] != "forward+backward":
            continue
        if not modelled and "forward+backward" not in row:
            continue
        panels.setdefault((row["shape"], row["r"], row["tokens"]), []).append(row)
    cols = min(2, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(7 * cols, 0.32 * 11 * rows_n + 1.2), squeeze=False)
    for ax, ((shape, r, tokens), entries) in zip(axes.flat, panels.items()):
        names = [e["provider"] for e in entries]
        if modelled:
            values = [e["model_us"] / 1e3 for e in entries]
            err = None
        else:
            values = [e["forward+backward"][0] for e in entries]
            err = np.array([[v - e["forward+backward"][1], e["forward+backward"][2] - v]
                            for v, e in zip(values, entries)]).T
        colors = ["#888888" if "base" in nm else "#d08030" if "LoRA" in nm else "#3070b0" for nm in names]
        ax.barh(names, values, xerr=err, color=colors)
        ax.invert_yaxis()
        n, m, _ = SHAPES[shape]
        ax.set_title(f"{shape} {n}x{m}, r={r}, {tokens} tokens", fontsize=9)
        ax.set_xlabel("modelled GPU ms (forward+backward)" if modelled else "ms (forward+backward, median, q20-q80)")
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    env, settings = result["environment"], result["settings"]
    what = f"MODEL: {settings['model_hardware']}, {settings['model_dtype']}" if modelled else (
        f"measured on {env['device']}, {settings['dtype']}")
    fig.suptitle(f"mora_kernels {env['mora_kernels']} ({env['git_commit']}): {what}", fontsize=9,
                 y=1 - 0.15 / fig.get_figheight())
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the title
    save_figure(fig, path, dpi=90 if len(panels) <= 8 else 60)  # the full grid's 24 panels stay a small file
    plt.close(fig)


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or keeps what it held (the package's one writer, ``mora_kernels.files``)."""
    files.write_file(path, text.encode("utf-8"))


def save_figure(fig, path: Path, dpi: int) -> None:
    """A matplotlib figure as a PNG, written whole or not at all like every other result file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    files.write_file(path, buffer.getvalue())


def write_results(result: dict, out_dir: Path, plots: bool = True) -> list[Path]:
    """bench.json, bench.md, the model's CSV and the measured CSV (each written whole), and the plots if ``plots``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"bench.json": json.dumps(result, indent=1), "bench_model.csv": csv_text(
        [{k: v for k, v in row.items() if k != "ops"} for row in result["model"]]), "bench.md": summary(result) + "\n"}
    if result["rows"]:
        files["bench.csv"] = csv_text(measured_csv_rows(result))
    for name, text in files.items():
        write_atomic(out_dir / name, text)
    return [out_dir / name for name in files] + (write_plots(result, out_dir) if plots else [])


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    paths = []
    if result["settings"].get("experts_only"):
        return paths  # a table of a few rows, nothing to plot
    for name, modelled in (("bench.png", False), ("bench_model.png", True)):
        if modelled or not result["settings"]["model_only"]:
            plot(result, out_dir / name, modelled)
            paths.append(out_dir / name)
    return paths


def summary(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    where = (
        f"Model only, nothing timed (computed on {env['device']})" if s["model_only"]
        else f"Measured on {env['device']} ({env['device_type'].upper()} numbers), {s['dtype']}"
    )  # fmt: skip
    load = env.get("load_average_1min")
    head = [
        f"{where}, load average {'not recorded' if load is None else round(load, 2)} at the start, "
        f"torch {env['torch']}, triton {env['triton']}, peft {env['peft']}, commit {env['git_commit']}, "
        f"{env['timestamp']}.",
        f"Grid ({s['grid']}): shapes {s['shapes']}, r {s['ranks']}, tokens {s['tokens']}, "
        f"MoRA types {s['mora_types']}; "
        f"timer: {s['timer']}. LoRA rank r and MoRA R = r_hat(n, m, r): the same trainable parameters.",
        *([f"Quantized bases (bitsandbytes, rows marked [kind]): {s['quant']}; base MiB / layer MiB: bytes holding "
           "the base's weights (with the quantization state) / the whole layer's (base and adapter)."]
          if s.get("quant") else []),
    ]
    if env["device_type"] != "cuda" and not s["model_only"]:
        head.append("No fused kernel runs on a CPU: every MoRA row here is the reference backend or the original "
                    "release (PyTorch ops); the column 'ran' says what computed each row, and the GPU columns are a "
                    "model.")
    by_reason = {}
    for name, reason in result["skipped"].items():
        by_reason.setdefault(reason, []).append(name)
    head += [f"Skipped {', '.join(names)}: {reason}" for reason, names in by_reason.items()]
    flagged = [f"{row['provider']} ({row['shape']}, r={row['r']}): {'; '.join(row['warnings'])}"
               for row in result["rows"] if row.get("warnings")]
    if flagged:
        head.append(f"Flagged timings (not rated against LoRA; rerun on an idle machine): {' | '.join(flagged)}")
    if not s.get("complete", True):
        head.append("PARTIAL: the run has not finished (or was stopped); the rows below are the configurations done.")
    if s.get("model_recomputed"):
        head.append(f"Note: {s['model_recomputed']}.")
    if s["not_run_time_budget"]:
        head.append(f"Not run (--time-budget {s['time_budget']} s exceeded): {', '.join(s['not_run_time_budget'])}")
    model_note = (
        f"GPU model (not a measurement): {s['model_hardware']}; every op at its roofline plus a launch overhead, "
        "from ops counted on meta tensors in bfloat16 (benchmarks/bytes_model.py)."
    )
    experts = experts_table(result) + "\n\n" if result.get("experts") else ""
    if s.get("experts_only"):
        cpu = ("" if env["device_type"] == "cuda" else " No fused kernel runs on a CPU: the fused rows' mora_mixed is "
               "the reference backend (PyTorch ops, a loop over the experts), so their times say nothing of a GPU; "
               "a timing whose runs disagree (another process took the cores) is flagged.")
        return head[0] + cpu + "\n\n" + experts
    measured = "" if s["model_only"] else table(result) + "\n\n" + merge_table(result) + "\n\n" + experts
    return "\n".join(head) + "\n\n" + measured + model_note + "\n\n" + model_table(result)


def merge_table(result: dict) -> str:
    lines = ["Merge (W += dW) of one layer, median [q20, q80] ms:", "",
             "| layer | type | r | R | how | ms |", "|---|---|---|---|---|---|"]
    for row in result.get("merge", []):
        q50, q20, q80 = row["ms"]
        spread = f"{q50:.1f} [{q20:.1f}, {q80:.1f}]" if q20 != q80 else f"{q50:.1f} (one run)"
        lines.append(f"| {row['shape']} | {row['mora_type']} | {row['r']} | {row['R']} | {row['provider']} "
                     f"| {spread} |")
    return "\n".join(lines)


def main(args) -> int:
    """Runs the benchmark into ``args.run_dir`` (a new folder made by the command line), saving after each
    configuration (JSON, CSV and markdown; the plots at the end)."""
    out, start = Path(args.run_dir), time.perf_counter()

    def save(partial: dict) -> list[Path]:
        partial["settings"]["seconds"] = round(time.perf_counter() - start, 1)
        return write_results(partial, out, plots=False)

    result = run(args, save)
    paths = save(result)
    if not args.no_plot:
        paths += write_plots(result, out)
    print(summary(result))
    print(f"\n{result['settings']['seconds']} s; wrote " + ", ".join(str(p) for p in paths))
    failed = [r["provider"] for r in result["rows"] if "error" in r]
    if failed:
        print(f"FAILED providers: {sorted(set(failed))}")
        return 1
    return 0
