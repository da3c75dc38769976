"""Shared fixtures: tiny random models laid out like ComfyUI's models/ folder (built once per run)."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests import cpu_torchvision

cpu_torchvision.apply()  # before anything imports transformers or ComfyUI

from step1x_core.testing.factory import make_tiny  # noqa: E402
from tests.needs import REQUIRED, skip_or_fail  # noqa: E402

NO_COMFYUI = "no ComfyUI checkout at $COMFYUI_PATH or ~/comfy/ComfyUI"

# `.ci/run` runs pytest with --hypothesis-profile=ci: on a busy 2-core CI machine a single draw can stall
# for seconds, and hypothesis's timing checks (too_slow, deadline) then fail tests whose code is fine.
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("models"))


def _tiny_pipeline(models, version: str, **options):
    """The engine on make_tiny's release of ``version`` (its DiT, the text encoder it needs, the VAE): CPU,
    float32, found in the models folder as the CLI's --models-dir finds them."""
    from step1x_core.pipeline import Step1XEditPipeline
    from step1x_core.release_files import find_in_models_dir

    return Step1XEditPipeline.from_files(find_in_models_dir(models, "dit", version), find_in_models_dir(models, "vae"),
                                         find_in_models_dir(models, "text_encoder", version), device="cpu",
                                         dtype=torch.float32, **options)


# One tiny pipeline of each kind, built once per run and shared by every test folder. Tests that change one
# (a weight, a hook) put it back before they return.
@pytest.fixture(scope="session")
def pipe(tiny_models):
    """v1.1 with the Qwen2.5-VL folder: what `from_files` on the models folder's defaults gives."""
    return _tiny_pipeline(tiny_models, "v1.1")


@pytest.fixture(scope="session")
def v12_pipe(tiny_models):
    """v1.2: the transformer/ folder with its own text_encoder/."""
    return _tiny_pipeline(tiny_models, "v1.2")


@pytest.fixture(scope="session")
def reasoning_pipe(tiny_models):
    """v1.2 keeping the text encoder's LM head, for thinking and reflection."""
    return _tiny_pipeline(tiny_models, "v1.2", reasoning=True)


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """Real ComfyUI with this pack, tiny models under the release names and the test image as
    input/cat.png, and as input/example.png (the shipped workflows' image) the same picture with an area
    painted in the mask editor (its alpha), for the masked workflow. Booted once per run."""
    from tests.comfyui_harness import REPO_ROOT, ComfyUI, find_comfyui

    root = find_comfyui()
    if root is None:
        skip_or_fail(NO_COMFYUI)
    comfy = ComfyUI(root, tmp_path_factory.mktemp("comfyui"))
    make_tiny(comfy.models)
    shutil.copy(REPO_ROOT / "tests" / "data" / "cat.png", comfy.workdir / "input" / "cat.png")
    shutil.copy(REPO_ROOT / "tests" / "data" / "cat_painted.png", comfy.workdir / "input" / "example.png")
    return comfy


# Tests that reach ComfyUI through these fixtures are marked `comfyui`; every `comfyui` test is `slow`
# (booting ComfyUI alone takes seconds), so `pytest -m "not slow"` is the quick inner loop.
COMFYUI_FIXTURES = {"comfyui", "comfy_vae_model"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if COMFYUI_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.comfyui)
        if item.get_closest_marker("comfyui") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI no ComfyUI test may skip, whatever skips it (a missing tool, a skipif, pytest.skip)."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRED and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("comfyui"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"a ComfyUI test skipped in CI (STEP1X_REQUIRE_COMFYUI=1): {reason}"


def pytest_sessionstart(session):
    from tests.comfyui_harness import find_comfyui

    if REQUIRED and find_comfyui() is None:
        pytest.exit(f"CI: {NO_COMFYUI}, so the ComfyUI tests cannot run; set COMFYUI_PATH", returncode=1)


def pytest_report_header(config):
    from tests.comfyui_harness import comfyui_version, find_comfyui

    root = find_comfyui()
    if root is None:
        return f"ComfyUI integration tests: SKIPPED - {NO_COMFYUI} (see README, Development)"
    return f"ComfyUI integration tests: using ComfyUI {comfyui_version(root)} at {root}"
