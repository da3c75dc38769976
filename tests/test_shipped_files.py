"""Every file the pack reads at run time reaches users: tracked by git (ComfyUI-Manager and
`git clone`), packed by `comfy node publish` (not in `.comfyignore`, or brought back by
`[tool.comfy] includes`), kept by `git archive` (no `export-ignore`), and, for the engine's
assets, in the pip package's package-data. The user-install test checks the same from the other
side: the files a real server opened."""

from __future__ import annotations

import subprocess

import pytest

from tests.comfyui_harness import REPO_ROOT
from tests.registry_files import (export_ignored, gitignored, package_data_covers, runtime_files, shipped_files,
                                  tracked_files, tomllib)


@pytest.fixture(scope="module")
def runtime() -> set[str]:
    if subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse"], capture_output=True).returncode != 0:
        pytest.fail("not a git checkout: what users get cannot be checked", pytrace=False)
    return runtime_files()


def test_the_runtime_list_has_every_kind_of_file(runtime):
    for expected in ("__init__.py", "nodes/__init__.py", "step1x_core/qwen/assets/qwen_prefix.txt",
                     "step1x_core/qwen/assets/qwen25_tokenizer/vocab.json", "step1x_core/qwen/assets/qwen25_vl_7b/config.json",
                     "web/js/step1x_edit.js", "web/docs/Step1XEditSampler.md", "locales/zh/nodeDefs.json",
                     "workflows/step1x_edit_basic.json", "workflows/api/step1x_edit_basic.json"):
        assert expected in runtime


def test_every_runtime_file_is_tracked(runtime):
    untracked = runtime - tracked_files()
    assert not untracked, f"read at run time but not in git (users never get them): {sorted(untracked)}"


def test_no_runtime_file_is_gitignored(runtime):
    ignored = gitignored(runtime)
    assert not ignored, f"matched by .gitignore (a fresh `git add` would skip them): {sorted(ignored)}"


def test_no_runtime_file_is_export_ignored(runtime):
    lost = export_ignored(runtime)
    assert not lost, f"marked export-ignore in .gitattributes (missing from archive downloads): {sorted(lost)}"


def test_comfy_node_publish_packs_every_runtime_file(runtime):
    missing = runtime - shipped_files()
    assert not missing, f"not packed by `comfy node publish` (.comfyignore / includes): {sorted(missing)}"


ENGINE_ASSET_FOLDERS = sorted((REPO_ROOT / "step1x_core").rglob("assets"))


@pytest.mark.parametrize("folder", ENGINE_ASSET_FOLDERS, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_engine_assets_are_in_the_pip_package(folder):
    package_dir = folder.parent.relative_to(REPO_ROOT).as_posix()  # e.g. step1x_core/qwen
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"].get(package_dir.replace("/", "."), [])
    assets = [path.relative_to(REPO_ROOT).as_posix() for path in folder.rglob("*") if path.is_file()]
    assert assets
    uncovered = [name for name in assets if not package_data_covers(name, patterns, package_dir)]
    assert not uncovered, f"not in [tool.setuptools.package-data] (missing from the wheel): {uncovered}"
