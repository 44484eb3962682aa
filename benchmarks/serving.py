"""Serving many adapters from one batch: ``python -m mora_kernels bench --serving``.

One frozen base Linear with K adapters resident (K in 1, 8, 64, 512), and a batch whose sequences each use one
adapter drawn uniformly from the K (seeded): decode (one token per sequence, many sequences) and prefill (fewer
sequences, many tokens each). Inference (``torch.no_grad``), tokens per second of:

- ``base Linear``: no adapter, the ceiling;
- ``LoRA PEFT mixed``: PEFT's LoRA (rank r) with ``adapter_names=`` (its gather / two products / scatter-add per
  adapter present in the batch);
- ``MoRA per-adapter loop``: MoRA the way a mixed batch ran before ``mora_mixed``: per adapter present, gather its
  rows, one ``mora`` with the gathered base rows, scatter back;
- ``MoRA mixed``: ``MoRALinear(x, adapter_names=...)``, i.e. ``mora_mixed``: one fused Triton pass on a GPU; on a
  CPU the reference backend (a loop over the adapters present), so there the row measures overheads, not the kernel.

Memory: the bytes of the K resident adapters (LoRA: ``r (n + m)`` per adapter, MoRA ``R^2``, the same budget; all
float32, as PEFT and MoRALinear keep them), and for ``MoRA mixed`` the stacked copy ``(K, R, R)`` it keeps for
inference (so that a batch reads its adapters from one tensor).

H100 model (``bytes_model.py``, bf16 activations, float32 adapters): each provider's ops on meta tensors; the fused
row counts the Triton backend's mixed op given the matrices of the adapters present in the batch (what its kernel
reads: each row tile loads only its own adapter's M), not all K resident ones, plus the launches inside each fused
op (``inner_launches``: the mixed op's index sort and tile map, the compress kernel of types 1-4).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from mora_kernels import MoRALinear, ops, r_hat

from . import bytes_model
from .bench_layers import SPREAD_LIMIT, cpu_time, environment, gpu_time
from .providers import _OneLinear

ADAPTERS = (1, 8, 64, 512)
# (sequences, tokens per sequence)
PHASES = {"decode": (64, 1), "prefill": (16, 32)}
SHAPE = {"cuda": (4096, 4096), "cpu": (2048, 2048)}
QUICK = {"adapters": (1, 8), "phases": ("decode",), "shape": (512, 512)}
R_LORA = 8
MORA_TYPES = (1, 6)


def adapter_names(K: int, sequences: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [f"a{int(k)}" for k in torch.randint(0, K, (sequences,), generator=generator)]


def lora_model(base: nn.Linear, names: list[str]) -> nn.Module:
    """PEFT's LoRA (rank r, scaling 1, no dropout) with one adapter per name, random weights, eval mode."""
    import peft

    generator = torch.Generator().manual_seed(1)
    config = lambda: peft.LoraConfig(r=R_LORA, lora_alpha=R_LORA, lora_dropout=0.0,  # noqa: E731
                                     target_modules=["lin"], init_lora_weights=False)
    model = peft.get_peft_model(_OneLinear(base), config(), adapter_name=names[0])
    layer = model.base_model.model.lin
    # PEFT's add_adapter re-walks the whole model for each adapter; the layer's own update_layer plus the config
    # entry (what adapter_names is checked against) load the same adapter.
    for name in names[1:]:
        model.peft_config[name] = config()
        layer.update_layer(name, R_LORA, R_LORA, model.peft_config[name])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.eval()


def mora_layer(base: nn.Linear, names: list[str], mora_type: int) -> MoRALinear:
    """MoRALinear with one adapter per name (the LoRA's parameter budget), random M, eval mode."""
    layer = MoRALinear(base, R_LORA, mora_type, adapter_name=names[0])
    for name in names[1:]:
        layer.add_adapter(name, R_LORA, mora_type)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for adapter in layer.adapters.values():
            adapter.weight.copy_(torch.randn(adapter.weight.shape, generator=generator) * 0.02)
    layer.set_adapter(layer.mora_adapter_names())
    return layer.eval()


