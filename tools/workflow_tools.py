"""The shipped workflows: their graphs, and conversion between ComfyUI's UI and API formats.

The graphs are written once here (API form plus a layout) and saved as `workflows/<name>.json`
(UI format, drag and drop) and `workflows/api/<name>.json` (API format, for /prompt):

    python -m tools.workflow_tools     # from the repo root; needs a ComfyUI checkout (for the node definitions)

It is a development tool, not part of the pack: ComfyUI never imports it, and it boots ComfyUI with the
test suite's harness (tests/comfyui_harness.py) to read the node definitions.

`ui_to_api` is an independent reading of a UI file (links and widget values mapped through the
node definitions ComfyUI serves at /object_info); the tests check it reproduces each API file.
"""

from __future__ import annotations

import json
from pathlib import Path

from step1x_core.release_files import DIT_RELEASE, RELEASE_FILES
from step1x_core.versions import Version

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# The release names, from the engine's release table.
DIT_V11, DIT_V10 = DIT_RELEASE[Version.V1_1], DIT_RELEASE[Version.V1_0]
DIT_V12 = DIT_RELEASE[Version.V1_2]  # the v1.2 release's folders, as step1x-edit-download places them
# The Hugging Face folder, ComfyUI's bf16 and fp8-scaled single files (Qwen-Image's encoder), v1.2's own.
QWEN, _, QWEN_FP8_FILE, QWEN_V12 = (f.name for f in RELEASE_FILES if f.role == "text_encoder")
VAE = next(f.name for f in RELEASE_FILES if f.role == "vae")
(LORA,) = (f.name for f in RELEASE_FILES if f.role == "lora")
IMAGE = "example.png"


# --- node definitions ------------------------------------------------------------------------------
def widget_inputs(info: dict) -> list[tuple[str, dict]]:
    """(name, options) of a node's widget inputs in the order the frontend lays out widgets_values."""
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_widget = isinstance(kind, list) or kind in WIDGET_TYPES
            if is_widget and not options.get("forceInput"):
                out.append((name, options))
    return out


def widget_values(info: dict, inputs: dict) -> list:
    """widgets_values for an API node's inputs (a linked widget keeps its default as its value)."""
    values = []
    for name, options in widget_inputs(info):
        value = inputs.get(name)
        if isinstance(value, list):  # linked
            value = options.get("default", 0)
        values.append(value)
        if options.get("control_after_generate"):
            values.append("fixed")
        if options.get("image_upload"):
            values.append("image")
    return values


