"""Every Python block of the README and of docs/*.md runs as written: on a CPU, offline, each in a fresh folder.

A block that must not run is preceded by a line ``<!-- not run: REASON -->`` (none is today). Also: every relative
link of these documents names a file that exists, and the README's point to files a wheel ships (docs/, LICENSE,
the package's modules)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- not run: (.+) -->")
# Packages a block imports that [test] leaves out, and why.
NOT_IN_TEST = {"axolotl": "its pins of torch, peft and transformers conflict with [test]: docs/trainers.md#axolotl"}


def python_blocks(path: Path):
    """(first line number, code, reason not to run or None) of each ```python block."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            skip = NOT_RUN.fullmatch(lines[i - 1].strip()) if i else None
            blocks.append((start + 1, "\n".join(lines[start:end]) + "\n", skip.group(1) if skip else None))
            i = end
        i += 1
    return blocks


BLOCKS = [pytest.param(path, line, code, reason, id=f"{path.relative_to(ROOT)}:{line}")
          for path in DOCUMENTS for line, code, reason in python_blocks(path)]


def test_the_documents_have_blocks():
    assert {path.name for path, *_ in (b.values for b in BLOCKS)} >= {"README.md", "usage.md", "peft.md",
                                                                       "serving.md", "quantized.md",
                                                                       "trainers.md"}


@pytest.mark.parametrize("path, line, code, reason", BLOCKS)
def test_block_runs_as_written(path, line, code, reason, tmp_path, monkeypatch):
    if reason is not None:
        pytest.skip(f"marked not run: {reason}")
    for module in sorted(set(re.findall(r"^(?:from|import) (\w+)", code, re.MULTILINE))):
        why = NOT_IN_TEST.get(module, "[test] has it")
        pytest.importorskip(module, reason=f"the block imports {module}, not installed here ({why})")
    monkeypatch.chdir(tmp_path)  # files a block writes (adapters, models) land in a fresh folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    exec(compile(code, f"{path}:{line}", "exec"), {"__name__": "__main__"})


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    for target, _anchor in LINK.findall(path.read_text()):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{path.name}: link to {target} names no file"


def test_readme_links_point_to_what_a_wheel_ships():
    """pyproject.toml ships docs/ inside the package and LICENSE with the metadata."""
    for target, _anchor in LINK.findall((ROOT / "README.md").read_text()):
        if "://" not in target:
            assert target == "LICENSE" or target.startswith("docs/"), target
