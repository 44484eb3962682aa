"""Command line of mora_kernels: ``python -m mora_kernels {info,build,kernels,bench,memorize,tune,export-lora}``.

  info      versions, device, which backends can run here and why not, the CUDA extension's build, the tuning entry
  build     build the CUDA extension now (needs the CUDA build of torch, nvcc and ninja; no GPU)
  kernels   compile every Triton and CUDA kernel for sm_80/sm_90 and report registers and spills (no GPU)
  bench     MoRA against LoRA (same trainable parameters), the original release and the base Linear
  memorize  the paper's memorization experiment at small scale: MoRA 1/6, LoRA, full fine-tuning and QMoRA
  tune      on a GPU: measure the Triton tiles and the backend `auto` picks, as a tuned.json entry
  export-lora  a MoRA adapter as a standard PEFT LoRA folder (exact for types 1-4; SVD with a stated error for 6/7)

Results (bench, memorize, tune) go to a new folder per run, ``<output-dir>/<name>``, by default
``./mora_kernels_results/<command>-<date>-<time>`` under the working directory; ``<output-dir>/latest`` points at the
newest run. Nothing is overwritten. Every option is checked before any work starts; a failure ends with one line on
stderr and a non-zero status (``--debug`` shows the traceback).
"""

# No torch import at module level: `--help` and option errors answer without loading torch.
from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from datetime import datetime
from pathlib import Path

PROG = "python -m mora_kernels"
RESULTS_ROOT = Path("mora_kernels_results")  # relative: under the working directory, for every kind of install
LATEST = "latest"


class UsageError(Exception):
    """A problem with the command line or the environment found before the work starts: one line, exit status 2."""


# ---- option types (argparse turns their ValueError / ArgumentTypeError into one usage line) ------------------------


def _number(kind, minimum, what):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= minimum or value != value:  # NaN fails both
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = _number(int, 1, "an integer >= 1")
natural_int = _number(int, 0, "an integer >= 0")
positive_float = _number(float, 1e-300, "a number > 0")
natural_float = _number(float, 0.0, "a number >= 0")


def device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def run_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text) or text == LATEST:
        raise argparse.ArgumentTypeError(
            f"expected a plain folder name (letters, digits, '.', '_', '-'; not {LATEST!r}), got {text!r}")
    return text


