"""The shipped workflows: UI and API files agree, every node type exists, every graph runs.

They run on the tiny models (make-tiny writes the release file names the workflows use), with the
size level and step count lowered so a CPU finishes them in seconds.
"""

from __future__ import annotations

import json

import pytest

from tests.comfyui.graphs import WORKFLOWS, fast_api_graph
from tools.workflow_tools import graphs, node_infos, ui_to_api

NAMES = sorted(path.stem for path in WORKFLOWS.glob("*.json"))


def _load(path):
    return json.loads(path.read_text())


def test_every_graph_is_shipped_in_both_formats():
    assert NAMES == sorted(graphs())
    for name in NAMES:
        assert (WORKFLOWS / "api" / f"{name}.json").is_file(), name


@pytest.mark.parametrize("name", NAMES)
def test_ui_file_converts_to_its_api_file(comfyui, name):
    infos = node_infos(comfyui.nodes)
    ui = _load(WORKFLOWS / f"{name}.json")
    assert {node["type"] for node in ui["nodes"]} <= infos.keys()
    assert ui_to_api(ui, infos) == _load(WORKFLOWS / "api" / f"{name}.json")


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_on_tiny_models(comfyui, name):
    result = comfyui.run(fast_api_graph(name))
    assert result.success, result.error()
    saved = [image for output in result.outputs.values() for image in output.get("images", [])]
    assert saved, "the workflow saved no image"
