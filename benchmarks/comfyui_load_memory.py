"""Peak memory (RSS) of loading a Step1X-Edit DiT in real ComfyUI: this pack's loader, an older checkout's,
and ComfyUI's own Load Diffusion Model (UNETLoader).

    python benchmarks/comfyui_load_memory.py --comfyui PATH [PATH ...] [--old-pack PATH] [--size-gb 2.5]
                                             [--workdir DIR] [--weight-dtype default|bf16] [--repeat N]
                                             [--no-native] [--json OUT]

--comfyui   one or more ComfyUI checkouts (default: $COMFYUI_PATH); each is measured in turn.
--pack      the pack checkout to measure (default: the repository holding this script).
--old-pack  a second checkout of the pack (e.g. an older commit in a git worktree); its loader is measured too
            and the table gives the ratio pack/old pack per ComfyUI version.
--size-gb   the DiT file's size: a Step1X-Edit DiT with the real widths (hidden 3072, 24 heads, the
            connector's 3584 -> 4096) and as many blocks as bring it closest to this size (at least 2 GB).
--workdir   where the file is written once and reused (default: $STEP1X_BENCH_DIR or a folder in the temp dir).
--weight-dtype  the pack loaders' weight_dtype. default is ComfyUI's choice: float32 on the CPU, where it
            never picks bf16, so every path converts the bf16 file; bf16 keeps the file's dtype, as a GPU's
            default does. ComfyUI's UNETLoader has no bf16 choice and always runs with default.
--repeat    measure every path N times (round after round) and report the medians.

The file is streamed to disk one tensor at a time (bf16, small random values, the original release layout),
so writing it costs little memory. Every measurement runs in a fresh Python process: it boots ComfyUI on the
CPU with the pack as its only custom node, measures its RSS (the baseline), resets the kernel's peak-RSS mark
(/proc/self/clear_refs), calls the loader node's function once and keeps the model it returns, then reads the
peak from resource.getrusage (ru_maxrss) and the RSS left after the load. Every figure is a difference to the
baseline. Memory-mapped file pages count in RSS, as in any process that reads the file through safetensors
(they are page cache the kernel may drop under pressure); the "anon" columns leave them out: the peak
sampled every few milliseconds, and what is left after the load. The page cache is warmed by reading
the file once before the first measurement. Run nothing else memory-hungry at the same time.

Linux only (/proc). ComfyUI needs its requirements installed in the running Python.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
REPO_ROOT = SCRIPT.parents[1]
GB = 1e9
PACK_FOLDER = "step1x-edit"  # the custom_nodes folder name the pack gets in the measuring process
RESULT_MARK = "@@load-memory-result@@ "
SAMPLE_INTERVAL_S = 0.005


# ---------------------------------------------------------------------------------------------- the DiT file

def bench_params(size_gb: float):
    """DiTParams with the released model's widths and the block counts (at least one of each kind) that come
    closest to size_gb."""
    sys.path.insert(0, str(REPO_ROOT))
    from step1x_core.dit.params import ConnectorParams, DiTParams

    def params(depth: int, single: int) -> DiTParams:
        return DiTParams(hidden_size=3072, num_heads=24, depth=depth, depth_single_blocks=single, version="v1.1",
                         connector=ConnectorParams(in_channels=3584, hidden_size=4096, num_heads=32, depth=2))

    # Blocks add a fixed size each: three model skeletons give the sizes, then the counts are arithmetic.
    base = file_bytes(params(1, 0))
    double = file_bytes(params(2, 0)) - base
    single = file_bytes(params(1, 1)) - base
    target = max(size_gb, 2.0) * GB
    counts = [(depth, n_single) for depth in range(1, 20) for n_single in range(1, 40)
              if base + (depth - 1) * double + n_single * single >= 2 * GB]
    depth, n_single = min(counts, key=lambda c: (abs(base + (c[0] - 1) * double + c[1] * single - target), c[0]))
    return params(depth, n_single)


def tensor_shapes(params) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model's state dict, built on the meta device (nothing allocated)."""
    import torch
    from step1x_core.dit.model import Step1XEditDiT

    with torch.device("meta"):
        model = Step1XEditDiT(params)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


