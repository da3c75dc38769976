"""The shipped workflows in the real ComfyUI frontend: a ComfyUI server with this pack and the tiny
models, driven by headless Chromium (Debian's `chromium`) through `playwright-core` (npm, in
tests/browser). Screenshots are kept in test-artifacts/browser/.

Skips, saying why, when Chromium, the npm packages or a ComfyUI checkout are missing (fails in CI).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request

import pytest

from tests.comfyui.graphs import WORKFLOWS
from tests.comfyui_harness import REPO_ROOT, find_comfyui
from tests.comfyui_server import ComfyUIServer
from tests.needs import skip_or_fail

BROWSER_DIR = REPO_ROOT / "tests" / "browser"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NODE = shutil.which("node")
pytestmark = [pytest.mark.comfyui, pytest.mark.browser]


def _missing() -> str | None:
    if find_comfyui() is None:
        return "no ComfyUI checkout at $COMFYUI_PATH or ~/comfy/ComfyUI"
    if CHROMIUM is None:
        return "no chromium on PATH (Debian package chromium)"
    if NODE is None or not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core not installed (npm ci --prefix tests/browser)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _tools():
    if _missing() is not None:
        skip_or_fail(f"browser test: {_missing()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = ComfyUIServer(tmp_path_factory.mktemp("comfyui-server"))
    try:
        comfy.wait_until_up()
        yield comfy.url, comfy.workdir
    finally:
        comfy.stop()


@pytest.fixture(scope="module")
def report(server):
    url, workdir = server
    result = subprocess.run([NODE, str(BROWSER_DIR / "run_workflows.mjs"), url, str(WORKFLOWS), str(ARTIFACTS),
                             CHROMIUM], capture_output=True, text=True, timeout=900, cwd=BROWSER_DIR)
    assert result.returncode == 0, result.stderr[-3000:] + (workdir / "server.log").read_text()[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_extension_loads_without_page_errors(report):
    assert report["extensionLoaded"]
    assert report["dialogsLeftOpen"] == 0, "a dialog covers the canvas in the screenshots"
    # A first start opens the template browser (closed as a user would); no dialog may open later,
    # while the workflows load and run.
    later = [d for d in report["dialogsClosed"] if not d.startswith("startup:")]
    assert not later, later
    # The frontend itself may throw while starting up (it does so without any custom node too);
    # nothing may throw while our workflows load and run, and nothing from our extension ever.
    ours = [e for e in report["consoleErrors"] if not e.startswith("startup:") or "step1x" in e.lower()]
    assert not ours, ours


@pytest.mark.parametrize("name", sorted(p.stem for p in WORKFLOWS.glob("*.json")))
def test_workflow_loads_converts_queues_and_finishes(report, name):
    result = report["workflows"][name]
    assert result["missing"] == [], f"missing node types {result['missing']}"
    expected = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    converted = {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]}
                 for node_id, node in result["converted"].items()}
    assert converted == expected, "the frontend's graphToPrompt differs from the shipped API file"
    assert result["status"]["completed"], result["status"]
    assert (ARTIFACTS / f"{name}.png").is_file() and (ARTIFACTS / f"{name}-run.png").is_file()


def test_workflows_are_in_the_template_browser(server):
    url, _ = server
    templates = json.loads(urllib.request.urlopen(url + "/workflow_templates").read())
    assert sorted(templates["step1x-edit"]) == sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def test_working_size_is_shown_on_the_scale_node(report):
    labels = report["workflows"]["step1x_edit_basic"]["workingSizeLabels"]
    # example.png is 96x64; the test runs the workflow at size level 64 -> 64x48.
    assert labels == ["working size: 64×48 (from 96×64)"]