class _Flops:
    def custom_flops(self, func, args) -> int:
        """A fused forward op's products (``bytes_model`` cannot see inside a custom op): ``2 R^2`` per row of A."""
        geo = self.layer.geo
        vectors = geo.used_blocks if geo.t.blockwise else 1
        return 2 * (args[0].numel() // geo.n) * vectors * geo.R * geo.R if "forward" in str(func) else 0


class PerAdapterLoop(_Flops, nn.Module):
    """A mixed batch as one ``mora`` per adapter present: gather its rows, add its update to their base rows,
    scatter them back (what MoRALinear did before ``mora_mixed``). ``fused``: each ``mora`` through the Triton
    backend's single-adapter op (for the model, on meta tensors), else through the layer's backend."""

    def __init__(self, layer: MoRALinear, fused: bool = False):
        super().__init__()
        self.layer, self.fused = layer, fused

    def forward(self, x, names):
        from mora_kernels import fused

        layer = self.layer
        result = layer.base(x)
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            adapter = layer.adapters[name]
            args = (x[rows], adapter.weight, adapter.geo, adapter.rope, layer.scalings[name], result[rows])
            result[rows] = fused.apply(*args, backend="triton") if self.fused else ops.apply(*args, layer.backend)
        return result


class MixedFused(_Flops, nn.Module):
    """The fused mixed op on the stack of the adapters a batch uses (for the model: what the kernel reads)."""

    def __init__(self, layer: MoRALinear, names: list[str]):
        super().__init__()
        present = list(dict.fromkeys(names))
        self.layer, self.slot = layer, {name: k for k, name in enumerate(present)}
        self.M = torch.stack([layer.adapters[name].weight for name in present])

    def forward(self, x, names):
        from mora_kernels import fused

        index = torch.tensor([self.slot[name] for name in names], device=x.device)
        index = index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
        geo = self.layer.geo
        return fused.apply_mixed(x, self.M, index, geo, self.layer.rope, 1.0, self.layer.base(x),
                                 check_index=False)


def _call(model, x, names):
    if isinstance(model, nn.Linear):
        return model(x)
    if isinstance(model, (PerAdapterLoop, MixedFused)):
        return model(x, names)
    return model(x, adapter_names=names)


def modelled_us(model, x, names, hw) -> tuple[float, int]:
    """(H100 model microseconds, launches) of one inference call on meta tensors."""
    count = bytes_model.Count()
    with torch.no_grad(), bytes_model.OpCounter(count, getattr(model, "custom_flops", None)):
        _call(model, x, names)
    return count.seconds(hw) * 1e6, count.launches


def inner_launches(fn) -> int:
    """Kernels a fused op's launcher starts (its torch ops that launch one, and its Triton kernels, recorded instead
    of run by ``diagnostics.recording``), run on meta tensors: ``bytes_model`` sees a custom op as one launch, while
    the mixed op also sorts the index and builds its tile map (about 12 small ops) and types 1-4 compress first."""
    from mora_kernels import diagnostics

    count = bytes_model.Count()
    with diagnostics.recording() as launches, torch.no_grad(), bytes_model.OpCounter(count):
        fn()
    return count.launches + len(launches)


def adapter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "lora_" in name or
               "adapters." in name)