_SIZES: dict = {}


def file_bytes(params) -> int:
    if params not in _SIZES:
        _SIZES[params] = sum(2 * _numel(shape) for shape in tensor_shapes(params).values())
    return _SIZES[params]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_dit_file(path: Path, params, seed: int = 0) -> Path:
    """A Step1X-Edit DiT in the release layout (bf16), streamed tensor by tensor: safetensors' save_file would
    want every tensor in memory at once. Norm scales are ones, everything else N(0, 0.02)."""
    import torch
    from step1x_core.testing.tiny_dit import INITIAL_SCALE_FACTOR

    shapes = tensor_shapes(params)
    header: dict = {"__metadata__": {"format": "pt", "step1x_version": str(params.version)}}
    offset = 0
    for name in sorted(shapes):
        size = 2 * _numel(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-aligned
    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name in sorted(shapes):
            shape = shapes[name]
            if name.endswith(".scale"):
                tensor = torch.ones(shape)
            elif name == "connector.scale_factor":
                tensor = torch.full(shape, INITIAL_SCALE_FACTOR)
            else:
                tensor = torch.randn(shape, generator=generator).mul_(0.02)
            f.write(tensor.to(torch.bfloat16).reshape(-1).view(torch.uint8).numpy().tobytes())
            del tensor
    partial.rename(path)  # a file under the final name is complete
    return path


def dit_file(workdir: Path, size_gb: float) -> Path:
    params = bench_params(size_gb)
    name = f"step1x-edit-bench-d{params.depth}-s{params.depth_single_blocks}.safetensors"
    path = workdir / "models" / "diffusion_models" / name
    if not path.is_file():
        print(f"writing {path.name} ({file_bytes(params) / GB:.2f} GB: {params.depth} double and "
              f"{params.depth_single_blocks} single blocks, hidden {params.hidden_size}) ...", flush=True)
        write_dit_file(path, params)
    return path


def warm_page_cache(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(64 << 20):
            pass


# ------------------------------------------------------------------------------------ the measuring process

def _status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of this process in bytes."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                found[key] = int(value.split()[0]) * 1024
    return found


def _boot_comfyui(comfyui: Path, pack: Path, models: Path, scratch: Path):
    spec_path = REPO_ROOT / "tests" / "cpu_torchvision.py"
    if spec_path.is_file():  # a CUDA-built torchvision beside CPU torch imports only with this
        import importlib.util
        spec = importlib.util.spec_from_file_location("_bench_cpu_torchvision", spec_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.apply()
    sys.path.insert(0, str(comfyui))
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config  # noqa: F401  (before `nodes`, else `utils` is comfy/utils.py)
    import folder_paths
    import nodes
    import server

    for name in ("output", "input", "temp"):
        (scratch / name).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(scratch / "output"))
    folder_paths.set_input_directory(str(scratch / "input"))
    folder_paths.set_temp_directory(str(scratch / "temp"))
    extensions = folder_paths.folder_names_and_paths.get("diffusion_models", ([], folder_paths.supported_pt_extensions))[1]
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(models / "diffusion_models")], extensions)
    custom_nodes = scratch / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / PACK_FOLDER).symlink_to(pack, target_is_directory=True)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes)], set())

    class ServerStub:
        client_id = None
        last_node_id = None
        last_prompt_id = None
        sockets_metadata: dict = {}

        def send_sync(self, *args, **kwargs):
            pass

        def send_progress_text(self, *args, **kwargs):
            pass

    server.PromptServer.instance = ServerStub()
    import asyncio
    init = nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False)
    if asyncio.iscoroutine(init):
        asyncio.run(init)
    if "Step1XEditDiTLoader" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError(f"the pack at {pack} did not load into ComfyUI (see the log above)")
    return nodes


