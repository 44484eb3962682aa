"""Command line: ``python -m mora_kernels {info,build,kernels,bench,memorize,export-lora}``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from pathlib import Path

import torch

from . import __version__
from .ops import BACKENDS, backend_status

REPO = Path(__file__).resolve().parents[1]
# Results go beside the benchmarks in a checkout, else (an installed package) under the working directory.
RESULTS = REPO / "benchmarks" / "results" / "local" if (REPO / "benchmarks" / "results").is_dir() else (
    Path.cwd() / "mora_kernels_results")


def info(_args) -> int:
    print(f"mora_kernels {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    try:
        import triton

        print(f", triton {triton.__version__}")
    except ImportError:
        print(", triton not installed")
    if torch.cuda.is_available():
        print(f"device: cuda ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads); no CUDA device")
    for name in BACKENDS[1:]:
        usable, reason = backend_status(name)
        print(f"backend {name:<10} {'usable' if usable else 'not usable'}: {reason}")
    from . import cuda_build, tuning

    print(f"cuda extension: {cuda_build.info()['summary']}")
    print(tuning.describe())
    return 0


def build(_args) -> int:
    """Build the CUDA extension ahead of time (needs the CUDA build of torch, nvcc and ninja; no GPU)."""
    from . import cuda_build

    print(f"built {cuda_build.build(verbose=True)}")
    return 0


def kernels(args) -> int:
    """Compile every Triton kernel configuration and the CUDA kernels for sm_80 and sm_90 (no GPU needed) and print
    registers, spills and shared memory; exits 1 if any kernel spills."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("kernels: unset TRITON_INTERPRET; the interpreter replaces the compiler")
    from . import cuda_build, diagnostics

    rows = [dict(row, backend="triton") for row in diagnostics.compile_report(dtypes=args.dtypes)]
    if args.triton_only:
        pass
    elif cuda_build.cuda_home() is None:
        print("cuda: no CUDA toolkit found (CUDA_HOME); CUDA kernels not compiled")
    else:
        rows += [
            dict(backend="cuda", kernel=row["kernel"].removeprefix("void ").split("<")[0].split("(")[0],
                 variant=row["kernel"].removeprefix("void ").split("(")[0], arch=f"sm_{row['arch']}", num_warps="-", registers=row["registers"],
                 spill_bytes=row["spill_store_bytes"] + row["spill_load_bytes"], shared_bytes=row["shared_bytes"])
            for row in diagnostics.cuda_resource_usage()
        ]
    print(f"{'backend':<8}{'kernel':<28}{'arch':<7}{'warps':>6}{'regs':>6}{'spills':>8}{'smem':>8}  variant")
    for row in rows:
        print(f"{row['backend']:<8}{row['kernel'][:27]:<28}{row['arch']:<7}{row['num_warps']:>6}{row['registers']:>6}"
              f"{row['spill_bytes']:>8}{row['shared_bytes']:>8}  {row['variant']}")
    spilled = [row for row in rows if row["spill_bytes"]]
    print(f"{len(rows)} compiled kernel variants, {len(spilled)} with spills")
    return 1 if spilled else 0


def tune(args) -> int:
    """On a GPU, sweep tiles and backends (bounded) and write a table entry; ``--install FILE`` merges one."""
    from . import autotune

    if args.install:
        table = autotune.install(Path(args.install))
        print(f"installed into {autotune.tuning.TABLE_PATH}: {len(table['entries'])} entries")
        return 0
    autotune.run(args.time_budget, Path(args.output))
    return 0


def _benchmarks(module: str):
    """A module of the benchmark suite: installed with the package as ``mora_kernels.benchmarks`` (the repository's
    ``benchmarks/`` folder, mapped in pyproject.toml), or, in a checkout run without installing (PYTHONPATH, as
    benchmarks/gpu_suite.sh does), the ``benchmarks`` package beside this one."""
    try:
        return importlib.import_module(f"mora_kernels.benchmarks.{module}")
    except ModuleNotFoundError as error:
        if not error.name.startswith("mora_kernels.benchmarks") or not (REPO / "benchmarks" / "__init__.py").is_file():
            raise
    sys.path.insert(0, str(REPO))
    return importlib.import_module(f"benchmarks.{module}")


def bench(args) -> int:
    if args.serving:
        return _benchmarks("serving").main(args)
    return _benchmarks("bench_layers").main(args)


def memorize(args) -> int:
    return _benchmarks("memorize").main(args)


