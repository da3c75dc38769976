"""The engine's layout rules: small modules with one job, and no ComfyUI anywhere in step1x_core
(the plain-PyTorch engine, CLI and Python API must run without it)."""

from __future__ import annotations

import ast

import pytest

from tests.comfyui_harness import REPO_ROOT

ENGINE_MODULES = sorted((REPO_ROOT / "step1x_core").rglob("*.py"))
MAX_LINES = 360
# Top-level modules ComfyUI provides; importing one would tie the engine to a ComfyUI process.
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server",
                 "execution", "latent_preview", "node_helpers"}


def _imported_top_levels(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", ENGINE_MODULES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_engine_module_is_small_and_comfyui_free(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{lines} lines: split it by job (the layout keeps modules to about 350)"
    comfy = _imported_top_levels(path) & COMFY_MODULES
    assert not comfy, f"the engine imports ComfyUI's {sorted(comfy)}; that belongs in nodes/"


def test_the_checker_sees_comfyui_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import comfy.model_management\nfrom folder_paths import get_full_path\nimport torch\n")
    assert _imported_top_levels(probe) & COMFY_MODULES == {"comfy", "folder_paths"}