def unit_interval(text: str) -> float:
    value = natural_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def existing_folder(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return path


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


# ---- checks made before the work starts ----------------------------------------------------------------------------


def check_device(name: str | None) -> None:
    """A CUDA device named on the command line must exist here."""
    if name is None or name == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here (torch {torch.__version__})")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def writable_folder(path: Path, option: str) -> Path:
    """``path`` as an existing, writable folder (created with its parents when missing)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{option} {path}: cannot create the folder ({error.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the folder is not writable")
    return path


def new_run_folder(root: Path, command: str, name: str | None) -> Path:
    """A new, empty folder for one run's results under ``root`` (``--output-dir``), and ``root/latest`` pointed at it.

    ``name`` (``--name``) must not exist yet; without it the folder is ``<command>-<local date>-<time>`` (``-2``,
    ``-3``... when two runs start in the same second). Results of earlier runs are never touched."""
    root = writable_folder(root, "--output-dir")
    if name is not None:
        folder = root / name
        if folder.exists() or folder.is_symlink():
            raise UsageError(f"--name {name}: {folder} already exists; results are never overwritten, choose another")
        folder.mkdir()
    else:
        stem = f"{command}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        for suffix in ("", *(f"-{i}" for i in range(2, 1000))):
            folder = root / f"{stem}{suffix}"
            try:
                folder.mkdir()
                break
            except FileExistsError:
                continue
    point_latest(root, folder)
    return folder


def point_latest(root: Path, folder: Path) -> None:
    """``root/latest`` -> ``folder`` (a relative symbolic link, replaced atomically; a real folder there is kept)."""
    link = root / LATEST
    if link.exists() and not link.is_symlink():
        print(f"note: {link} is not a link; left as it is", file=sys.stderr)
        return
    temporary = root / f".{LATEST}.{os.getpid()}"
    try:
        temporary.symlink_to(folder.name, target_is_directory=True)
        os.replace(temporary, link)
    except OSError as error:  # e.g. a file system without links: the run folder is printed anyway
        temporary.unlink(missing_ok=True)
        print(f"note: could not point {link} at {folder.name} ({error.strerror})", file=sys.stderr)


def missing_modules(*names: str) -> list[str]:
    """Which of the top-level modules ``names`` cannot be imported here (found without importing them)."""
    from importlib.util import find_spec

    return [name for name in names if find_spec(name) is None]


# ---- commands ------------------------------------------------------------------------------------------------------


def info(_args) -> int:
    import platform

    import torch

    from . import __version__, cuda_build, tuning
    from .ops import BACKENDS, backend_status

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
    print(f"cuda extension: {cuda_build.info()['summary']}")
    print(tuning.describe())
    package = Path(__file__).resolve().parent  # docs/ ships inside a wheel, beside the package in a checkout
    docs = next((d for d in (package / "docs", package.parent / "docs") if d.is_dir()), None)
    print(f"documentation: {docs or 'not installed'}")
    return 0


def build(_args) -> int:
    """Build the CUDA extension ahead of time (needs the CUDA build of torch, nvcc and ninja; no GPU)."""
    from . import cuda_build

    print(f"built {cuda_build.build(verbose=True)}")
    return 0


def kernels(args) -> int:
    """Compile every Triton kernel configuration and the CUDA kernels for sm_80 and sm_90 (no GPU needed) and print
    registers, spills and shared memory (``--report``: the static report instead); exits 1 if any kernel spills."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise UsageError("kernels: unset TRITON_INTERPRET; the interpreter replaces the compiler")
    if missing_modules("triton"):
        raise UsageError("kernels: needs triton (pip install 'mora_kernels[triton]')")
    from . import cuda_build, diagnostics

    if args.report:
        return _static_report(args)
    print(f"compiling every Triton launch variant ({args.dtypes} dtypes) for sm_90 and sm_80, then the CUDA kernels; "
          "the table follows", flush=True)
    rows = [dict(row, backend="triton") for row in diagnostics.compile_report(dtypes=args.dtypes)]
    if not args.triton_only:
        if cuda_build.cuda_home() is None:
            print("cuda: no CUDA toolkit found (CUDA_HOME); CUDA kernels not compiled")
        else:
            rows += [cuda_row(row) for row in diagnostics.cuda_resource_usage()]
    print(f"{'backend':<8}{'kernel':<28}{'arch':<7}{'warps':>6}{'regs':>6}{'spills':>8}{'smem':>8}  variant")
    for row in rows:
        print(f"{row['backend']:<8}{row['kernel'][:27]:<28}{row['arch']:<7}{row['num_warps']:>6}{row['registers']:>6}"
              f"{row['spill_bytes']:>8}{row['shared_bytes']:>8}  {row['variant']}")
    spilled = [row for row in rows if row["spill_bytes"]]
    print(f"{len(rows)} compiled kernel variants, {len(spilled)} with spills")
    return 1 if spilled else 0


def cuda_row(usage: dict) -> dict:
    """A row of ``kernels``' table from one kernel of ``diagnostics.cuda_resource_usage``."""
    signature = usage["kernel"].removeprefix("void ").split("(")[0]
    tensor_cores = " ".join(f"{opcode}={count}" for opcode in ("HMMA", "HGMMA") if (count := usage["sass"][opcode]))
    return dict(backend="cuda", kernel=signature.split("<")[0], variant=f"{signature} {tensor_cores}".strip(),
                arch=f"sm_{usage['arch']}",
                num_warps="-", registers=usage["registers"],
                spill_bytes=usage["spill_store_bytes"] + usage["spill_load_bytes"], shared_bytes=usage["shared_bytes"])


def _static_report(args) -> int:
    """``kernels --report``: the benchmark's launches compiled and read from their SASS (mora_kernels.sass_report)."""
    from . import sass_report

    folder = new_run_folder(Path(args.output_dir), "kernels-report", args.name)
    print(f"results: {folder}", flush=True)
    report = sass_report.build(progress=lambda line: print(line, flush=True), bytes_model=_benchmarks("bytes_model"))
    sass_report.write(report, folder)
    print(f"wrote {folder / 'report.json'} and {folder / 'report.md'}")
    # The launches compiled as a real launch specializes them (sizes multiples of 16 and unit strides known), code
    # the generic check above does not hold: a spill there is a defect too.
    spilled = [k for k in report["kernels"] if k["spill_bytes"]]
    for k in spilled:
        print(f"spill: {k['kernel']} {k['arch']} id {k['id']}: {k['spill_bytes']} bytes at {k['registers']} registers")
    return 1 if spilled else 0


def tune(args) -> int:
    """On a GPU, sweep tiles and backends (bounded) and write a table entry; ``--install FILE`` merges one."""
    from . import autotune

    if args.install:
        table = autotune.install(args.install)
        print(f"installed into {autotune.tuning.TABLE_PATH}: {len(table['entries'])} entries")
        return 0
    import torch

    if not torch.cuda.is_available():
        raise UsageError("tune: needs a CUDA GPU (none available); the tuned table ships in the package")
    if args.output is not None:
        output = Path(args.output)
        if output.exists():
            raise UsageError(f"--output {output}: exists; results are never overwritten, choose another file")
        writable_folder(output.parent, "--output")
    else:
        output = new_run_folder(Path(args.output_dir), "tune", args.name) / "tune.json"
    autotune.run(args.time_budget, output)
    return 0


def _benchmarks(module: str):
    """A module of the benchmark suite, installed as ``mora_kernels.benchmarks`` (pyproject.toml maps the
    repository's ``benchmarks/`` folder there). In a checkout used without installing (the repository root on the
    path, as benchmarks/gpu_suite.sh runs it) the same folder is the top-level ``benchmarks`` package."""
    from importlib import import_module
    from importlib.util import find_spec

    if find_spec("mora_kernels.benchmarks") is not None:
        return import_module(f"mora_kernels.benchmarks.{module}")
    checkout = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = find_spec("benchmarks")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != checkout:
        raise UsageError("the benchmark suite is not installed (mora_kernels.benchmarks): reinstall the package, or "
                         "run from the repository's root")
    return import_module(f"benchmarks.{module}")


def bench(args) -> int:
    check_device(args.device)
    needs = {"peft": "the LoRA PEFT rows", "matplotlib": "the PNG plots", "tqdm": "the progress bar"}
    if args.quant:
        needs["bitsandbytes"] = "the --quant rows"
    absent = missing_modules(*needs)
    if args.quant and "bitsandbytes" in absent:
        raise UsageError("--quant needs bitsandbytes: pip install 'mora_kernels[quant]'")
    for name in absent:
        print(f"note: {name} is not installed (pip install 'mora_kernels[bench]'): skipping {needs[name]}")
    args.no_plot = args.no_plot or "matplotlib" in absent
    args.no_progress = args.no_progress or "tqdm" in absent
    command = "serving" if args.serving else "bench"
    args.run_dir = new_run_folder(Path(args.output_dir), command, args.name)
    print(f"results: {args.run_dir}")
    return _benchmarks("serving" if args.serving else "bench_layers").main(args)


def memorize(args) -> int:
    check_device(args.device)
    if missing_modules("transformers"):
        raise UsageError("memorize needs transformers: pip install 'mora_kernels[bench]'")
    writable_folder(Path(args.output_dir), "--output-dir")  # before the imports: a wrong folder fails at once
    module = _benchmarks("memorize")
    needs = {"lora": "peft", "qmora6": "bitsandbytes"}
    absent = set(missing_modules(*needs.values()))
    extra = {"peft": "bench", "bitsandbytes": "quant"}
    if args.methods:
        for method in args.methods:
            if needs.get(method) in absent:
                raise UsageError(f"--methods {method} needs {needs[method]}: pip install "
                                 f"'mora_kernels[{extra[needs[method]]}]'")
    else:
        args.methods = [m for m in module.METHODS if needs.get(m) not in absent]
        for method in sorted(set(module.METHODS) - set(args.methods)):
            print(f"note: skipping method {method}: {needs[method]} is not installed "
                  f"(pip install 'mora_kernels[{extra[needs[method]]}]')")
    for name, what, option in (("matplotlib", "the PNG plot", "no_plot"), ("tqdm", "the progress bar", "no_progress")):
        if missing_modules(name):
            print(f"note: {name} is not installed (pip install 'mora_kernels[bench]'): skipping {what}")
            setattr(args, option, True)
    args.run_dir = new_run_folder(Path(args.output_dir), "memorize", args.name)
    print(f"results: {args.run_dir}")
    return module.main(args)


def export_lora(args) -> int:
    """A MoRA adapter folder (this package's, PEFT's or the original release's) as a PEFT LoRA folder."""
    if missing_modules("transformers", "peft"):
        raise UsageError("export-lora needs transformers and peft: pip install 'mora_kernels[peft]'")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{args.out}: exists and is not an empty folder; an adapter is never written over")
    import transformers

    from . import export
    from .adapters import load_adapter

    config = transformers.AutoConfig.from_pretrained(args.base)
    # The class the base was saved as (its module names are the adapter's keys); a causal LM if it names none.
    architecture = (getattr(config, "architectures", None) or ["AutoModelForCausalLM"])[0]
    model = getattr(transformers, architecture).from_pretrained(args.base, dtype="auto")
    load_adapter(model, args.adapter)
    report = export.export_lora(model, args.out, rank=args.rank, max_error=args.max_error)
    print(export.format_report(report))
    print(f"wrote {args.out}")
    return 0


# ---- the parser ----------------------------------------------------------------------------------------------------


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-dir", metavar="DIR", default=str(RESULTS_ROOT),
        help="folder holding one subfolder per run and a 'latest' link to the newest (default: %(default)s, under "
        "the working directory); created when missing")
    parser.add_argument("--name", type=run_name,
                        help="this run's subfolder (default: COMMAND-DATE-TIME); must not exist yet")


