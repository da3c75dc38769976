"""pyproject.toml as the Comfy Registry reads it, and the requirements.txt that ComfyUI installs.

The rules are the registry's own:
- https://docs.comfy.org/registry/specifications (the pyproject.toml specification),
- Comfy-Org/registry-backend `mapper/node.go` (IsValidNodeID, description <= 1000 characters) and
  `mapper/publisher.go` (IsValidPublisherID), which the server applies on publish,
- comfy-cli `comfy_cli/registry/config_parser.py` (extract_node_configuration, which `comfy node
  validate` / `comfy node publish` run: license forms, requires-comfyui pattern, classifiers).
comfy-cli's parser is run on the file as well (CI installs comfy-cli for it; elsewhere it skips without it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.needs import REQUIRED

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"

# registry-backend IsValidNodeID: ASCII letters/digits/._-, starting and ending with a letter or digit
NODE_ID = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9._-]*[a-zA-Z0-9])?$")
# registry-backend IsValidPublisherID
PUBLISHER_ID = re.compile(r"^[a-z][a-z0-9-]*$")
# https://semver.org: MAJOR.MINOR.PATCH[-pre][+build]
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$")
# comfy-cli validate_version, for requires-comfyui
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
ICON_TYPES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".gif": "GIF", ".svg": None}
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}
TORCH_PACKAGES = {"torch", "torchvision", "torchaudio"}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def project(pyproject) -> dict:
    return pyproject["project"]


@pytest.fixture(scope="module")
def comfy(pyproject) -> dict:
    return pyproject["tool"]["comfy"]


def github_repo(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    parts = parsed.path.strip("/").removesuffix(".git").split("/")
    assert parsed.scheme == "https" and parsed.netloc == "github.com" and len(parts) == 2, url
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------------
# [project]


def test_required_project_fields_are_present(project):
    for field in ("name", "version", "description", "license"):
        assert project.get(field), f"[project] {field} is missing or empty"
    assert "version" not in project.get("dynamic", []), "a dynamic version needs [tool.comfy.version].path"
    assert project.get("urls", {}).get("Repository"), "[project.urls] Repository is required"


def test_name_is_a_valid_registry_node_id(project):
    name = project["name"]
    assert 0 < len(name) < 100
    assert NODE_ID.match(name), "only ASCII letters, digits, '-', '_', '.'; start and end alphanumeric"
    assert name[0].isalpha(), "must not start with a digit or special character"
    assert not re.search(r"[._-]{2}", name), "no consecutive special characters"
    assert "comfyui" not in name.lower(), "the registry asks not to include 'ComfyUI' in the name"


def test_version_is_semver(project):
    assert SEMVER.match(project["version"]), project["version"]


def test_description_fits_the_registry(project):
    description = project["description"]
    assert isinstance(description, str) and description.strip()
    assert len(description) <= 1000


def test_license_is_in_a_registry_format(project):
    license_ = project["license"]
    # The specification accepts {file = "..."} or {text = "..."}; a bare string is flagged there.
    assert isinstance(license_, dict) and set(license_) & {"file", "text"}, license_
    if "file" in license_:
        assert (ROOT / license_["file"]).is_file(), f"license file {license_['file']} is not in the repo"


def test_repository_is_a_github_https_url(project):
    github_repo(project["urls"]["Repository"])


def test_classifiers_use_the_registry_vocabulary(project):
    for classifier in project.get("classifiers", []):
        if classifier.startswith("Operating System :: "):
            assert classifier.removeprefix("Operating System :: ").startswith(OS_PREFIXES), classifier
        if classifier.startswith("Environment ::"):
            assert classifier.removeprefix("Environment :: ") in ACCELERATORS, classifier


# ---------------------------------------------------------------------------------------------
# [tool.comfy]


def test_tool_comfy_fields(comfy):
    assert PUBLISHER_ID.match(comfy["PublisherId"]), comfy["PublisherId"]
    assert isinstance(comfy["DisplayName"], str) and comfy["DisplayName"].strip()
    assert isinstance(comfy.get("includes", []), list)
    for path in comfy.get("includes", []):
        assert (ROOT / path).exists(), f"includes names {path}, which is not in the repo"


def test_requires_comfyui_matches_comfy_cli_pattern(comfy):
    spec = comfy.get("requires-comfyui", "")
    for part in (p.strip() for p in spec.split(",") if spec):
        assert VERSION_PART.match(part), spec


def test_icon_is_an_https_url_to_a_file_of_this_repo(comfy, project):
    icon = urlparse(comfy["Icon"])
    assert icon.scheme == "https", comfy["Icon"]
    assert icon.netloc == "raw.githubusercontent.com", "the icon is served raw from this repo's GitHub"
    owner, repo, _ref, *path = icon.path.strip("/").split("/")
    assert (owner, repo) == github_repo(project["urls"]["Repository"]), "the icon must come from this repo"
    local = ROOT.joinpath(*path)
    assert path and local.is_file(), f"{'/'.join(path)} (named by the Icon URL) is not in the repo"
    assert local.suffix.lower() in ICON_TYPES, "SVG, PNG, JPG or GIF"


def test_icon_is_square_and_at_most_400px(comfy):
    from PIL import Image

    path = ROOT.joinpath(*urlparse(comfy["Icon"]).path.strip("/").split("/")[3:])
    expected_format = ICON_TYPES[path.suffix.lower()]
    if expected_format is None:
        pytest.skip("SVG icon: no pixel size")
    with Image.open(path) as image:
        assert image.format == expected_format
        width, height = image.size
    assert width == height and 0 < width <= 400, (width, height)


# ---------------------------------------------------------------------------------------------
# requirements.txt (what ComfyUI-Manager / `pip install -r` install into ComfyUI's Python)


def requirement_lines() -> list[str]:
    lines = []
    for raw in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", raw).strip()  # pip's comment rule
        if line:
            lines.append(line)
    return lines


def requirement_name(line: str) -> str:
    """The normalised project name of a requirement line (PEP 503)."""
    name = re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*", line)
    assert name, f"unexpected requirements line: {line}"
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def test_requirements_never_install_torch():
    for line in requirement_lines():
        normalised = requirement_name(line)
        assert normalised not in TORCH_PACKAGES, f"requirements.txt must leave {normalised} to ComfyUI"


def test_requirements_pin_nothing_exactly():
    assert requirement_lines(), "requirements.txt is empty"
    for line in requirement_lines():
        assert "==" not in line, f"exact pin in requirements.txt: {line}"


def test_requirements_are_the_package_dependencies_less_torch(project):
    """A ComfyUI user gets the engine's dependencies from requirements.txt alone (the pack is never
    pip-installed), so the two lists must not drift apart."""
    declared = {line for line in project["dependencies"] if requirement_name(line) not in TORCH_PACKAGES}
    assert set(requirement_lines()) == declared


# ---------------------------------------------------------------------------------------------
# comfy-cli's own parser (it is not a dependency). CI installs it into a virtual environment of its own
# (it pulls many packages) and names that environment's Python in STEP1X_COMFY_CLI_PYTHON; otherwise
# the test's own Python is used when it has comfy-cli. Missing in CI, the test fails instead of skipping.

COMFY_CLI_PYTHON = "STEP1X_COMFY_CLI_PYTHON"
# Runs comfy-cli's parser on argv[1] and prints what it read, as JSON.
PARSE = """
import json, sys
from comfy_cli.registry.config_parser import extract_node_configuration
config = extract_node_configuration(sys.argv[1])
if config is None:
    sys.exit("comfy-cli could not read the file")