def ui_to_api(ui: dict, infos: dict[str, dict]) -> dict:
    """Read a UI-format workflow as the frontend's graphToPrompt would: {id: {class_type, inputs}}."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        info = infos[node["type"]]
        inputs = {}
        values = iter(node.get("widgets_values", []))
        for name, options in widget_inputs(info):
            inputs[name] = next(values)
            if options.get("control_after_generate") or options.get("image_upload"):
                next(values)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def api_to_ui(api: dict, infos: dict[str, dict], positions: dict[str, tuple[int, int]],
              titles: dict[str, str] | None = None) -> dict:
    """Lay out an API graph as a UI-format workflow (LiteGraph JSON, version 0.4)."""
    titles = titles or {}
    links, nodes = [], []
    outgoing: dict[tuple[str, int], list[int]] = {}
    for node_id, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(node_id), name, None])
                outgoing.setdefault((value[0], value[1]), []).append(len(links))
    link_by_target = {(str(link[3]), link[4]): link for link in links}
    for order, (node_id, node) in enumerate(api.items()):
        info = infos[node["class_type"]]
        widget_names = {name for name, _ in widget_inputs(info)}
        inputs = []
        all_inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, spec in all_inputs.items():
            link = link_by_target.get((node_id, name))
            if name in widget_names and link is None:
                continue
            entry = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO",
                     "link": link[0] if link else None}
            if name in widget_names:
                entry["widget"] = {"name": name}
            if link:
                link[4] = len(inputs)
                link[5] = entry["type"]
            inputs.append(entry)
        outputs = [{"name": name, "type": kind, "slot_index": slot, "links": outgoing.get((node_id, slot), [])}
                   for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
        ui_node = {"id": int(node_id), "type": node["class_type"], "pos": list(positions[node_id]),
                   "size": [320, 60 + 26 * (len(inputs) + len(widget_names))], "flags": {}, "order": order,
                   "mode": 0, "inputs": inputs, "outputs": outputs,
                   "properties": {"Node name for S&R": node["class_type"]},
                   "widgets_values": widget_values(info, node["inputs"])}
        if node_id in titles:
            ui_node["title"] = titles[node_id]
        nodes.append(ui_node)
    return {"last_node_id": max(int(k) for k in api), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


# --- the shipped graphs ----------------------------------------------------------------------------
def _edit_chain(first: int, image: list, model: list, qwen: list, vae: list, instruction: str, seed: int,
                prefix: str, mask: list | None = None, v12: bool = False) -> dict:
    """Scale -> encode -> connector -> VAEEncode -> sampler -> decode -> restore -> save, ids from `first`.
    With `mask`, the reference latent gets it as its noise mask and the decoded edit is pasted into the
    original image through it, instead of being resized back. ``v12``: v1.2's prompt format, its Lanczos working
    image and its normalised CFG at every step."""
    n = {name: str(first + i) for i, name in enumerate(
        ["scale", "encode", "connector", "vae_encode", "sampler", "decode", "restore", "save", "noise_mask"])}
    chain = {
        n["scale"]: {"class_type": "Step1XEditImageScale",
                     "inputs": {"image": image, "size_level": "1024", "custom_size": 1024,
                                "resample": "lanczos" if v12 else "bicubic"}},
        n["encode"]: {"class_type": "Step1XEditQwenVLEncode",
                      "inputs": {"qwen_vl": qwen, "image": [n["scale"], 0], "instruction": instruction,
                                 "negative": "", "prompt_format": "v1.2" if v12 else "v1.0 / v1.1"}},
        n["connector"]: {"class_type": "Step1XEditConnector", "inputs": {"model": model, "embeddings": [n["encode"], 0]}},
        n["vae_encode"]: {"class_type": "VAEEncode", "inputs": {"pixels": [n["scale"], 0], "vae": vae}},
        n["sampler"]: {"class_type": "Step1XEditSampler",
                       "inputs": {"model": model, "positive": [n["connector"], 0], "negative": [n["connector"], 1],
                                  "reference_latent": [n["vae_encode"], 0], "seed": seed, "steps": 28, "cfg": 6.0,
                                  "norm_cfg_threshold": 0.0 if v12 else 0.93, "denoise": 1.0}},
        n["decode"]: {"class_type": "VAEDecode", "inputs": {"samples": [n["sampler"], 0], "vae": vae}},
        n["restore"]: {"class_type": "Step1XEditRestoreSize",
                       "inputs": {"image": [n["decode"], 0], "width": [n["scale"], 1], "height": [n["scale"], 2],
                                  "resample": "bicubic"}},
        n["save"]: {"class_type": "SaveImage", "inputs": {"images": [n["restore"], 0], "filename_prefix": prefix}},
    }
    if mask is not None:
        chain[n["noise_mask"]] = {"class_type": "SetLatentNoiseMask",
                                  "inputs": {"samples": [n["vae_encode"], 0], "mask": mask}}
        chain[n["sampler"]]["inputs"]["reference_latent"] = [n["noise_mask"], 0]
        chain[n["restore"]] = {"class_type": "Step1XEditMaskedPaste",
                               "inputs": {"original": image, "edited": [n["decode"], 0], "mask": mask, "feather": 8,
                                          "resample": "bicubic"}}
    return chain


def _loaders(dit: str, weight_dtype: str = "default", qwen: str = QWEN, qwen_device: str = "default") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": IMAGE}},
        "2": {"class_type": "Step1XEditDiTLoader", "inputs": {"dit_name": dit, "weight_dtype": weight_dtype,
                                                              "version": "auto"}},
        "3": {"class_type": "Step1XEditQwenVLLoader", "inputs": {"model_folder": qwen, "dtype": "auto",
                                                                 "device": qwen_device, "keep_lm_head": False}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
    }


def _chain_positions(first: int, row: int) -> dict[str, tuple[int, int]]:
    y = 80 + row * 620
    spots = [(420, y), (800, y), (1180, y), (800, y + 330), (1560, y), (1940, y), (2320, y), (2700, y),
             (1180, y + 330)]
    return {str(first + i): spot for i, spot in enumerate(spots)}


LOADER_POSITIONS = {"1": (20, 80), "2": (20, 460), "3": (20, 640), "4": (20, 820)}
INSTRUCTION = "add a red knitted hat to the cat"


def graphs() -> dict[str, tuple[dict, dict, dict]]:
    """name -> (API graph, node positions, titles)."""
    out = {}
    basic = {**_loaders(DIT_V11), **_edit_chain(10, ["1", 0], ["2", 0], ["3", 0], ["4", 0], INSTRUCTION, 42,
                                                 "step1x_edit")}
    out["step1x_edit_basic"] = (basic, {**LOADER_POSITIONS, **_chain_positions(10, 0)}, {})

    low = {**_loaders(DIT_V11, weight_dtype="fp8_e4m3fn", qwen=QWEN_FP8_FILE),
           **_edit_chain(10, ["1", 0], ["2", 0], ["3", 0], ["4", 0], INSTRUCTION, 42, "step1x_edit_fp8")}
    out["step1x_edit_low_vram"] = (low, {**LOADER_POSITIONS, **_chain_positions(10, 0)},
                                   {"2": "Load Step1X-Edit DiT (fp8 weights)",
                                    "3": "Load Qwen2.5-VL (ComfyUI's fp8 file)"})

    lora = {**_loaders(DIT_V10),
            "5": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["2", 0], "lora_name": LORA,
                                                                  "strength_model": 1.0}},
            **_edit_chain(10, ["1", 0], ["5", 0], ["3", 0], ["4", 0], "fix the hands of the character", 42,
                          "step1x_edit_lora")}
    out["step1x_edit_lora"] = (lora, {**LOADER_POSITIONS, "5": (20, 1000), **_chain_positions(10, 0)}, {})

    chained = {**_loaders(DIT_V11),
               **_edit_chain(10, ["1", 0], ["2", 0], ["3", 0], ["4", 0], INSTRUCTION, 42, "step1x_edit_step1"),
               **_edit_chain(20, ["16", 0], ["2", 0], ["3", 0], ["4", 0], "make it a watercolor painting", 43,
                             "step1x_edit_step2")}
    out["step1x_edit_chained"] = (chained, {**LOADER_POSITIONS, **_chain_positions(10, 0),
                                            **_chain_positions(20, 1)}, {})

    masked = {**_loaders(DIT_V11), **_edit_chain(10, ["1", 0], ["2", 0], ["3", 0], ["4", 0],
                                                 INSTRUCTION, 42, "step1x_edit_masked",
                                                 mask=["1", 1])}
    out["step1x_edit_masked"] = (masked, {**LOADER_POSITIONS, **_chain_positions(10, 0)},
                                 {"1": "Load Image (right-click: Open in MaskEditor, paint the area to edit)"})

    v12 = {**_loaders(DIT_V12, qwen=QWEN_V12), **_edit_chain(10, ["1", 0], ["2", 0], ["3", 0], ["4", 0],
                                                             'replace the text on the sign with "OPEN"', 42,
                                                             "step1x_edit_v12", v12=True)}
    out["step1x_edit_v12"] = (v12, {**LOADER_POSITIONS, **_chain_positions(10, 0)},
                              {"2": "Load Step1X-Edit DiT (v1.2)", "3": "Load Qwen2.5-VL (v1.2's text encoder)"})

    out["step1x_text_to_image"] = _text_to_image()
    out["step1x_edit_v12_reflect"] = _reflect()
    return out


def _reflect() -> tuple[dict, dict, dict]:
    """v1.2 with thinking and reflection: Think rewrites the instruction (shown under it), Reflect edits, judges
    and re-edits for up to three rounds and returns the best (every round's edit goes to the preview)."""
    graph = {**_loaders(DIT_V12, qwen=QWEN_V12),
             "10": {"class_type": "Step1XEditThink",
                    "inputs": {"qwen_vl": ["3", 0], "image": ["1", 0], "instruction": "make it look like winter",
                               "seed": 42}},
             "11": {"class_type": "Step1XEditReflect",
                    "inputs": {"model": ["2", 0], "qwen_vl": ["3", 0], "vae": ["4", 0], "image": ["1", 0],
                               "instruction": ["10", 0], "negative": "", "seed": 42, "steps": 28, "cfg": 6.0,
                               "size_level": 1024, "rounds": 3, "think": False, "norm_cfg_threshold": 0.0,
                               "judge_tries": 20, "max_new_tokens": 128}},
             "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0],
                                                          "filename_prefix": "step1x_edit_v12_reflect"}},
             "13": {"class_type": "PreviewImage", "inputs": {"images": ["11", 1]}}}
    graph["3"]["inputs"]["keep_lm_head"] = True
    positions = {**LOADER_POSITIONS, "10": (420, 640), "11": (800, 80), "12": (1240, 80), "13": (1240, 460)}
    return graph, positions, {"2": "Load Step1X-Edit DiT (v1.2)",
                              "3": "Load Qwen2.5-VL (v1.2's text encoder, keep_lm_head on)",
                              "13": "Preview Image (every round)"}