def export_lora(args) -> int:
    """A MoRA adapter folder (this package's, PEFT's or the original release's) as a PEFT LoRA folder."""
    if args.rank is not None and args.rank < 1:
        raise SystemExit(f"export-lora: --rank must be a positive int, got {args.rank}")
    if args.max_error is not None and not 0 <= args.max_error < 1:
        raise SystemExit(f"export-lora: --max-error must be in [0, 1), got {args.max_error}")
    import transformers

    from . import export
    from .adapters import load_adapter

    try:
        config = transformers.AutoConfig.from_pretrained(args.base)
        # The class the base was saved as (its module names are the adapter's keys); a causal LM if it names none.
        architecture = (getattr(config, "architectures", None) or ["AutoModelForCausalLM"])[0]
        model = getattr(transformers, architecture).from_pretrained(args.base, dtype="auto")
        load_adapter(model, args.adapter)
        report = export.export_lora(model, args.out, rank=args.rank, max_error=args.max_error)
    except (OSError, TypeError, ValueError) as error:  # a wrong folder or adapter: one line, not a traceback
        raise SystemExit(f"export-lora: {error}") from None
    print(export.format_report(report))
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mora_kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, and which backends can run here").set_defaults(func=info)
    commands.add_parser("build", help="build the CUDA extension now (cached)").set_defaults(func=build)
    p = commands.add_parser(
        "kernels", help="compile the Triton and CUDA kernels for sm_80/sm_90 and report registers and spills")
    p.add_argument("--dtypes", choices=("all", "defaults"), default="all",
                   help="every float dtype combination of x, M and base, or the layer's defaults only")
    p.add_argument("--triton-only", action="store_true", help="skip the CUDA kernels")
    p.set_defaults(func=kernels)
    p = commands.add_parser(
        "bench",
        help="MoRA against LoRA (same trainable parameters), the original release and the base Linear",
        description="Defaults: on a GPU the full grid (6 Llama shapes, r 8/256, 1024/8192 tokens, bfloat16); on a "
        "CPU shapes L2-qkvo and L3-kv, r 8/256, 256 tokens, float32 (about a minute on 2 cores).",
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one small configuration (CI smoke run, seconds)")
    size.add_argument("--full", action="store_true", help="the whole grid, also on a CPU (slow there)")
    p.add_argument("--shapes", nargs="+", help="override the grid's shapes (L2-qkvo L2-up L2-down L3-kv L3-up L3-down)")
    p.add_argument("--ranks", nargs="+", type=int, help="override the grid's LoRA ranks r")
    p.add_argument("--tokens", nargs="+", type=int, help="override the grid's token counts (rows of x)")
    p.add_argument("--repeats", type=int, default=10, help="minimum timed runs per measurement on CPU (default 10)")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up on GPU (default 25)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time on GPU (default 100)")
    p.add_argument("--launch-us", type=float, default=4.0, help="per-launch overhead of the GPU model (default 4)")
    p.add_argument("--model", choices=("auto", "h100", "h200"), default="auto",
                   help="GPU of the bytes model and of %%HBM: the GPU at hand if it is an H200, else the H100")
    p.add_argument("--output-dir", default=str(RESULTS))
    p.add_argument("--model-only", action="store_true",
                   help="only the H100 bytes/launch model (meta tensors, no timing): seconds even for --full on a CPU")
    p.add_argument("--time-budget", type=float, help="seconds after which no new configuration starts (reported)")
    p.add_argument("--quant", nargs="+", metavar="KIND",
                   help="also time each configuration on its base quantized by bitsandbytes, KIND one of nf4, nf4-dq "
                   "(QLoRA's), fp4, fp4-dq, int8: base, PEFT LoRA and MoRA rows with the memory of the base and of "
                   "the whole layer")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--serving", action="store_true",
                   help="many adapters in one batch: tokens/s for K = 1, 8, 64, 512 adapters, decode and prefill, "
                   "MoRA's mixed op against PEFT's LoRA mixed batch and the per-adapter loop (about a minute on a CPU)")
    p.set_defaults(func=bench)
    p = commands.add_parser(
        "tune", help="on a GPU: measure the Triton tiles and the backend auto picks, as a tuned.json entry",
        description="A bounded sweep (--time-budget) of tile configurations and of the Triton and CUDA backends on "
        "the benchmark's 4096 x 4096 layer; writes --output, which --install merges into the package's tuned.json.")
    p.add_argument("--time-budget", type=float, default=90.0, help="seconds for the whole sweep (default 90)")
    p.add_argument("--output", default=str(RESULTS / "tune.json"))
    p.add_argument("--install", metavar="FILE", help="merge the entry of a sweep's output FILE into tuned.json")
    p.set_defaults(func=tune)
    p = commands.add_parser(
        "memorize",
        help="the paper's memorization experiment at small scale: MoRA 1/6, LoRA, full fine-tuning and QMoRA",
        description="A frozen random tiny Llama learns random uuid-style key:value pairs through adapters on all its "
        "linear layers; reports loss curves and exact-match accuracy. Defaults: 64 pairs, 600 steps, r=4, a 2-layer "
        "hidden-64 Llama, 3-5 learning rates per method; about 9 minutes on 2 idle CPU cores.",
    )
    p.add_argument("--quick", action="store_true", help="a few pairs and steps (CI smoke run, seconds)")
    p.add_argument("--pairs", type=int, help="number of key:value pairs")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--r", type=int, help="LoRA rank (MoRA uses R = r_hat(n, m, r))")
    p.add_argument("--pretrain-steps", type=int, help="steps of pre-training on other random pairs (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", help="subset of: mora1 mora6 lora full qmora6")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: 512 pairs, a 4-layer hidden-256 Llama, r=8, 1200 steps per run")
    p.add_argument("--time-budget", type=float, help="seconds after which no new run starts (reported)")
    p.add_argument("--output-dir", default=str(RESULTS))
    p.set_defaults(func=memorize)
    p = commands.add_parser(
        "export-lora", help="write a MoRA adapter as a standard PEFT LoRA folder (exact for types 1-4)",
        description="Types 1-4 export exactly (rank R); types 6/7 need --rank or --max-error (SVD of each layer's "
        "update, relative Frobenius error reported per layer and in OUT/export_report.json).")
    p.add_argument("--base", required=True, help="the base model's transformers folder (module names and shapes)")
    p.add_argument("adapter", help="the MoRA adapter folder")
    p.add_argument("out", help="the folder to write the LoRA adapter to")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--rank", type=int, help="LoRA rank k (SVD; types 1-4 stay exact when k >= R)")
    choice.add_argument("--max-error", type=float, help="largest relative Frobenius error per layer (SVD)")
    p.set_defaults(func=export_lora)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
