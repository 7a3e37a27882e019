"""The layers hold: checked on the imports themselves, not on substrings.

Every module of `api/` and `shared/` is parsed with `ast`; every import counts, including those inside
functions and under `if TYPE_CHECKING:`, with relative imports resolved against the module's package,
and `importlib.import_module("...")` / `__import__("...")` calls with a literal name. Rules (docs in
docs/architecture.md, "Deployables and packages"):

- `api/` never imports `worker`, `torch`, `diffusers`, `transformers` or `devtools`;
- `shared/` imports none of `api`, `worker`, `devtools`, `torch`, `diffusers`, `transformers`.

And at run time, `import api.main` pulls in no torch/diffusers/transformers/worker module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.farm_harness import ROOT

HEAVY = {"torch", "diffusers", "transformers"}
FORBIDDEN: dict[str, set[str]] = {
    "api": {"worker", "devtools"} | HEAVY,
    "shared": {"api", "worker", "devtools"} | HEAVY,
}
# Known violations of the tree as it stands: {module path: reason}. Each is a strict xfail, so the entry
# must go when the import does.
KNOWN: dict[str, str] = {}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every module `path` (a file under `root`) imports."""
    name = module_name(path, root)
    package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                keep = len(package) - (node.level - 1)
                if keep <= 0:
                    raise AssertionError(f"{path}:{node.lineno}: relative import above the top-level package")
                target = ".".join(package[:keep] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module:
                found.append((node.lineno, target))
            else:  # `from . import x`: x may be a module
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def violations(path: Path) -> list[str]:
    layer = path.relative_to(ROOT).parts[0]
    return [f"{path.relative_to(ROOT)}:{line} imports {target}"
            for line, target in imported_modules(path) if target.split(".")[0] in FORBIDDEN[layer]]


def _cases() -> list:
    cases = []
    for layer in sorted(FORBIDDEN):
        for path in sorted((ROOT / layer).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN[rel])] if rel in KNOWN else []
            cases.append(pytest.param(path, id=rel, marks=marks))
    return cases


@pytest.mark.parametrize("path", _cases())
def test_module_imports_respect_its_layer(path: Path) -> None:
    assert violations(path) == []


def test_known_violations_name_existing_modules() -> None:
    assert [rel for rel in KNOWN if not (ROOT / rel).is_file()] == []


def test_the_checker_sees_imports_in_functions_relative_ones_and_import_module(tmp_path: Path) -> None:
    """The checker itself: a parser that found nothing would pass every module."""
    probe = tmp_path / "shared" / "sub" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from api import deps\n"
        "def f():\n"
        "    import torch.nn\n"
        "    from ..engine import x\n"
        "    from . import sibling\n"
        "    importlib.import_module('worker.engine')\n"
    )
    found = [target for _, target in imported_modules(probe, root=tmp_path)]
    assert sorted(found) == sorted(["os", "typing", "api", "torch.nn", "shared.engine", "shared.sub.sibling",
                                   "worker.engine"])


def test_api_does_not_import_torch_diffusers_or_worker() -> None:
    code = (
        "import json, sys, api.main; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'diffusers', 'transformers', 'worker'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
