"""ComfyUI-GGUF's real code, installed as users install it (unpacked into a ComfyUI server's custom_nodes/, its
requirements.txt installed with pip), loading step1x-edit-quantize's GGUF files with Unet Loader (GGUF): each
format edits as Step1X-Edit (not FLUX) through the shipped workflow, within the measured error of the bf16 edit;
a GGUF made from the v1.2 release folder runs the v1.2 workflow (its prompt format needs a v1.2 model). The
same server runs the mixed fp8 file through Load Step1X-Edit DiT and Load Diffusion Model (0.3.75+), or shows
the version it needs."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from step1x_core.quantize import quantize_dit
from step1x_core.testing.factory import make_tiny
from step1x_core.commands.bench_measure import relative_error
from tests.comfyui_harness import REPO_ROOT, comfyui_version, find_comfyui
from tests.comfyui_server import ComfyUIServer
from tests.needs import skip_or_fail
from tests.comfyui.graphs import fast_api_graph
from tests.quantize.measured import EDIT_ERROR  # twice the measured error of the bf16 edit

pytestmark = pytest.mark.comfyui
V11_DIT = "step1x-edit-v1p1-official.safetensors"
V12_DIT = "Step1X-Edit-v1p2/transformer"
# ComfyUI-GGUF's source snapshot, beside the ComfyUI ones (.ci/run exports STEP1X_SHARED_DIR).
GGUF_SNAPSHOTS = Path(os.environ.get("STEP1X_SHARED_DIR", REPO_ROOT.parent / "shared")) / "comfyui-gguf"
GGUF_FORMATS = ("q8_0", "q5_0", "q5_1", "q4_0", "q4_1")


def _install_comfyui_gguf(custom_nodes) -> None:
    archives = sorted(GGUF_SNAPSHOTS.glob("ComfyUI-GGUF-*.tar.gz"))
    if not archives:
        skip_or_fail(f"no ComfyUI-GGUF snapshot (ComfyUI-GGUF-*.tar.gz) in {GGUF_SNAPSHOTS}")
    custom_nodes.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archives[-1]) as archive:
        archive.extractall(custom_nodes, filter="data")
    requirements = custom_nodes / "ComfyUI-GGUF" / "requirements.txt"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r",
                           str(requirements)], capture_output=True, text=True)
    if done.returncode:
        skip_or_fail(f"pip could not install ComfyUI-GGUF's requirements: {done.stderr[-2000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if find_comfyui() is None:
        skip_or_fail("no ComfyUI checkout at $COMFYUI_PATH or ~/comfy/ComfyUI")
    workdir = tmp_path_factory.mktemp("comfyui-gguf")
    models = make_tiny(workdir / "models")
    folder = models / "diffusion_models"
    for fmt in GGUF_FORMATS:
        quantize_dit(folder / V11_DIT, fmt, folder / f"step1x-edit-v1p1-{fmt.upper()}.gguf", progress=False)
    quantize_dit(folder / V11_DIT, "fp8", folder / "step1x-edit-v1p1-fp8mixed.safetensors", progress=False)
    quantize_dit(folder / V12_DIT, "q8_0", folder / "step1x-edit-v1p2-Q8_0.gguf", progress=False)
    _install_comfyui_gguf(workdir / "custom_nodes")
    comfy = ComfyUIServer(workdir, models=False)
    try:
        comfy.wait_until_up()
        yield comfy
    finally:
        comfy.stop()


def _edit(server, workflow: str, loader: dict | None = None) -> tuple[dict, np.ndarray | None]:
    graph = fast_api_graph(workflow)
    if loader is not None:
        graph["2"] = loader  # the DiT loader; its MODEL output is the sampler's
    entry = server.run_prompt(graph)
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    if entry["status"]["status_str"] != "success" or len(images) != 1:
        return entry, None
    path = server.workdir / "output" / images[0]["subfolder"] / images[0]["filename"]
    return entry, np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255


def _gguf_loader(name: str) -> dict:
    return {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": name}}


def test_comfyui_gguf_is_installed_and_lists_the_files(server):
    log = server.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line
              and ("ComfyUI-GGUF" in line or server.pack.name in line)]
    assert not failed, log[-4000:]
    names = server.get("/object_info/UnetLoaderGGUF")["UnetLoaderGGUF"]["input"]["required"]["unet_name"][0]
    assert {f"step1x-edit-v1p1-{fmt.upper()}.gguf" for fmt in GGUF_FORMATS} <= set(names)


@pytest.fixture(scope="module")
def bf16_edit(server):
    entry, image = _edit(server, "step1x_edit_basic")
    assert image is not None, entry["status"]
    return image


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_unet_loader_gguf_edits_as_step1x_edit_within_the_measured_error(server, bf16_edit, fmt):
    before = len(server.log())
    entry, image = _edit(server, "step1x_edit_basic", _gguf_loader(f"step1x-edit-v1p1-{fmt.upper()}.gguf"))
    assert image is not None, (fmt, entry["status"], server.log()[before:][-4000:])
    log = server.log()[before:]
    assert "gguf qtypes" in log and fmt.upper() in log, log[-3000:]  # ComfyUI-GGUF's loader read it
    assert "Step1XEditModel" in log, log[-3000:]  # ComfyUI's detection built Step1X-Edit, not FLUX
    error = relative_error(torch_like(image), torch_like(bf16_edit))
    assert 0 < error < EDIT_ERROR[fmt], (fmt, error)


def test_a_v12_gguf_loads_as_v12(server):
    reference_entry, reference = _edit(server, "step1x_edit_v12")
    assert reference is not None, reference_entry["status"]
    entry, image = _edit(server, "step1x_edit_v12", _gguf_loader("step1x-edit-v1p2-Q8_0.gguf"))
    assert image is not None, (entry["status"], server.log()[-4000:])  # v1.2's prompt format runs only on v1.2
    assert relative_error(torch_like(image), torch_like(reference)) < 2 * EDIT_ERROR["q8_0"] + 0.01
    # the v1.0/v1.1 prompt format is refused by it: the model is v1.2
    graph_entry, refused = _edit_with_prompt_format(server, "v1.0 / v1.1")
    assert refused is None and "v1.2 model" in str(graph_entry["status"]), graph_entry["status"]


def _edit_with_prompt_format(server, prompt_format: str):
    graph = fast_api_graph("step1x_edit_v12")
    graph["2"] = _gguf_loader("step1x-edit-v1p2-Q8_0.gguf")
    graph["11"]["inputs"]["prompt_format"] = prompt_format
    entry = server.run_prompt(graph)
    return entry, None if entry["status"]["status_str"] != "success" else entry


@pytest.mark.parametrize("loader", ["Step1XEditDiTLoader", "UNETLoader"])
def test_mixed_fp8_file_through_the_workflow(server, bf16_edit, loader):
    name = "step1x-edit-v1p1-fp8mixed.safetensors"
    inputs = ({"dit_name": name, "weight_dtype": "default", "version": "auto"} if loader == "Step1XEditDiTLoader"
              else {"unet_name": name, "weight_dtype": "default"})
    entry, image = _edit(server, "step1x_edit_basic", {"class_type": loader, "inputs": inputs})
    version = comfyui_version(find_comfyui())
    if tuple(int(p) for p in version.split(".")[:3]) < (0, 3, 75):
        assert image is None and "ComfyUI 0.3.75 or newer" in str(entry["status"]), entry["status"]
        return
    assert image is not None, (entry["status"], server.log()[-4000:])
    error = relative_error(torch_like(image), torch_like(bf16_edit))
    assert 0 < error < EDIT_ERROR["fp8"], error


def torch_like(image: np.ndarray):
    import torch

    return torch.from_numpy(image)
