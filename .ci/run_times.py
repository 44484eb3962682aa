"""Write the run times CI measured into the table of docs/testing.md (between its run-times markers).

    python .ci/run_times.py TIMES_FILE [DOC]

TIMES_FILE holds one line per timed step, ``<seconds> <load average> <command...>``, as .ci/run writes it. The table
is replaced whole, so the times a document states are the ones the last CI run measured on this machine kind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

BEGIN, END = "<!-- run-times: begin (written by .ci/run_times.py) -->", "<!-- run-times: end -->"


def read_times(path: Path) -> list[tuple[float, float, str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            seconds, load, command = line.split(maxsplit=2)
            rows.append((float(seconds), float(load), command))
    return rows


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def shown(command: str) -> str:
    """The command as a reader would type it: without the temporary folders CI writes into."""
    command = re.sub(r"\S+/vllm/bin/python", "vllm-env/bin/python", command)  # CI's temporary venv for vLLM
    return re.sub(r" --(output-dir|vllm-python) \S+", "", command).replace(" >/dev/null", "")


def table(rows, cores: int, commit: str, day: str) -> str:
    lines = [f"Measured on {day} (commit {commit}), {cores} cores; load average (1 min) at the end of each step:",
             "", "| command | time | load |", "|---|---|---|"]
    lines += [f"| `{shown(command)}` | {duration(seconds)} | {load:.1f} |" for seconds, load, command in rows]
    return "\n".join(lines)


def update(doc: Path, rows, cores: int, commit: str, day: str) -> str:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: no run-times markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table(rows, cores, commit, day)}\n{END}{tail}"


def main(argv: list[str]) -> int:
    times = Path(argv[0])
    doc = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "testing.md"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=doc.parent).stdout.strip() or "unknown"
    doc.write_text(update(doc, read_times(times), os.cpu_count() or 0, commit, date.today().isoformat()))
    print(f"run times of {len(read_times(times))} steps written to {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
