"""Inside ComfyUI the engine is `<pack folder>.step1x_core` and `import step1x_core` fails (users
never pip-install the pack). So no module of the pack may name the engine's top-level package: not
in an import, not in a resource or module look-up. The user-install test proves the same on a real
server; this finds the line at once."""

from __future__ import annotations

import ast

import pytest

from tests.comfyui_harness import REPO_ROOT

ENGINE = "step1x_core"
LOOKUPS = {"files", "import_module", "as_file", "read_text", "open_text", "find_spec", "resource_filename"}
MODULES = sorted(p for folder in ("step1x_core", "nodes") for p in (REPO_ROOT / folder).rglob("*.py")) + [
    REPO_ROOT / "__init__.py"]


def _names_engine(value: object) -> bool:
    return isinstance(value, str) and (value == ENGINE or value.startswith(ENGINE + "."))


def absolute_engine_references(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _names_engine(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _names_engine(node.module):
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in LOOKUPS and any(isinstance(a, ast.Constant) and _names_engine(a.value) for a in node.args):
                found.append((node.lineno, f"{name}({ENGINE!r})"))
    return found


def test_the_checker_finds_each_form():
    source = ("import step1x_core.vae\nfrom step1x_core import sampling\nfrom . import sampling\n"
              "resources.files('step1x_core')\nimportlib.import_module('step1x_core.cli')\n")
    assert [line for line, _ in absolute_engine_references(source)] == [1, 2, 4, 5]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_module_refers_to_the_engine_relatively(path):
    found = absolute_engine_references(path.read_text(encoding="utf-8"))
    assert not found, "; ".join(f"{path.name}:{line}: {text}" for line, text in found)