def _text_to_image() -> tuple[dict, dict, dict]:
    """Text-to-image with the v1.1 DiT on ComfyUI's own sampling nodes: Qwen-VL Encode without an image,
    an empty latent of the size wanted, the official schedule and normalised CFG at every step (the reference)."""
    graph = {
        "2": {"class_type": "Step1XEditDiTLoader", "inputs": {"dit_name": DIT_V11, "weight_dtype": "default",
                                                              "version": "auto"}},
        "3": {"class_type": "Step1XEditQwenVLLoader", "inputs": {"model_folder": QWEN, "dtype": "auto",
                                                                 "device": "default", "keep_lm_head": False}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "10": {"class_type": "Step1XEditQwenVLEncode",
               "inputs": {"qwen_vl": ["3", 0], "instruction": 'a poster of a cat that says "HELLO"', "negative": "",
                          "prompt_format": "v1.0 / v1.1"}},
        "11": {"class_type": "Step1XEditConnector", "inputs": {"model": ["2", 0], "embeddings": ["10", 0]}},
        "12": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "13": {"class_type": "Step1XEditNormalizedCFG", "inputs": {"model": ["2", 0], "threshold": 0.0}},
        "14": {"class_type": "CFGGuider", "inputs": {"model": ["13", 0], "positive": ["11", 0], "negative": ["11", 1],
                                                     "cfg": 6.0}},
        "15": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
        "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "17": {"class_type": "Step1XEditScheduler", "inputs": {"latent": ["12", 0], "steps": 28, "denoise": 1.0}},
        "18": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["15", 0], "guider": ["14", 0],
                                                                 "sampler": ["16", 0], "sigmas": ["17", 0],
                                                                 "latent_image": ["12", 0]}},
        "19": {"class_type": "VAEDecode", "inputs": {"samples": ["18", 0], "vae": ["4", 0]}},
        "20": {"class_type": "SaveImage", "inputs": {"images": ["19", 0], "filename_prefix": "step1x_text_to_image"}},
    }
    positions = {"2": (20, 80), "3": (20, 300), "4": (20, 480), "10": (420, 300), "11": (800, 80), "12": (800, 420),
                 "13": (800, 600), "14": (1180, 80), "15": (1180, 380), "16": (1180, 500), "17": (1180, 620),
                 "18": (1560, 80), "19": (1940, 80), "20": (2320, 80)}
    return graph, positions, {"10": "Step1X-Edit Qwen-VL Encode (no image: text-to-image)"}


