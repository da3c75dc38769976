"""The pack as a user installs it: the tracked files copied (not symlinked) into
`ComfyUI/custom_nodes/<folder>`, its requirements installed, and no pip-installed engine
(`import step1x_core` fails in the server). A real `main.py --cpu` server must load every node and
run the basic and low-VRAM workflows; everything the pack opened while doing so must be shipped.

One server per folder name users get: ComfyUI-Manager and `git clone` keep the repository's name,
the Comfy Registry uses the node id, and people rename folders.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.comfyui_harness import REPO_ROOT, find_comfyui
from tests.comfyui.graphs import fast_api_graph
from tests.comfyui_boot import BLOCKED
from tests.comfyui_server import ComfyUIServer
from tests.registry_files import shipped_files
from tests.needs import skip_or_fail

pytestmark = pytest.mark.comfyui
FOLDERS = ("ComfyUI-Step1X-Edit", "step1x-edit", "step1x_edit", "step1x-edit-comfyui")


def pack_node_ids() -> set[str]:
    """Read from the source, independently of what ComfyUI reports."""
    return {match for path in (REPO_ROOT / "nodes").glob("*.py")
            for match in re.findall(r'node_id="(\w+)"', path.read_text())}


@pytest.fixture(scope="module", params=FOLDERS)
def server(request, tmp_path_factory):
    if find_comfyui() is None:
        skip_or_fail("no ComfyUI checkout at $COMFYUI_PATH or ~/comfy/ComfyUI")
    basic = request.param == FOLDERS[0]  # the full check once; the other names load and list nodes
    comfy = ComfyUIServer(tmp_path_factory.mktemp("user-install"), request.param, copy=True, block_engine=True,
                          record_opens=basic, models=basic)
    try:
        comfy.wait_until_up()
        yield comfy
    finally:
        comfy.stop()


def test_the_engine_is_really_not_importable(server):
    # What makes this test mean something: a copy, not a link, and the top-level name refused.
    assert not server.pack.is_symlink() and not (server.pack / ".git").exists()
    assert BLOCKED in server.log()


def test_pack_loads_without_import_failure(server):
    log = server.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and server.pack.name in line]
    assert not failed, "\n".join(failed) + "\n" + log[-4000:]
    assert "Error while calling comfy_entrypoint" not in log, log[-4000:]


def test_every_node_of_the_pack_is_listed(server):
    expected = pack_node_ids()
    assert len(expected) >= 7
    listed = server.get("/object_info").keys()
    assert expected <= listed, f"missing from /object_info: {sorted(expected - listed)}"


# The workflows run once, in the first install (its server has the models and records file opens).
in_the_first_install = pytest.mark.parametrize("server", FOLDERS[:1], indirect=True)


@in_the_first_install
@pytest.mark.parametrize("workflow", ["step1x_edit_basic", "step1x_edit_low_vram"])
def test_workflow_produces_an_image(server, workflow):
    """basic: the Qwen folder; low VRAM: ComfyUI's single Qwen file, so the packaged tokenizer and
    config are read from the copied pack."""
    entry = server.run_prompt(fast_api_graph(workflow))
    server.ran.add(workflow)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000]
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    assert len(images) == 1
    path = server.workdir / "output" / images[0]["subfolder"] / images[0]["filename"]
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (64, 96, 3)  # Restore Size brings it back to cat.png's 96x64
    assert pixels.std() > 1.0, "a flat image"


def _fetch_frontend_files(server) -> None:
    """What the browser asks for: translations, the extension, help pages, the templates."""
    server.get("/i18n")
    for path in sorted((REPO_ROOT / "web").rglob("*")):
        if path.is_file():
            urllib.request.urlopen(f"{server.url}/extensions/{server.pack.name}/"
                                   f"{path.relative_to(REPO_ROOT / 'web').as_posix()}", timeout=30).read()
    templates = server.get("/workflow_templates")[server.pack.name]
    for name in templates:
        urllib.request.urlopen(f"{server.url}/api/workflow_templates/{server.pack.name}/{name}.json",
                               timeout=30).read()


def opened_pack_files(server) -> set[str]:
    """Files under the pack folder that the server opened (imports, assets, locales, web files)."""
    pack = str(server.pack.resolve()) + "/"
    opened = set(server.opens_path.read_text().splitlines())
    return {path[len(pack):] for path in opened
            if path.startswith(pack) and Path(path).is_file() and "__pycache__" not in path}


@in_the_first_install
def test_everything_the_pack_read_is_shipped(server):
    """The copy holds only tracked files, so a file the pack needs that git lacks fails the tests
    above; this checks that what was read is also what the Registry packs, and that the run read
    each kind of file at all."""
    _fetch_frontend_files(server)
    opened = opened_pack_files(server)
    for expected in ("__init__.py", "nodes/__init__.py", "step1x_core/qwen/assets/qwen_prefix.txt",
                     "locales/en/nodeDefs.json", "web/js/step1x_edit.js", "workflows/step1x_edit_basic.json"):
        assert expected in opened, f"{expected} was never read: {sorted(opened)}"
    if "step1x_edit_low_vram" in server.ran:  # the single Qwen file takes the packaged tokenizer and config
        assert "step1x_core/qwen/assets/qwen25_tokenizer/tokenizer_config.json" in opened  # vocab.json: read in Rust
        assert "step1x_core/qwen/assets/qwen25_vl_7b/preprocessor_config.json" in opened
    unshipped = opened - shipped_files()
    assert not unshipped, f"read at run time but not packed by `comfy node publish`: {sorted(unshipped)}"
