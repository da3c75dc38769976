"""Which files users get, and which files the pack reads at run time.

`comfy node publish` packs the files git tracks, less those matching `.comfyignore` (newer
comfy-cli), plus `[tool.comfy] includes`; ComfyUI-Manager and `git clone` get the tracked files.
Files marked `export-ignore` vanish from `git archive` downloads, so none may be.
"""

from __future__ import annotations

import fnmatch
import subprocess
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tests.comfyui_harness import REPO_ROOT

# Read at run time by ComfyUI, the nodes or the engine (folders walked in the working tree, so a new
# file that was never added to git shows up here and fails the check).
RUNTIME_FOLDERS = ("nodes", "step1x_core", "web", "locales", "workflows")
RUNTIME_FILES = ("__init__.py", "pyproject.toml", "requirements.txt", "LICENSE")
SKIPPED_PARTS = {"__pycache__"}


def _git(*args: str, stdin: str | None = None, check: bool = True) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], input=stdin, capture_output=True, text=True,
                          check=check).stdout


def tracked_files() -> set[str]:
    """The files a `git clone` has."""
    return set(_git("ls-files", "-z").split("\0")) - {""}


def comfyignore_patterns() -> list[str]:
    path = REPO_ROOT / ".comfyignore"
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def export_ignored(paths: set[str]) -> set[str]:
    if not paths:
        return set()
    out = _git("check-attr", "--stdin", "export-ignore", stdin="\n".join(sorted(paths)))
    return {line.split(": ")[0] for line in out.splitlines() if line.endswith(": set")}


def comfy_includes() -> list[str]:
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        return [item.strip("/") for item in tomllib.load(f)["tool"]["comfy"].get("includes", [])]


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatch(name, pattern) or name.startswith(pattern.rstrip("/") + "/")


def shipped_files() -> set[str]:
    """What `comfy node publish` packs, less what a `git archive` download would lose."""
    included = {path.relative_to(REPO_ROOT).as_posix() for item in comfy_includes()
                for path in (REPO_ROOT / item).rglob("*") if path.is_file()}
    packed = {name for name in tracked_files() if not any(_matches(name, p) for p in comfyignore_patterns())}
    packed |= included
    return packed - export_ignored(packed)


def runtime_files() -> set[str]:
    found = set(RUNTIME_FILES)
    for folder in RUNTIME_FOLDERS:
        for path in (REPO_ROOT / folder).rglob("*"):
            relative = path.relative_to(REPO_ROOT)
            if path.is_file() and not SKIPPED_PARTS & set(relative.parts) and path.suffix != ".pyc":
                found.add(relative.as_posix())
    return found


def gitignored(paths: set[str]) -> set[str]:
    # check-ignore exits 1 when no path is ignored
    return set(_git("check-ignore", "--no-index", "--stdin", stdin="\n".join(sorted(paths)), check=False).splitlines())


def package_data_covers(path: str, patterns: list[str], package: str = "step1x_core") -> bool:
    relative = Path(path).relative_to(package).as_posix()
    return any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)
