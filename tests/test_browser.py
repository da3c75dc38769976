"""The shipped workflows in the real ComfyUI frontend: a ComfyUI server with this pack and the tiny
models, driven by headless Chromium (Debian's `chromium`) through `playwright-core` (npm, in
tests/browser). Screenshots are kept in test-artifacts/browser/.

Skips, saying why, when Chromium, the npm packages or a ComfyUI checkout are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from step1x_core.testing.factory import make_tiny
from tests.comfyui_harness import REPO_ROOT, find_comfyui
from tests.workflow_tools import WORKFLOWS

BROWSER_DIR = REPO_ROOT / "tests" / "browser"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NODE = shutil.which("node")
SERVER_BOOT = """
import importlib.util, runpy, sys
spec = importlib.util.spec_from_file_location("cpu_torchvision", sys.argv[1])
shim = importlib.util.module_from_spec(spec); spec.loader.exec_module(shim); shim.apply()
sys.argv = ["main.py", *sys.argv[2:]]
runpy.run_path("main.py", run_name="__main__")
"""


def _missing() -> str | None:
    if find_comfyui() is None:
        return "no ComfyUI checkout at $COMFYUI_PATH or ~/comfy/ComfyUI"
    if CHROMIUM is None:
        return "no chromium on PATH (Debian package chromium)"
    if NODE is None or not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core not installed (npm ci --prefix tests/browser)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"browser test skipped: {_missing()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("comfyui-server")
    make_tiny(workdir / "models")
    (workdir / "input").mkdir()
    shutil.copy(REPO_ROOT / "tests" / "data" / "cat.png", workdir / "input" / "example.png")
    (workdir / "custom_nodes").mkdir()
    (workdir / "custom_nodes" / "step1x-edit").symlink_to(REPO_ROOT, target_is_directory=True)
    folders = ("diffusion_models", "text_encoders", "vae", "loras")
    config = "step1x_tests:\n    base_path: {}\n{}    custom_nodes: custom_nodes\n".format(
        workdir, "".join(f"    {f}: models/{f}\n" for f in folders))
    (workdir / "extra_model_paths.yaml").write_text(config)
    port = _free_port()
    log = open(workdir / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_BOOT, str(REPO_ROOT / "tests" / "cpu_torchvision.py"), "--cpu",
         "--listen", "127.0.0.1", "--port", str(port), "--extra-model-paths-config",
         str(workdir / "extra_model_paths.yaml"), "--input-directory", str(workdir / "input"),
         "--output-directory", str(workdir / "output"), "--disable-auto-launch"],
        cwd=find_comfyui(), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {(workdir / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/object_info/Step1XEditSampler", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("ComfyUI did not start in 120 s")
        yield url, workdir
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def report(server):
    url, workdir = server
    result = subprocess.run([NODE, str(BROWSER_DIR / "run_workflows.mjs"), url, str(WORKFLOWS), str(ARTIFACTS),
                             CHROMIUM], capture_output=True, text=True, timeout=900, cwd=BROWSER_DIR)
    assert result.returncode == 0, result.stderr[-3000:] + (workdir / "server.log").read_text()[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_extension_loads_without_page_errors(report):
    assert report["extensionLoaded"]
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