def measure(comfyui: Path, pack: Path, models: Path, dit_name: str, loader: str, weight_dtype: str) -> dict:
    """Runs in the fresh process: boot, baseline, load once, peak."""
    import gc
    import resource
    import threading

    with tempfile.TemporaryDirectory(prefix="step1x-load-memory-") as scratch:
        nodes = _boot_comfyui(comfyui, pack, models, Path(scratch))
        import comfyui_version
        gc.collect()
        baseline = _status()
        peak_anon = [baseline["RssAnon"]]
        done = threading.Event()

        def sample():
            while not done.wait(SAMPLE_INTERVAL_S):
                peak_anon[0] = max(peak_anon[0], _status()["RssAnon"])

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS mark (VmHWM, ru_maxrss) to the current RSS
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        if loader == "native":
            result = nodes.UNETLoader().load_unet(dit_name, weight_dtype)
            patcher = result[0]
        else:
            result = nodes.NODE_CLASS_MAPPINGS["Step1XEditDiTLoader"].execute(dit_name, weight_dtype, "auto")
            patcher = result.result[0] if hasattr(result, "result") else result[0]
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        after = _status()
        peak_anon[0] = max(peak_anon[0], after["RssAnon"])
        model_dtype = str(patcher.model.get_dtype()).replace("torch.", "")
        parameters = sum(p.numel() for p in patcher.model.parameters())
        outcome = dict(
            comfyui_version=comfyui_version.__version__, loader=loader, weight_dtype=weight_dtype,
            model_class=type(patcher.model).__name__,
            model_dtype=model_dtype, parameters=parameters, seconds=seconds, baseline_rss=baseline["VmRSS"],
            peak_delta=peak - baseline["VmRSS"], after_delta=after["VmRSS"] - baseline["VmRSS"],
            peak_anon_delta=peak_anon[0] - baseline["RssAnon"], after_anon_delta=after["RssAnon"] - baseline["RssAnon"],
            after_file_delta=after["RssFile"] - baseline["RssFile"],
        )
        del result, patcher  # kept alive until every figure was read
        return outcome


def run_child(comfyui: Path, pack: Path, models: Path, dit: Path, loader: str, weight_dtype: str) -> dict:
    command = [sys.executable, str(SCRIPT), "--child", json.dumps(dict(
        comfyui=str(comfyui), pack=str(pack), models=str(models), dit_name=dit.name, loader=loader,
        weight_dtype=weight_dtype))]
    # Run outside any checkout so neither the pack's `nodes/` nor anything else shadows ComfyUI's modules.
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir())
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    return {"error": f"exit status {proc.returncode}:\n{tail}"}


# -------------------------------------------------------------------------------------------------- report

