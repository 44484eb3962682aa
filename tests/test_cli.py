"""The command line (``python -m mora_kernels``): every option is checked before work starts and a failure is one
line on stderr with a non-zero status, never a traceback; results go to a new folder per run with a ``latest`` link,
never over earlier ones; a command says at the start what it skips for a missing package; ``--help`` loads no
torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mora_kernels import __main__ as cli

ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``main(argv)``, argparse's exits included."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def test_help_imports_no_torch_and_lists_every_command():
    code = ("import sys, time; start = time.perf_counter(); from mora_kernels.__main__ import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'triton') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    commands = set(cli.parser()._subparsers._group_actions[0].choices)
    assert commands == {"info", "build", "kernels", "bench", "memorize", "tune", "export-lora"}
    title = cli.__doc__.splitlines()[0]
    assert all(name in title for name in commands), title
    assert all(f"\n  {name} " in cli.__doc__ for name in commands)


@pytest.mark.parametrize("argv, option", [
    (["bench", "--ranks", "-1"], "--ranks"),
    (["bench", "--ranks", "0"], "--ranks"),
    (["bench", "--tokens", "-8"], "--tokens"),
    (["bench", "--tokens", "0"], "--tokens"),
    (["bench", "--tokens", "many"], "--tokens"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--rep-ms", "0"], "--rep-ms"),
    (["bench", "--warmup-ms", "-1"], "--warmup-ms"),
    (["bench", "--launch-us", "-1"], "--launch-us"),
    (["bench", "--time-budget", "0"], "--time-budget"),
    (["bench", "--time-budget", "nan"], "--time-budget"),
    (["bench", "--shapes", "L9-qkvo"], "--shapes"),
    (["bench", "--quant", "nf5"], "--quant"),
    (["bench", "--name", "../elsewhere"], "--name"),
    (["bench", "--name", "latest"], "--name"),
    (["bench", "--quick", "--full"], "--full"),
    (["memorize", "--r", "0"], "--r"),
    (["memorize", "--steps", "0"], "--steps"),
    (["memorize", "--pairs", "-5"], "--pairs"),
    (["memorize", "--pretrain-steps", "-1"], "--pretrain-steps"),
    (["memorize", "--seed", "-1"], "--seed"),
    (["memorize", "--methods", "dora"], "--methods"),
    (["memorize", "--device", "gpu"], "--device"),
    (["memorize", "--scale", "tpu"], "--scale"),
    (["tune", "--install", "no-such-file.json"], "--install"),
    (["tune", "--time-budget", "-1"], "--time-budget"),
    (["kernels", "--dtypes", "some"], "--dtypes"),
    (["nonsense"], "COMMAND"),
])
def test_a_bad_option_is_one_line_and_status_2(capsys, argv, option):
    status, out, err = run_cli(capsys, *argv)
    assert status == 2
    last = err.strip().splitlines()[-1]
    assert "error:" in last and option in last, err
    assert "Traceback" not in err


def test_output_dir_naming_a_file_is_refused_before_any_work(capsys, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("keep me")
    for argv in (["bench", "--quick"], ["memorize", "--quick"]):
        status, out, err = run_cli(capsys, *argv, "--output-dir", str(file))
        assert status == 2, err
        assert err.strip() == f"python -m mora_kernels {argv[0]}: error: --output-dir {file}: exists and is not a " \
                              "folder (--debug shows the traceback)"
    assert file.read_text() == "keep me"


def test_debug_shows_the_traceback(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("")
    with pytest.raises(cli.UsageError, match="not a folder"):
        cli.main(["--debug", "bench", "--output-dir", str(file)])
    with pytest.raises(cli.UsageError, match="not a folder"):
        cli.main(["bench", "--debug", "--output-dir", str(file)])


def test_a_cuda_device_that_is_not_there_is_refused(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        argv = ["--device", f"cuda:{torch.cuda.device_count()}"]
    else:
        argv = ["--device", "cuda"]
    for command in ("bench", "memorize"):
        status, _, err = run_cli(capsys, command, *argv, "--output-dir", str(tmp_path))
        assert status == 2 and "--device cuda" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # refused before a run folder was made


def test_tune_install_of_a_malformed_file_is_one_line(capsys, tmp_path):
    import torch

    from mora_kernels import tuning

    before = tuning.TABLE_PATH.read_bytes()
    bad = tmp_path / "tune.json"
    for text in ("{not json", json.dumps({"no entry": 1})):
        bad.write_text(text)
        status, _, err = run_cli(capsys, "tune", "--install", str(bad))
        assert status == 1 and "ValueError" in err and len(err.strip().splitlines()) == 1, err
    assert tuning.TABLE_PATH.read_bytes() == before
    if not torch.cuda.is_available():
        status, _, err = run_cli(capsys, "tune", "--output-dir", str(tmp_path))
        assert status == 2 and "needs a CUDA GPU" in err


def test_run_folders_never_overwrite_and_latest_points_at_the_newest(tmp_path):
    first = cli.new_run_folder(tmp_path, "bench", None)
    (first / "bench.json").write_text("first")
    second = cli.new_run_folder(tmp_path, "bench", None)  # the same second: a suffix, not the same folder
    assert first != second and first.parent == second.parent == tmp_path
    assert (tmp_path / "latest").resolve() == second.resolve()
    named = cli.new_run_folder(tmp_path, "bench", "baseline")
    assert named == tmp_path / "baseline" and (tmp_path / "latest").resolve() == named.resolve()
    with pytest.raises(cli.UsageError, match="--name baseline: .* already exists"):
        cli.new_run_folder(tmp_path, "bench", "baseline")
    assert (first / "bench.json").read_text() == "first"
    assert (tmp_path / "latest").resolve() == named.resolve()


def test_default_results_go_under_the_working_directory():
    args = cli.parser().parse_args(["bench"])
    assert Path(args.output_dir) == Path("mora_kernels_results") and not Path(args.output_dir).is_absolute()


class FakeSuite:
    """Stands in for a benchmark module: records the arguments its main got."""

    METHODS = ("mora1", "mora6", "lora", "full", "qmora6")

    def __init__(self):
        self.args = None

    def main(self, args):
        self.args = args
        return 0


@pytest.fixture
def without(monkeypatch):
    """``without(*names)``: the command line sees those packages as not installed, and runs a FakeSuite."""
    suite = FakeSuite()
    monkeypatch.setattr(cli, "_benchmarks", lambda module: suite)

    def install(*names):
        monkeypatch.setattr(cli, "missing_modules", lambda *wanted: [n for n in wanted if n in names])
        return suite

    return install


def test_memorize_without_bitsandbytes_skips_qmora_at_the_start(capsys, tmp_path, without):
    suite = without("bitsandbytes")
    status, out, _ = run_cli(capsys, "memorize", "--output-dir", str(tmp_path))
    assert status == 0
    assert suite.args.methods == ["mora1", "mora6", "lora", "full"]
    assert out.splitlines()[0] == ("note: skipping method qmora6: bitsandbytes is not installed "
                                   "(pip install 'mora_kernels[quant]')")
    status, _, err = run_cli(capsys, "memorize", "--methods", "qmora6", "--output-dir", str(tmp_path))
    assert status == 2 and "--methods qmora6 needs bitsandbytes" in err


def test_bench_says_what_it_skips_for_missing_packages(capsys, tmp_path, without):
    suite = without("peft", "matplotlib", "tqdm", "bitsandbytes")
    status, out, _ = run_cli(capsys, "bench", "--quick", "--output-dir", str(tmp_path))
    assert status == 0 and suite.args.no_plot and suite.args.no_progress
    assert "skipping the LoRA PEFT rows" in out and "skipping the PNG plots" in out
    status, _, err = run_cli(capsys, "bench", "--quant", "int8", "--output-dir", str(tmp_path))
    assert status == 2 and "--quant needs bitsandbytes" in err


def test_bench_model_only_writes_a_new_folder_per_run(capsys, tmp_path):
    argv = ["bench", "--quick", "--model-only", "--no-plot", "--no-progress", "--output-dir", str(tmp_path)]
    status, out, err = run_cli(capsys, *argv, "--name", "one")
    assert status == 0, err
    status, out, err = run_cli(capsys, *argv)
    assert status == 0, err
    runs = sorted(p.name for p in tmp_path.iterdir() if p.name != "latest")
    assert runs[0].startswith("bench-") and runs[1] == "one"
    for name in runs:
        result = json.loads((tmp_path / name / "bench.json").read_text())
        assert result["settings"]["complete"] and result["model"]
    assert (tmp_path / "latest").resolve() == (tmp_path / runs[0]).resolve()


def test_memorize_keeps_finished_runs_when_a_later_one_fails(tmp_path, monkeypatch):
    from mora_kernels.__main__ import _benchmarks

    memorize = _benchmarks("memorize")
    real_train, calls = memorize.train, []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine went away")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(memorize, "train", train)
    args = cli.parser().parse_args(["memorize", "--quick", "--methods", "mora6", "full", "--no-plot",
                                    "--no-progress"])
    args.run_dir = tmp_path
    with pytest.raises(RuntimeError, match="went away"):
        memorize.main(args)
    saved = json.loads((tmp_path / "memorize.json").read_text())
    assert [run["method"] for run in saved["runs"]] == ["mora6"] and not saved["complete"]
    assert saved["best"]["mora6"]["final"]["exact_match"] >= 0


def test_bench_rows_say_what_ran_and_flag_contradicting_timings():
    bench = cli._benchmarks("bench_layers")
    assert bench.what_ran("MoRA-6 triton") == "fused Triton kernel"
    assert bench.what_ran("MoRA-6 cuda [nf4]") == "fused CUDA kernel"
    assert bench.what_ran("MoRA-1 reference") == "reference backend (PyTorch ops)"
    assert bench.what_ran("LoRA PEFT") == bench.what_ran("MoRA-6 original") == "PyTorch ops"
    calm = {"forward": [10.0, 9.9, 10.2], "backward": [20.0, 19.0, 21.0], "forward+backward": [30.0, 29.0, 31.0]}
    assert bench.timing_warnings(calm) == []
    contradicting = dict(calm, **{"forward+backward": [9.0, 8.9, 9.1]})
    assert bench.timing_warnings(contradicting) == ["forward+backward faster than forward (runs disagree)"]
    noisy = dict(calm, backward=[20.0, 10.0, 40.0])
    assert bench.timing_warnings(noisy) == ["backward: q80/q20 = 4.0 (runs disagree)"]
    key = {"shape": "L3-kv", "in_features": 4096, "out_features": 1024, "r": 8, "tokens": 64, "R": None,
           "trainable_params": 1, "ran": "PyTorch ops"}
    result = {"rows": [{**key, "provider": "LoRA fused addmm", **calm, "warnings": []},
                       {**key, "provider": "LoRA PEFT", **contradicting,
                        "warnings": bench.timing_warnings(contradicting)}],
              "environment": {"device_type": "cpu"}}
    lines = bench.table(result).splitlines()
    assert "| ran |" in lines[0] and "| 1.00x |" in lines[2] and "| flagged |" in lines[3]


def test_bench_experts_rows_table():
    """The mixture-of-experts rows: one line per expert count and path, with the flag, saved bytes and s dW size."""
    from benchmarks import bench_layers as bench  # this checkout's (an installed copy may be another's)

    times = {"forward": [10.0, 9.9, 10.2], "backward": [20.0, 19.0, 21.0], "forward+backward": [30.0, 29.0, 31.0]}
    key = {"layer": "experts 512x192", "experts": 8, "top_k": 8, "tokens": 128, "R": {"gate_up_proj": 84,
           "down_proj": 74}, "delta_bytes": 9 * 2**20}
    rows = [{**key, "path": "fused (mora_mixed)", **times, "saved_bytes": 2**20, "warnings": []},
            {**key, "path": "parametrization (W + s dW)", **times, "saved_bytes": 3 * 2**20,
             "warnings": ["backward: q80/q20 = 2.0 (runs disagree)"]}]
    lines = bench.experts_table({"experts": rows, "environment": {"device_type": "cpu"}}).splitlines()
    assert lines[-2].endswith("| 30.000 [29.000, 31.000] | ok | 1.0 | 9.0 |")
    assert "| flagged: backward: q80/q20 = 2.0 (runs disagree) | 3.0 | 9.0 |" in lines[-1]
    assert "| 8 | 128 x 8 | 84, 74 |" in lines[-1]


def test_the_package_loads_its_public_names_on_first_use():
    code = ("import sys, mora_kernels as mk\n"
            "assert 'torch' not in sys.modules\n"
            "assert sorted(mk._PUBLIC) == sorted(mk.__all__)\n"
            "values = [getattr(mk, name) for name in mk.__all__]\n"
            "assert mk.ops.mora is mk.mora and 'mora' in dir(mk)\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_kernels_table_row_of_a_cuda_kernel():
    usage = {"kernel": "void gemm_kernel<float, 64>(int, float const*)", "arch": "90", "registers": 40,
             "spill_store_bytes": 4, "spill_load_bytes": 8, "shared_bytes": 100,
             "sass": {"HMMA": 24, "HGMMA": 0, "FFMA": 4, "LDGSTS": 8}}
    assert cli.cuda_row(usage) == {"backend": "cuda", "kernel": "gemm_kernel",
                                   "variant": "gemm_kernel<float, 64> HMMA=24", "arch": "sm_90", "num_warps": "-",
                                   "registers": 40, "spill_bytes": 12, "shared_bytes": 100}
    no_mma = {"HMMA": 0, "HGMMA": 0, "FFMA": 9, "LDGSTS": 0}
    assert cli.cuda_row({**usage, "sass": no_mma})["variant"] == "gemm_kernel<float, 64>"


def test_a_reader_that_stops_early_is_not_an_error():
    """`info | grep -q ...` closes the pipe after the first match: the command ends quietly with status 0."""
    process = subprocess.Popen([sys.executable, "-u", "-m", "mora_kernels", "info"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("mora_kernels ")
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0, stderr
    assert "error" not in stderr.lower()


def test_sass_opcode_counts_per_kernel():
    """The counts behind the CUDA rows' HMMA / HGMMA figures and test_cuda_build's tensor-core check, from a
    ``cuobjdump -sass`` listing: per function, predicated instructions included, other opcodes ignored."""
    from mora_kernels import diagnostics

    listing = """
	code for sm_90
		Function : _Z6kernelv
        /*0000*/                   LDGSTS.E.LTC128B [R1], desc[UR4][R2.64], !PT ;  /* 0x0 */
        /*0010*/                   HMMA.1688.F32.TF32 R8, R4, R12, R8 ;  /* 0x0 */
        /*0020*/              @!P1 HMMA.1688.F32.TF32 R8, R4, R12, R8 ;  /* 0x0 */
        /*0030*/                   FFMA R1, R2, R3, R4 ;  /* 0x0 */
        /*0040*/                   FFMA.FTZ R1, R2, R3, R4 ;  /* 0x0 */
        /*0050*/                   FMUL R1, R2, R3 ;  /* 0x0 */
		Function : _Z5otherv
        /*0000*/                   HGMMA.64x64x8.F32.TF32 R24, gdesc[UR4], R24 ;  /* 0x0 */
        /*0010*/                   EXIT ;  /* 0x0 */
"""
    assert diagnostics.sass_opcode_counts(listing) == {
        "_Z6kernelv": {"HMMA": 2, "HGMMA": 0, "FFMA": 2, "LDGSTS": 1},
        "_Z5otherv": {"HMMA": 0, "HGMMA": 1, "FFMA": 0, "LDGSTS": 0},
    }
