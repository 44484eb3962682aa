"""CI's run times replace the table of docs/testing.md (.ci/run_times.py): the only place the documents give times."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("run_times", ROOT / ".ci" / "run_times.py")
run_times = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_times)


def test_the_table_between_the_markers_is_replaced_whole(tmp_path):
    times = tmp_path / "times.txt"
    times.write_text("0.21 1.5 python -m mora_kernels --help\n1234.5 3.25 python -m pytest -q\n")
    doc = tmp_path / "testing.md"
    doc.write_text(f"before\n{run_times.BEGIN}\n| old | table |\n{run_times.END}\nafter\n")
    text = run_times.update(doc, run_times.read_times(times), 2, "abc1234", "2026-12-03")
    assert text.startswith("before\n") and text.endswith(f"{run_times.END}\nafter\n") and "old" not in text
    assert "| `python -m mora_kernels --help` | 0.2 s | 1.5 |" in text
    assert "| `python -m pytest -q` | 20.6 min | 3.2 |" in text or "| `python -m pytest -q` | 20.6 min | 3.3 |" in text
    assert "commit abc1234" in text and "2 cores" in text


def test_the_documents_have_the_markers_and_state_no_other_run_time():
    testing = (ROOT / "docs" / "testing.md").read_text()
    assert run_times.BEGIN in testing and run_times.END in testing
    for path in (ROOT / "README.md", *(ROOT / "docs").glob("*.md")):
        text = path.read_text()
        for phrase in ("about a minute", "a few minutes", "seconds on a CPU", "s on 2 cores", "minutes on 2 idle"):
            assert phrase not in text, f"{path.name}: {phrase!r}"
