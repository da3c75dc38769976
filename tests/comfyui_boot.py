"""Start ComfyUI's main.py in this process, as a test server (run as a script, never imported).

    python tests/comfyui_boot.py COMFYUI_ROOT [--block-engine] [--record-opens FILE] -- MAIN_ARGS...

--block-engine makes `import step1x_core` fail, as it does for a user who installed the pack with
`pip install -r requirements.txt` only: the engine is then reachable only as `<pack>.step1x_core`.
--record-opens appends every path this process opens to FILE, one per line (an audit hook), so a
test can check that everything the pack reads at run time is shipped.
"""

from __future__ import annotations

import argparse
import importlib.abc
import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINE = "step1x_core"
BLOCKED = "comfyui_boot: `import step1x_core` fails here, as in a user's ComfyUI"


class BlockEngine(importlib.abc.MetaPathFinder):
    """Refuses the top-level engine package before any other finder (an editable install included)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == ENGINE or fullname.startswith(ENGINE + "."):
            raise ModuleNotFoundError(f"No module named '{fullname}' (blocked: the pack is not pip-installed)",
                                      name=fullname)
        return None


def record_opens(log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # os.write raises no "open" event
    seen: set[str] = set()

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if path not in seen:
                seen.add(path)
                os.write(fd, (os.path.abspath(path) + "\n").encode("utf-8", "surrogateescape"))

    sys.addaudithook(hook)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--block-engine", action="store_true")
    parser.add_argument("--record-opens")
    ours, main_args = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
    options = parser.parse_args(ours)

    sys.path.insert(0, str(HERE))
    import cpu_torchvision  # CUDA-built torchvision next to CPU torch (see the module)
    cpu_torchvision.apply()
    sys.path.remove(str(HERE))

    root = options.root.resolve()
    repo = HERE.parent
    # As for `python main.py`: ComfyUI's folder first, and nothing of this repo on the path.
    sys.path[:] = [str(root)] + [p for p in sys.path if p and Path(p).resolve() not in (HERE, repo)]
    if options.block_engine:
        sys.meta_path.insert(0, BlockEngine())
        try:
            import step1x_core  # noqa: F401
        except ModuleNotFoundError:
            print(BLOCKED, flush=True)
        else:
            sys.exit("comfyui_boot: step1x_core is still importable")
    if options.record_opens:
        record_opens(options.record_opens)
    os.chdir(root)
    sys.argv = ["main.py", *main_args]
    runpy.run_path(str(root / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main()