def modelled(names: list[str], sequences: int, length: int, hw) -> dict:
    """H100 model (us, launches) of each provider for one batch, at the GPU shape on meta tensors. The layers hold
    only the adapters the batch uses: the others are neither read nor launched for by any provider."""
    from mora_kernels import triton_mixed, triton_mora

    n, m = SHAPE["cuda"]
    present = list(dict.fromkeys(names))
    meta = torch.device("meta")
    base = nn.Linear(n, m, bias=False, device=meta, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.empty(sequences, length, n, device=meta, dtype=torch.bfloat16)
    model = {"base Linear": modelled_us(base, x, names, hw)}
    try:
        model["LoRA PEFT mixed"] = modelled_us(lora_model(base, present), x, names, hw)
    except ImportError:
        pass
    launch_us = hw.launch_s * 1e6
    for t in MORA_TYPES:
        layer = mora_layer(base, present, t)
        geo, x2 = layer.geo, x.reshape(-1, n)
        cos, sin = layer.rope if layer.rope is not None else (None, None)
        # Each fused op counted as one launch: add the launches inside it (at launch cost; their bytes are the
        # index's and the tile map's, T + K entries, negligible next to x and the output).
        single = inner_launches(lambda: triton_mora.forward(x2, layer.M, (cos, sin), None, geo, 1.0)) - 1
        us, launches = modelled_us(PerAdapterLoop(layer, fused=True), x, names, hw)
        model[f"MoRA-{t} per-adapter loop"] = (us + single * len(present) * launch_us, launches + single * len(present))
        fused_model = MixedFused(layer, names)
        index = torch.zeros(x2.shape[0], dtype=torch.int64, device=meta)
        scale = torch.ones(len(present), device=meta)
        mixed = inner_launches(lambda: triton_mixed.mixed_forward(x2, fused_model.M, (index, scale), (cos, sin), None,
                                                                  geo)) - 1
        us, launches = modelled_us(fused_model, x, names, hw)
        model[f"MoRA-{t} mixed (fused)"] = (us + mixed * launch_us, launches + mixed)
    return model


def run(args, save=None) -> dict:
    """Every K and phase; ``save(result)`` after each K, with the rows so far."""
    from .bench_layers import progress

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    adapters = QUICK["adapters"] if args.quick else ADAPTERS
    phases = QUICK["phases"] if args.quick else tuple(PHASES)
    n, m = QUICK["shape"] if args.quick else SHAPE.get(device.type, SHAPE["cpu"])
    hw = bytes_model.h100(args.launch_us)
    env = environment(device)
    mixed_backend = ops.resolve_backend("auto", device)
    rows = []
    start = time.perf_counter()
    result = {
        "environment": env,
        "settings": {"measured_shape": [n, m], "model_shape": list(SHAPE["cuda"]), "r": R_LORA,
                     "R": {t: r_hat(n, m, R_LORA, t) for t in MORA_TYPES}, "dtype": str(dtype).removeprefix("torch."),
                     "phases": {p: PHASES[p] for p in phases}, "adapters": list(adapters),
                     "mixed_backend": mixed_backend, "model_hardware": hw.describe(), "model_dtype": "bfloat16",
                     "seconds": 0.0, "model_only": bool(args.model_only), "complete": False},
        "rows": rows,
    }
    per_phase = 2 + 2 * len(MORA_TYPES)  # providers timed per phase: base, PEFT's LoRA, a loop and mixed per type
    bar = progress(len(adapters) * len(phases) * per_phase, "serving", args.no_progress, "provider")
    for K in adapters:
        resident = [f"a{k}" for k in range(K)]
        providers = []
        if not args.model_only:  # K adapters resident, built once for both phases
            base = nn.Linear(n, m, bias=False, device=device, dtype=dtype).requires_grad_(False)
            providers.append(("base Linear", base, 0))
            try:
                lora = lora_model(base, resident).to(device)
                providers.append(("LoRA PEFT mixed", lora, adapter_bytes(lora)))
            except ImportError as error:
                rows.append({"adapters": K, "provider": "LoRA PEFT mixed", "skipped": f"peft missing: {error}"})
            for t in MORA_TYPES:
                layer = mora_layer(base, resident, t).to(device)
                held = adapter_bytes(layer)
                providers.append((f"MoRA-{t} per-adapter loop", PerAdapterLoop(layer), held))
                R = r_hat(n, m, R_LORA, t)  # + the stacked (K, R, R) float32 copy kept for inference
                providers.append((f"MoRA-{t} mixed ({mixed_backend})", layer, held + K * R * R * 4))
        for phase in phases:
            sequences, length = PHASES[phase]
            names = adapter_names(K, sequences, seed=K)
            key = {"phase": phase, "sequences": sequences, "tokens_per_sequence": length, "adapters": K,
                   "adapters_in_batch": len(set(names))}
            model = modelled(names, sequences, length, hw)
            if args.model_only:
                rows += [{**key, "provider": name, "h100_model_us": us, "h100_launches": launches}
                         for name, (us, launches) in model.items()]
                bar.update(per_phase)
                continue
            generator = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(sequences, length, n, device=device, dtype=dtype, generator=generator)
            for name, provider, held in providers:
                fn = lambda: _call(provider, x, names)  # noqa: B023, E731
                with torch.no_grad():
                    if device.type == "cuda":
                        ms = gpu_time(fn, None, args.warmup_ms, args.rep_ms)
                    else:  # a few samples per provider: 4 K x 2 phases x 6 providers on a CPU
                        ms = cpu_time(fn, lambda: None, min(args.repeats, 3), min_seconds=0.01, max_samples=5)
                us, launches = model.get(name.replace(f"({mixed_backend})", "(fused)"), (None, None))
                rows.append({**key, "provider": name, "ms": ms, "tokens_per_s": sequences * length / (ms[0] * 1e-3),
                             "adapter_MB": held / 2**20, "h100_model_us": us, "h100_launches": launches})
                bar.update(1)
            bar.update(per_phase - len(providers))  # PEFT's row when peft is missing
        if save is not None:
            result["settings"]["seconds"] = time.perf_counter() - start
            save(result)
    bar.close()
    result["settings"].update(seconds=time.perf_counter() - start, complete=True)
    return result


def table(result: dict) -> str:
    header = ["phase", "K", "in batch", "provider", "tokens/s (measured)", "ms [q20, q80]", "adapters MB",
              "H100 model us", "H100 launches", "H100 model tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| - | {row['adapters']} | - | {row['provider']} | {row['skipped']} | - | - | - | - | - |")
            continue
        tokens = row["sequences"] * row["tokens_per_sequence"]
        ms = row.get("ms")
        us = row.get("h100_model_us")
        lines.append("| " + " | ".join(str(c) for c in (
            row["phase"], row["adapters"], row["adapters_in_batch"], row["provider"],
            (f"{row['tokens_per_s']:.0f}" + (" (runs disagree)" if ms[2] > SPREAD_LIMIT * ms[1] else ""))
            if "tokens_per_s" in row else "-",
            f"{ms[0]:.2f} [{ms[1]:.2f}, {ms[2]:.2f}]" if ms else "-",
            f"{row['adapter_MB']:.2f}" if "adapter_MB" in row else "-",
            f"{us:.0f}" if us is not None else "-", row.get("h100_launches", "-"),
            f"{tokens / (us * 1e-6):.3g}" if us else "-")) + " |")
    return "\n".join(lines)


def report(result: dict) -> str:
    s, env = result["settings"], result["environment"]
    return (f"Serving: {env['device']}, {s['dtype']}, measured shape {s['measured_shape']}, r={s['r']} "
            f"(MoRA R {s['R']}), mixed op on {s['mixed_backend']}; H100 model at {s['model_shape']}, bf16, "
            f"float32 adapters ({s['model_hardware']}); {s['seconds']:.0f} s, commit {env['git_commit']}, load average "
            f"{env['load_average_1min']:.1f} at the start (CPU times of a shared machine are noisy)"
            + ("" if env["device_type"] == "cuda" else "; no fused kernel runs on a CPU: the measured MoRA rows are "
               "the reference backend (PyTorch ops), the H100 columns a model")
            + ("" if s["complete"] else "; PARTIAL: not finished, the rows are the adapter counts done")
            + "\n\n" + table(result))


def main(args) -> int:
    """Runs into ``args.run_dir`` (a new folder made by the command line), saving after each adapter count."""
    from .bench_layers import write_atomic

    out = Path(args.run_dir)

    def save(partial: dict) -> None:
        write_atomic(out / "serving.json", json.dumps(partial, indent=1))
        write_atomic(out / "serving.md", report(partial) + "\n")

    result = run(args, save)
    save(result)
    print(report(result))
    print(f"wrote {out / 'serving.json'} and {out / 'serving.md'}")
    return 0
