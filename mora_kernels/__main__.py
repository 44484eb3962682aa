"""Command line: ``python -m mora_kernels {info,build,kernels,bench}``."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from . import __version__
from .ops import BACKENDS, backend_status

REPO = Path(__file__).resolve().parents[1]


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
    from . import cuda_mora

    print(f"cuda extension: {cuda_mora.info()['summary']}")
    return 0


def build(_args) -> int:
    """Build the CUDA extension ahead of time (needs the CUDA build of torch, nvcc and ninja; no GPU)."""
    from . import cuda_mora

    print(f"built {cuda_mora.build(verbose=True)}")
    return 0


def kernels(_args) -> int:
    """Compile every Triton kernel configuration and the CUDA kernels for sm_80 and sm_90 (no GPU needed) and print
    registers, spills and shared memory; exits 1 if any kernel spills."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("kernels: unset TRITON_INTERPRET; the interpreter replaces the compiler")
    from . import cuda_mora, triton_mora

    rows = [dict(row, backend="triton") for row in triton_mora.compile_report()]
    if cuda_mora.cuda_home() is None:
        print("cuda: no CUDA toolkit found (CUDA_HOME); CUDA kernels not compiled")
    else:
        rows += [
            dict(backend="cuda", kernel=row["kernel"].removeprefix("void ").split("<")[0].split("(")[0],
                 variant=row["kernel"].removeprefix("void ").split("(")[0], arch=f"sm_{row['arch']}", num_warps="-", registers=row["registers"],
                 spill_bytes=row["spill_store_bytes"] + row["spill_load_bytes"], shared_bytes=row["shared_bytes"])
            for row in cuda_mora.resource_usage()
        ]
    print(f"{'backend':<8}{'kernel':<28}{'arch':<7}{'warps':>6}{'regs':>6}{'spills':>8}{'smem':>8}  variant")
    for row in rows:
        print(f"{row['backend']:<8}{row['kernel'][:27]:<28}{row['arch']:<7}{row['num_warps']:>6}{row['registers']:>6}"
              f"{row['spill_bytes']:>8}{row['shared_bytes']:>8}  {row['variant']}")
    spilled = [row for row in rows if row["spill_bytes"]]
    print(f"{len(rows)} compiled kernel variants, {len(spilled)} with spills")
    return 1 if spilled else 0


def _benchmarks():
    """The benchmark suite lives in the repository's ``benchmarks/`` folder, next to its results."""
    if not (REPO / "benchmarks" / "__init__.py").is_file():
        raise SystemExit("the benchmark suite ships with the source repository (benchmarks/); run from a checkout")
    sys.path.insert(0, str(REPO))
    import benchmarks.bench_layers

    return benchmarks


def bench(args) -> int:
    return _benchmarks().bench_layers.main(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mora_kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, and which backends can run here").set_defaults(func=info)
    commands.add_parser("build", help="build the CUDA extension now (cached)").set_defaults(func=build)
    commands.add_parser(
        "kernels", help="compile the Triton and CUDA kernels for sm_80/sm_90 and report registers and spills"
    ).set_defaults(func=kernels)
    p = commands.add_parser("bench", help="MoRALinear against LoRA at the same trainable parameter count")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--tokens", type=int, help="rows of x (default: 8192 on GPU, 256 on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement on CPU")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "local" / "bench.json"))
    p.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
