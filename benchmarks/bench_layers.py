"""MoRALinear against a LoRA layer with the same trainable parameter count, forward and forward+backward.

Times are medians with 20%/80% quantiles over repeated runs (``triton.testing.do_bench`` on a GPU, a
``time.perf_counter`` loop with warm-up on a CPU). Memory is the bytes autograd saves for backward (any device)
and the peak allocation on a GPU.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import mora_kernels
from mora_kernels import MoRALinear, r_hat

# (name, in_features, out_features): Llama-2-7B projections.
SHAPES = [("q_proj", 4096, 4096), ("up_proj", 4096, 11008), ("down_proj", 11008, 4096)]


class LoRALinear(nn.Module):
    """Plain LoRA: ``base(x) + scaling * B(A(x))`` with a frozen base."""

    def __init__(self, base: nn.Linear, r: int, scaling: float = 1.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device) / math.sqrt(r))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        self.scaling = scaling

    def forward(self, x):
        return self.base(x) + (x.to(self.A.dtype) @ self.A.T @ self.B.T * self.scaling).to(x.dtype)


def lora_rank_same_params(n: int, m: int, R: int) -> int:
    """LoRA rank whose ``r (n + m)`` parameters are closest to MoRA's ``R^2``."""
    return max(1, round(R * R / (n + m)))


def measure(fn, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(median, q20, q80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        q50, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return q50, q20, q80
    fn()  # warm-up: allocations, caches
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=10)
    return statistics.median(samples), q[1], q[7]


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of activations autograd saves for backward in one forward (each storage once, parameters excluded)."""
    seen = {p.untyped_storage().data_ptr() for p in layer.parameters()}
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


def run(tokens: int, r: int, mora_type: int, dtype: torch.dtype, device: torch.device, repeats: int, shapes=SHAPES):
    rows = []
    for name, n, m in shapes:
        base = nn.Linear(n, m, bias=False, device=device, dtype=dtype)
        R = r_hat(n, m, r, mora_type)
        lora_r = lora_rank_same_params(n, m, R)
        layers = {
            f"MoRA type {mora_type}": MoRALinear(base, r, mora_type),
            "LoRA": LoRALinear(base, lora_r).to(device),
        }
        nn.init.normal_(layers[f"MoRA type {mora_type}"].M, std=0.02)
        x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(tokens, m, device=device, dtype=dtype)
        for provider, layer in layers.items():
            params = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            with torch.no_grad():
                fwd = measure(lambda: layer(x), device, repeats)

            def step():
                layer(x).backward(g)

            fwdbwd = measure(step, device, repeats)
            peak = None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                step()
                peak = torch.cuda.max_memory_allocated()
            rows.append(
                {
                    "shape": name, "in_features": n, "out_features": m, "tokens": tokens, "r": r, "R": R,
                    "lora_r": lora_r, "provider": provider, "trainable_params": params,
                    "forward_ms": fwd, "fwd_bwd_ms": fwdbwd, "saved_bytes": saved_bytes(layer, x),
                    "peak_bytes": peak,
                }
            )
    return rows


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "mora_kernels": mora_kernels.__version__, "python": platform.python_version(), "git_commit": commit,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def print_table(rows) -> None:
    header = f"{'shape':<10}{'tokens':>7}{'R':>6} {'provider':<14}{'params':>10}{'fwd ms':>10}{'f+b ms':>10}{'f+b vs LoRA':>12}{'saved MiB':>11}"
    print(header)
    print("-" * len(header))
    lora = {(r["shape"], r["tokens"], r["r"]): r["fwd_bwd_ms"][0] for r in rows if r["provider"] == "LoRA"}
    for r in rows:
        ratio = r["fwd_bwd_ms"][0] / lora[(r["shape"], r["tokens"], r["r"])]
        print(
            f"{r['shape']:<10}{r['tokens']:>7}{r['R']:>6} {r['provider']:<14}{r['trainable_params']:>10}"
            f"{r['forward_ms'][0]:>10.2f}{r['fwd_bwd_ms'][0]:>10.2f}{ratio:>11.2f}x{r['saved_bytes'] / 2**20:>11.1f}"
        )


def main(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = args.tokens or (8192 if device.type == "cuda" else 256)
    rows = []
    for mora_type, r in ((6, 8), (1, 256)):
        rows += run(tokens, r, mora_type, dtype, device, args.repeats)
    print(f"device: {device}, dtype: {dtype}, tokens: {tokens}")
    print_table(rows)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(device), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0