def parser() -> argparse.ArgumentParser:
    title, _commands, results = __doc__.split("\n\n")  # the command list is argparse's own, below
    main_parser = argparse.ArgumentParser(prog=PROG, description=f"{title}\n\n{results}",
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    main_parser.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    # --debug is accepted after the command too (its default stays the main parser's).
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = main_parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser = functools.partial(commands.add_parser, parents=[debug])
    commands.add_parser("info", help="versions, device, and which backends can run here").set_defaults(func=info)
    commands.add_parser("build", help="build the CUDA extension now (cached)").set_defaults(func=build)
    p = commands.add_parser(
        "kernels", help="compile the Triton and CUDA kernels for sm_80/sm_90 and report registers and spills")
    p.add_argument("--dtypes", choices=("all", "defaults"), default="all",
                   help="every float dtype combination of x, M and base, or the layer's defaults only")
    p.add_argument("--triton-only", action="store_true", help="skip the CUDA kernels")
    p.add_argument("--report", action="store_true",
                   help="instead: compile the benchmark shapes' launches as a launch specializes them and write "
                   "report.json / report.md (machine code, occupancy, modelled time; docs/static_report.md)")
    _output_options(p)  # for --report
    p.set_defaults(func=kernels)
    p = commands.add_parser(
        "bench",
        help="MoRA against LoRA (same trainable parameters), the original release and the base Linear",
        description="Defaults: on a GPU the full grid (6 Llama shapes, r 8/256, 1024/8192 tokens, bfloat16); on a "
        "CPU shapes L2-qkvo and L3-kv, r 8/256, 256 tokens, float32. CPU times are of the reference backend (no "
        "fused kernel runs on a CPU). Run times on the CI machine kind are in docs/testing.md.",
    )
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when present)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one small configuration (the CI smoke run)")
    size.add_argument("--full", action="store_true", help="the whole grid, also on a CPU (slow there)")
    from_grid = "override the grid's"
    p.add_argument("--shapes", nargs="+", choices=("L2-qkvo", "L2-up", "L2-down", "L3-kv", "L3-up", "L3-down"),
                   metavar="SHAPE", help=f"{from_grid} shapes: L2-qkvo L2-up L2-down L3-kv L3-up L3-down")
    p.add_argument("--ranks", nargs="+", type=positive_int, metavar="R", help=f"{from_grid} LoRA ranks r")
    p.add_argument("--tokens", nargs="+", type=positive_int, metavar="T", help=f"{from_grid} token counts (rows of x)")
    p.add_argument("--repeats", type=positive_int, default=10,
                   help="minimum timed runs per measurement on CPU (default 10)")
    p.add_argument("--warmup-ms", type=natural_int, default=25, help="do_bench warm-up on GPU (default 25)")
    p.add_argument("--rep-ms", type=positive_int, default=100, help="do_bench measuring time on GPU (default 100)")
    p.add_argument("--launch-us", type=natural_float, default=4.0,
                   help="per-launch overhead of the GPU model (default 4)")
    p.add_argument("--model", choices=("auto", "h100", "h200"), default="auto",
                   help="GPU of the bytes model and of %%HBM: the GPU at hand if it is an H200, else the H100")
    _output_options(p)
    p.add_argument("--model-only", action="store_true",
                   help="only the GPU bytes/launch model (of --model's GPU: H100 or H200), on meta tensors, nothing "
                   "timed: seconds even for --full on a CPU")
    p.add_argument("--time-budget", type=positive_float, metavar="SECONDS",
                   help="seconds after which no new configuration starts (reported)")
    p.add_argument("--quant", nargs="+", metavar="KIND", choices=("nf4", "nf4-dq", "fp4", "fp4-dq", "int8"),
                   help="also time each configuration on its base quantized by bitsandbytes (needs [quant]), KIND "
                   "one of nf4, nf4-dq (QLoRA's), fp4, fp4-dq, int8: base, PEFT LoRA and MoRA rows with the memory "
                   "of the base and of the whole layer")
    p.add_argument("--experts-only", action="store_true",
                   help="only the mixture-of-experts rows (run first by every bench): a Qwen3-MoE-like experts layer "
                   "with 8, 64 and 128 experts (8 with --quick), MoRA fused against the parametrization")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--serving", action="store_true",
                   help="many adapters in one batch: tokens/s for K = 1, 8, 64, 512 adapters, decode and prefill, "
                   "MoRA's mixed op against PEFT's LoRA mixed batch and the per-adapter loop")
    p.set_defaults(func=bench)
    p = commands.add_parser(
        "memorize",
        help="the paper's memorization experiment at small scale: MoRA 1/6, LoRA, full fine-tuning and QMoRA",
        description="A frozen random tiny Llama learns random uuid-style key:value pairs through adapters on all its "
        "linear layers; reports loss curves and exact-match accuracy. Defaults: 64 pairs, 600 steps, r=4, a 2-layer "
        "hidden-64 Llama, 3-5 learning rates per method. Each finished run is written at once. Run times on the CI "
        "machine kind are in docs/testing.md.",
    )
    p.add_argument("--quick", action="store_true", help="a few pairs and steps (the CI smoke run)")
    p.add_argument("--pairs", type=positive_int, help="number of key:value pairs")
    p.add_argument("--steps", type=positive_int, help="training steps per run")
    p.add_argument("--r", type=positive_int, help="LoRA rank (MoRA uses R = r_hat(n, m, r))")
    p.add_argument("--pretrain-steps", type=natural_int, help="steps of pre-training on other random pairs (default 0)")
    p.add_argument("--seed", type=natural_int, default=0)
    p.add_argument("--methods", nargs="+", choices=("mora1", "mora6", "lora", "full", "qmora6"), metavar="METHOD",
                   help="subset of: mora1 mora6 lora full qmora6 (default: all whose packages are installed; "
                   "lora needs peft, qmora6 bitsandbytes)")
    p.add_argument("--device", type=device_name, help="cpu (default), cuda or cuda:N")
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: 512 pairs, a 4-layer hidden-256 Llama, r=8, 1200 steps per run")
    p.add_argument("--time-budget", type=positive_float, metavar="SECONDS",
                   help="seconds after which no new run starts (reported)")
    _output_options(p)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=memorize)
    p = commands.add_parser(
        "tune", help="on a GPU: measure the Triton tiles and the backend auto picks, as a tuned.json entry",
        description="A bounded sweep (--time-budget) of tile configurations and of the Triton and CUDA backends on "
        "the benchmark's 4096 x 4096 layer; writes tune.json in a new run folder (or --output), which --install "
        "merges into the package's tuned.json.")
    p.add_argument("--time-budget", type=positive_float, default=90.0, metavar="SECONDS",
                   help="seconds for the whole sweep (default 90)")
    p.add_argument("--output", metavar="FILE", help="write the sweep's result to FILE (must not exist) instead")
    _output_options(p)
    p.add_argument("--install", metavar="FILE", type=existing_file,
                   help="merge the entry of a sweep's output FILE into tuned.json")
    p.set_defaults(func=tune)
    p = commands.add_parser(
        "export-lora", help="write a MoRA adapter as a standard PEFT LoRA folder (exact for types 1-4)",
        description="Types 1-4 export exactly (rank R); types 6/7 need --rank or --max-error (SVD of each layer's "
        "update, relative Frobenius error reported per layer and in OUT/export_report.json).")
    p.add_argument("--base", required=True, type=existing_folder,
                   help="the base model's transformers folder (module names and shapes)")
    p.add_argument("adapter", type=existing_folder, help="the MoRA adapter folder")
    p.add_argument("out", help="the folder to write the LoRA adapter to (new, or empty)")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--rank", type=positive_int, help="LoRA rank k (SVD; types 1-4 stay exact when k >= R)")
    choice.add_argument("--max-error", type=unit_interval,
                        help="largest relative Frobenius error per layer, in [0, 1) (SVD)")
    p.set_defaults(func=export_lora)
    return main_parser


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (`| head`, `| grep -q`): not a failure of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and no second error at exit's flush
        return 0
    except Exception as error:  # noqa: BLE001 - the command line ends with one line, never a traceback
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        what = "" if isinstance(error, UsageError) else f"{type(error).__name__}: "
        print(f"{PROG} {args.command}: error: {what}{message} (--debug shows the traceback)", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