def median_run(runs: list[dict]) -> dict:
    """Each figure's median over the repeats (the memory figures barely move; the times do)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return dict(runs[-1])
    row = dict(good[0], repeats=len(good), runs=good)
    for key, value in good[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = statistics.median(r[key] for r in good)
    return row


def pack_label(pack: Path) -> str:
    commit = subprocess.run(["git", "-C", str(pack), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return commit.stdout.strip() if commit.returncode == 0 else pack.name


COLUMNS = ("path", "ComfyUI", "weights", "peak RSS (GB)", "RSS after load (GB)", "peak anon (GB)",
           "anon after load (GB)", "file (GB)", "time (s)")


def table(rows: list[dict], file_gb: float) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        if "error" in row:
            cells = [row["path"], row["comfyui"], "failed", "", "", "", "", f"{file_gb:.2f}", ""]
        else:
            cells = [row["path"], row["comfyui_version"], row["model_dtype"], f"{row['peak_delta'] / GB:.2f}",
                     f"{row['after_delta'] / GB:.2f}", f"{row['peak_anon_delta'] / GB:.2f}",
                     f"{row['after_anon_delta'] / GB:.2f}", f"{file_gb:.2f}",
                     f"{row['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    lines = []
    for version in dict.fromkeys(r.get("comfyui_version", r["comfyui"]) for r in rows):
        by_role = {r["role"]: r for r in rows if r.get("comfyui_version", r["comfyui"]) == version and "error" not in r}
        old = by_role.get("old")
        if old is None:
            continue
        for role, label in (("new", "pack"), ("native", "native UNETLoader")):
            if role in by_role:
                new = by_role[role]
                lines.append(f"ComfyUI {version}: {label} / old pack: peak {new['peak_delta'] / old['peak_delta']:.2f}x, "
                             f"after load {new['after_delta'] / old['after_delta']:.2f}x, "
                             f"time {new['seconds'] / old['seconds']:.2f}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, nargs="+",
                        default=[Path(os.environ["COMFYUI_PATH"])] if os.environ.get("COMFYUI_PATH") else None,
                        help="ComfyUI checkout(s) (default: $COMFYUI_PATH)")
    parser.add_argument("--pack", type=Path, default=REPO_ROOT, help="the pack checkout (default: this repository)")
    parser.add_argument("--old-pack", type=Path, help="an older checkout of the pack, measured for comparison")
    parser.add_argument("--size-gb", type=float, default=2.5, help="DiT file size (default 2.5, at least 2)")
    parser.add_argument("--workdir", type=Path,
                        default=Path(os.environ.get("STEP1X_BENCH_DIR", Path(tempfile.gettempdir()) / "step1x-load-memory")),
                        help="where the DiT file is cached (default: $STEP1X_BENCH_DIR or <tmp>/step1x-load-memory)")
    parser.add_argument("--weight-dtype", choices=("default", "bf16"), default="default",
                        help="weight_dtype for the pack's loaders (native UNETLoader always gets 'default')")
    parser.add_argument("--repeat", type=int, default=1, help="measure each path this many times; medians")
    parser.add_argument("--no-native", action="store_true", help="skip ComfyUI's UNETLoader")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        result = measure(Path(spec["comfyui"]), Path(spec["pack"]), Path(spec["models"]), spec["dit_name"],
                         spec["loader"], spec["weight_dtype"])
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0

    if not args.comfyui:
        parser.error("--comfyui is required (or set $COMFYUI_PATH)")
    if not Path("/proc/self/clear_refs").exists():
        parser.error("needs Linux's /proc/self/clear_refs to reset the peak RSS mark")
    args.comfyui = [root.resolve() for root in args.comfyui]  # the measuring processes run elsewhere
    for root in args.comfyui:
        if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
            parser.error(f"{root} is not a ComfyUI checkout (no main.py and comfy/)")
    packs = [(args.pack.resolve(), "new")] + ([(args.old_pack.resolve(), "old")] if args.old_pack else [])
    for pack, _ in packs:
        if not (pack / "__init__.py").is_file() or not (pack / "nodes").is_dir():
            parser.error(f"{pack} is not a checkout of this pack")

    workdir = args.workdir.resolve()
    dit = dit_file(workdir, args.size_gb)
    file_gb = dit.stat().st_size / GB
    warm_page_cache(dit)
    labels = {role: f"{'old pack' if role == 'old' else 'pack'} {pack_label(pack)}" for pack, role in packs}
    plan = []
    for comfyui in args.comfyui:
        for pack, role in packs:
            plan.append((comfyui, pack, role, "pack", args.weight_dtype, f"Step1XEditDiTLoader, {labels[role]}"))
        if not args.no_native:
            plan.append((comfyui, packs[0][0], "native", "native", "default",
                         f"UNETLoader (native), {labels['new']}"))

    print(f"DiT file: {dit.name}, {file_gb:.2f} GB; {len(plan)} measurements x {args.repeat}, one at a time", flush=True)
    runs: dict[int, list[dict]] = {i: [] for i in range(len(plan))}
    for _ in range(args.repeat):  # round after round, so a slow spell on the machine hits every path alike
        for i, (comfyui, pack, role, loader, weight_dtype, path_label) in enumerate(plan):
            print(f"  {path_label} on {comfyui} ...", flush=True)
            run = run_child(comfyui, pack, workdir / "models", dit, loader, weight_dtype)
            if "error" in run:
                print(run["error"], file=sys.stderr)
            runs[i].append(run)
    rows = []
    for i, (comfyui, _, role, _, _, path_label) in enumerate(plan):
        row = median_run(runs[i])
        row.update(path=path_label, role=role, comfyui=str(comfyui))
        rows.append(row)

    print()
    print(f"Peak and after-load RSS over the booted ComfyUI's RSS; GB = 10^9 bytes; weight_dtype {args.weight_dtype}.")
    print(table(rows, file_gb))
    for line in ratios(rows):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(dict(file=dit.name, file_bytes=dit.stat().st_size, rows=rows), indent=2))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