p, t = config.project, config.tool_comfy
print(json.dumps({"name": p.name, "version": p.version, "description": p.description,
                  "repository": p.urls.repository, "license_file": p.license.file,
                  "requires_comfyui": p.supported_comfyui_version, "publisher_id": t.publisher_id,
                  "display_name": t.display_name, "icon": t.icon, "includes": list(t.includes)}))
"""


def comfy_cli_python() -> str | None:
    """The Python that has comfy-cli: $STEP1X_COMFY_CLI_PYTHON, else this one if it has it, else None."""
    named = os.environ.get(COMFY_CLI_PYTHON)
    if named:
        return named
    return sys.executable if importlib.util.find_spec("comfy_cli") is not None else None


def in_ci() -> bool:
    return REQUIRED or os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def test_comfy_cli_parses_the_metadata(project, comfy, tmp_path):
    python = comfy_cli_python()
    if python is None:
        reason = (f"comfy-cli is not installed (pip install comfy-cli, or set {COMFY_CLI_PYTHON} to a Python that "
                  "has it)")
        if in_ci():
            pytest.fail(f"{reason}; CI requires this test to run", pytrace=False)
        pytest.skip(reason)
    # comfy-cli creates its config folder under the home folder: keep that in tmp_path. No telemetry, and
    # no prompt can wait for an answer (stdin is closed).
    env = {**os.environ, "HOME": str(tmp_path), "USERPROFILE": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path),
           "DO_NOT_TRACK": "1", "COMFY_NO_TELEMETRY": "1"}
    result = subprocess.run([python, "-c", PARSE, str(PYPROJECT)], capture_output=True, text=True, env=env,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, f"{python}: {result.stderr}"
    config = json.loads(result.stdout.strip().splitlines()[-1])

    assert config["name"] == project["name"]
    assert config["version"] == project["version"]  # `comfy node validate` fails on an empty version
    assert config["description"] == project["description"]
    assert config["repository"] == project["urls"]["Repository"]
    assert config["license_file"] == project["license"].get("file", "")
    # comfy-cli blanks a requires-comfyui it cannot parse
    assert config["requires_comfyui"] == comfy.get("requires-comfyui", "")
    assert config["publisher_id"] == comfy["PublisherId"]
    assert config["display_name"] == comfy["DisplayName"]
    assert config["icon"] == comfy["Icon"]
    assert config["includes"] == list(comfy.get("includes", []))
