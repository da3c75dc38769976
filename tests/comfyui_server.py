"""A real ComfyUI server subprocess (`main.py --cpu`) with this pack in custom_nodes/, tiny models
under the release names and the test image as input/example.png. Loopback only, bounded in time.

The pack is either symlinked (fast, sees uncommitted edits) or copied from the files git tracks,
as a user's `git clone` gets them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from step1x_core.testing.factory import make_tiny
from tests.comfyui_harness import MODEL_FOLDERS, REPO_ROOT, find_comfyui
from tests.registry_files import tracked_files

BOOT = REPO_ROOT / "tests" / "comfyui_boot.py"
BOOT_SECONDS = 180


def copy_pack(destination: Path) -> None:
    for name in sorted(tracked_files()):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyUIServer:
    def __init__(self, workdir: Path, pack_folder: str = "step1x-edit", *, copy: bool = False,
                 block_engine: bool = False, record_opens: bool = False, models: bool = True):
        self.workdir = workdir
        self.pack = workdir / "custom_nodes" / pack_folder
        self.log_path = workdir / "server.log"
        self.opens_path = workdir / "opens.txt" if record_opens else None
        self.ran: set[str] = set()  # names of the workflows a test ran here
        self.pack.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            copy_pack(self.pack)
        else:
            self.pack.symlink_to(REPO_ROOT, target_is_directory=True)
        if models:
            make_tiny(workdir / "models")
        (workdir / "input").mkdir(exist_ok=True)
        # The frontend's settings, saved workflows and ComfyUI's database live here: every server starts
        # as a fresh install (first-start dialogs included) and none writes into the checkout's user/.
        (workdir / "user").mkdir(exist_ok=True)
        # The shipped workflows' image, with an area painted in the mask editor (for the masked workflow).
        shutil.copy(REPO_ROOT / "tests" / "data" / "cat_painted.png", workdir / "input" / "example.png")
        config = "step1x_tests:\n    base_path: {}\n{}    custom_nodes: custom_nodes\n".format(
            workdir, "".join(f"    {f}: models/{f}\n" for f in MODEL_FOLDERS))
        (workdir / "extra_model_paths.yaml").write_text(config)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = self._start(block_engine)

    def _start(self, block_engine: bool) -> subprocess.Popen:
        ours = [str(find_comfyui())]
        if block_engine:
            ours.append("--block-engine")
        if self.opens_path is not None:
            ours += ["--record-opens", str(self.opens_path)]
        main_args = ["--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
                     "--extra-model-paths-config", str(self.workdir / "extra_model_paths.yaml"),
                     "--input-directory", str(self.workdir / "input"),
                     "--user-directory", str(self.workdir / "user"),
                     "--database-url", f"sqlite:///{self.workdir / 'user' / 'comfyui.db'}",
                     "--output-directory", str(self.workdir / "output")]
        # The server's environment as a user's: no pytest additions to the import path.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "w") as log:
            return subprocess.Popen([sys.executable, str(BOOT), *ours, "--", *main_args], cwd=self.workdir,
                                    stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_up(self) -> None:
        """Until the server answers (/system_stats): ComfyUI listens only after every custom node has loaded."""
        deadline = time.monotonic() + BOOT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not start in {BOOT_SECONDS} s:\n{self.log()[-4000:]}")

    def get(self, path: str):
        return json.loads(urllib.request.urlopen(self.url + path, timeout=30).read())

    def run_prompt(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue an API-format graph and wait for its history entry."""
        request = urllib.request.Request(self.url + "/prompt", json.dumps({"prompt": prompt}).encode(),
                                         {"Content-Type": "application/json"})
        try:
            prompt_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["prompt_id"]
        except urllib.error.HTTPError as error:
            raise AssertionError(f"ComfyUI refused the prompt: {error.read().decode()[:3000]}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:  # ComfyUI writes the entry when the prompt has ended
                return history[prompt_id]
            time.sleep(0.5)
        raise AssertionError(f"the prompt did not finish in {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
