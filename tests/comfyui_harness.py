"""Real ComfyUI, in process, with this pack as its only custom node (booted once per test run).

Finds a checkout at $COMFYUI_PATH or ~/comfy/ComfyUI. Models come from a temporary models/ folder;
outputs, inputs and temp files go to a temporary directory. Graphs run through ComfyUI's own
validate_prompt and PromptExecutor, with a server stand-in that records the events a browser
would receive (progress, executing, execution_cached, ...).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.golden import REPO_ROOT
PACK_NAME = "step1x-edit"
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "loras")


def find_comfyui() -> Path | None:
    for candidate in (os.environ.get("COMFYUI_PATH"), os.path.expanduser("~/comfy/ComfyUI")):
        if candidate and (Path(candidate) / "main.py").is_file() and (Path(candidate) / "comfy").is_dir():
            return Path(candidate)
    return None


def executor_cache_settings(executor_class) -> dict:
    """The cache settings main.py passes to PromptExecutor, in the form this ComfyUI takes (the classic
    cache, as `python main.py` without cache options). Up to 0.3.64 it takes `cache_size`; later ones
    take `cache_args` ({"lru": ..., "ram": ...}) and read `cache_args["ram"]` after every node, so
    leaving it out fails the first graph."""
    from comfy.cli_args import args

    parameters = inspect.signature(executor_class).parameters
    if "cache_args" in parameters:
        return {"cache_args": {"lru": getattr(args, "cache_lru", 0), "ram": getattr(args, "cache_ram", 0)}}
    if "cache_size" in parameters:
        return {"cache_size": getattr(args, "cache_lru", 0)}
    return {}


def comfyui_version(root: Path) -> str:
    """The version a ComfyUI tree says it is (comfyui_version.py, written by its release process)."""
    try:
        text = (root / "comfyui_version.py").read_text()
    except OSError:
        return "(unknown version)"
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    return match.group(1) if match else "(unknown version)"


class ServerStub:
    """What PromptExecutor and the progress hook need from ComfyUI's PromptServer."""

    def __init__(self):
        self.client_id = "tests"
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.events: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.events.append(("progress_text", {"text": text, "node": node_id}))


@dataclass
class RunResult:
    success: bool
    events: list[tuple[str, Any]]
    messages: list
    outputs: dict = field(default_factory=dict)

    def executed_nodes(self) -> set[str]:
        return {data["node"] for event, data in self.events if event == "executing" and data.get("node")}

    def cached_nodes(self) -> set[str]:
        return {node for event, data in self.events if event == "execution_cached" for node in data["nodes"]}

    def progress(self, node_id: str) -> list[int]:
        return [data["value"] for event, data in self.events if event == "progress" and data["node"] == node_id]

    def error(self) -> str:
        return "\n".join(str(data) for event, data in self.messages if event in ("execution_error", "execution_interrupted"))


class ComfyUI:
    def __init__(self, root: Path, workdir: Path):
        self.root = root
        self.workdir = workdir
        self.models = workdir / "models"
        self.server = ServerStub()
        self.step_hook: Callable[[int, int], None] | None = None
        self._boot()

    def _boot(self) -> None:
        # ComfyUI's own top-level modules (nodes, utils, server) must win over this repo's `nodes/`.
        sys.path.insert(0, str(self.root))
        if "nodes" in sys.modules and not hasattr(sys.modules["nodes"], "NODE_CLASS_MAPPINGS"):
            del sys.modules["nodes"]
        from comfy.cli_args import args
        args.cpu = True  # the CPU torch wheel: ComfyUI asserts on CUDA otherwise
        import utils.extra_config  # noqa: F401  (before `nodes`, else `utils` is comfy/utils.py)
        import comfy.utils
        import folder_paths
        import nodes
        import server

        for name in ("output", "input", "temp"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(self.workdir / "output"))
        folder_paths.set_input_directory(str(self.workdir / "input"))
        folder_paths.set_temp_directory(str(self.workdir / "temp"))
        for folder in MODEL_FOLDERS:
            (self.models / folder).mkdir(parents=True, exist_ok=True)
            extensions = folder_paths.folder_names_and_paths.get(folder, ([], folder_paths.supported_pt_extensions))[1]
            folder_paths.folder_names_and_paths[folder] = ([str(self.models / folder)], extensions)
        custom_nodes = self.workdir / "custom_nodes"
        custom_nodes.mkdir(exist_ok=True)
        (custom_nodes / PACK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
        folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes)], set())

        server.PromptServer.instance = self.server
        comfy.utils.set_progress_bar_global_hook(self._progress_hook)
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.nodes = nodes
        import execution
        self.execution = execution
        self.executor = execution.PromptExecutor(self.server, **executor_cache_settings(execution.PromptExecutor))

    def _progress_hook(self, value, total, preview_image, prompt_id=None, node_id=None):
        import comfy.model_management
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        node_id = node_id or (context.node_id if context else self.server.last_node_id)
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.server.send_sync("progress", {"value": value, "max": total, "node": node_id,
                                           "preview": preview_image is not None})
        if self.step_hook is not None:
            self.step_hook(value, total)

    def node_class(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def invalidate_file_lists(self) -> None:
        """New files in models/: ComfyUI caches folder listings."""
        import folder_paths
        folder_paths.filename_list_cache.clear()

    def run(self, prompt: dict) -> RunResult:
        import comfy.model_management

        self.invalidate_file_lists()
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise AssertionError(f"prompt refused by ComfyUI: {valid[1]} {valid[3]}")
        self.server.events = []
        self.server.last_prompt_id = prompt_id
        comfy.model_management.interrupt_current_processing(False)
        self.executor.execute(prompt, prompt_id, {"client_id": self.server.client_id}, valid[2])
        return RunResult(self.executor.success, list(self.server.events), list(self.executor.status_messages),
                         dict(self.executor.history_result.get("outputs", {})))
