"""The house as docs/design.md draws it: the module map is complete and its import rule holds; importing the package
has no side effect beyond what is documented; names that moved between modules still work where they were."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mora_kernels"


def map_rows() -> dict[str, int]:
    """``{module: row}`` from the table of docs/design.md's Map section, rows numbered from the top."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("\n## Map\n", 1)[1].split("\n## ", 1)[0]
    rows, row = {}, -1
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(\w+)\.py`", cells[1]) if line.startswith("|") and len(cells) == 3 else None
        if match:
            row += bool(cells[0])  # a named row starts; an empty first cell continues the row above
            rows[match[1]] = row
    return rows


def package_imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its code, except in ``__getattr__`` (deprecated
    aliases of names that moved, imported on use)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    aliases = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"]
    skipped = {id(node) for alias in aliases for node in ast.walk(alias)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or node.module == "mora_kernels"):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mora_kernels."))
    return found & {path.stem for path in PACKAGE.glob("*.py")}


def test_design_opens_with_a_map_of_every_module():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert re.findall(r"^## .*", text, re.MULTILINE)[0] == "## Map"
    assert set(map_rows()) == {path.stem for path in PACKAGE.glob("*.py")}


def test_modules_import_only_their_row_and_below():
    rows = map_rows()
    upward = {module: sorted(name for name in package_imports(module) if rows[name] < rows[module])
              for module in rows}
    assert {module: names for module, names in upward.items() if names} == {}


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_importing_the_package_imports_no_backend_and_no_triton():
    code = ("import sys, mora_kernels; print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton' "
            "or m.startswith(('mora_kernels.triton', 'mora_kernels.cuda'))))")
    assert _run(code) == "[]"


def test_peft_integration_wraps_the_lora_model_methods_its_docstring_names():
    pytest.importorskip("peft")
    code = ("import json; from peft.tuners.lora import LoraModel; from peft.config import PeftConfigMixin; "
            "import peft; classes = [LoraModel, PeftConfigMixin, *vars(peft).values()]; "
            "classes = list(dict.fromkeys(c for c in classes if isinstance(c, type))); "
            "before = [dict(vars(c)) for c in classes]; "
            "import mora_kernels.peft_integration as mkp; "
            "print(json.dumps([sorted(f'{c.__name__}.{k}' for c, b in zip(classes, before) "
            "for k, v in vars(c).items() if b.get(k) is not v), mkp.__doc__]))")
    wrapped, doc = json.loads(_run(code))
    assert wrapped == ["LoraModel._check_merge_allowed", "LoraModel._create_and_replace",
                       "LoraModel.add_weighted_adapter", "PeftConfigMixin.from_peft_type"]
    paragraph = doc[doc.index("Importing this module"):]
    assert "three of ``LoraModel``'s methods" in paragraph and "one of PEFT's config classmethods" in paragraph
    assert "``PeftConfigMixin.from_peft_type``" in paragraph
    assert all(f"{name.split('.')[1]}``" in paragraph for name in wrapped)


@pytest.mark.parametrize("name,home", [("replace_linears", "adapters"), ("targets", "adapters"),
                                       ("matches", "adapters"), ("set_submodule", "adapters"),
                                       ("check_target_modules", "core")])
def test_names_that_left_layer_still_work_there_with_a_deprecation_warning(name, home):
    import importlib

    import mora_kernels.layer as layer

    with pytest.warns(DeprecationWarning, match=f"mora_kernels.{home}.{name}"):
        assert getattr(layer, name) is getattr(importlib.import_module(f"mora_kernels.{home}"), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = layer.nothing


def test_names_that_left_adapters_still_work_there():
    import mora_kernels.adapters as adapters
    from mora_kernels import checkpoint, rollback

    for name in ("read_config", "read_matrices", "weights_file", "write_checkpoint", "CONFIG_NAME", "KEY_PREFIX"):
        assert getattr(adapters, name) is getattr(checkpoint, name)
    assert adapters.check_not_shared is rollback.check_not_shared