def write_workflows(infos: dict[str, dict]) -> list[Path]:
    written = []
    (WORKFLOWS / "api").mkdir(parents=True, exist_ok=True)
    for name, (api, positions, titles) in graphs().items():
        for path, content in ((WORKFLOWS / f"{name}.json", api_to_ui(api, infos, positions, titles)),
                              (WORKFLOWS / "api" / f"{name}.json", api)):
            path.write_text(json.dumps(content, indent=2) + "\n")
            written.append(path)
    return written


def node_infos(comfy_nodes_module) -> dict[str, dict]:
    """/object_info's per-node entries, from the node classes ComfyUI registered."""
    infos = {}
    for name, cls in comfy_nodes_module.NODE_CLASS_MAPPINGS.items():
        if hasattr(cls, "GET_NODE_INFO_V1"):
            infos[name] = cls.GET_NODE_INFO_V1()
        else:
            types = cls.INPUT_TYPES()
            infos[name] = {"input": types, "output": list(cls.RETURN_TYPES),
                           "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))}
    return infos


if __name__ == "__main__":
    import tempfile

    from tests import cpu_torchvision
    from tests.comfyui_harness import ComfyUI, find_comfyui

    cpu_torchvision.apply()
    root = find_comfyui()
    if root is None:
        raise SystemExit("needs a ComfyUI checkout at $COMFYUI_PATH or ~/comfy/ComfyUI")
    comfy = ComfyUI(root, Path(tempfile.mkdtemp()))
    for path in write_workflows(node_infos(comfy.nodes)):
        print(path.relative_to(WORKFLOWS.parent))
