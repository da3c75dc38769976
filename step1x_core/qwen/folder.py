"""Qwen2.5-VL-7B-Instruct from a Hugging Face folder: checked first, so a wrong or broken folder gets a
message saying what was found and how to fix it, then loaded with transformers.

Both layouts load: the Hub's 4.49-era folder (chat_template.json, sharded weights) and a transformers-5
``save_pretrained`` folder (chat_template.jinja).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..finite import all_finite, describe_non_finite
from ..formats.expected import check_tensors
from ..formats.safetensors_file import ModelFileError, unreadable_files
from .expected import header_tensors, qwen_expected
from .names import hub_name
from .prompt import chat_messages, templated_prompt
from .single_file import build_skeleton, drop_lm_head
from .transformers_versions import dtype_kwarg
from .vision_input import load_image_processor

__all__ = ["QwenFolderError", "load_qwen_folder", "validate_qwen_folder"]

logger = logging.getLogger(__name__)

_KNOWN_MODEL_TYPES = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2": "Qwen2 / Qwen2.5 text-only LLM",
    "qwen3_vl": "Qwen3-VL",
    "qwen2_5_omni": "Qwen2.5-Omni",
    "qwen2_audio": "Qwen2-Audio",
}
_REQUIRED_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct (model_type 'qwen2_5_vl')"
_DOWNLOAD_HINT = (
    "download it with `huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir <folder>` "
    "and pass that folder"
)


class QwenFolderError(ModelFileError):
    """The folder given for Qwen2.5-VL cannot be used; the message says what was found and how to fix it."""


def _list_folder(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return shown or "nothing (empty folder)"


def _require_folder(folder: Path) -> None:
    if not folder.exists():
        raise QwenFolderError(
            f"Qwen2.5-VL folder '{folder}' does not exist. Expected the Hugging Face folder of "
            f"{_REQUIRED_MODEL}; {_DOWNLOAD_HINT}."
        )
    if not folder.is_dir():
        raise QwenFolderError(
            f"'{folder}' is not a folder. Expected the Hugging Face folder of {_REQUIRED_MODEL} (config.json, "
            f"tokenizer files, *.safetensors), or a single .safetensors file in ComfyUI's layout. Fix: {_DOWNLOAD_HINT}."
        )


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise QwenFolderError(
            f"'{folder}' has no config.json (found: {_list_folder(folder)}). Expected the Hugging Face folder "
            f"of {_REQUIRED_MODEL}. Fix: pass the folder that directly contains config.json, or {_DOWNLOAD_HINT}."
        )
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise QwenFolderError(
            f"'{config_path}' is not valid JSON ({error}). Expected the config.json of {_REQUIRED_MODEL}; "
            f"re-download it: {_DOWNLOAD_HINT}."
        ) from error


def _require_model_type(folder: Path, config: dict) -> None:
    model_type = config.get("model_type")
    if model_type == "qwen2_5_vl":
        return
    described = _KNOWN_MODEL_TYPES.get(model_type, "an unsupported model")
    raise QwenFolderError(
        f"'{folder}/config.json': found {model_type} ({described}); Step1X-Edit needs Qwen2.5-VL-7B-Instruct "
        f"(model_type 'qwen2_5_vl'). Fix: {_DOWNLOAD_HINT}."
    )


def _missing_tokenizer_files(folder: Path) -> list[str]:
    missing = [] if (folder / "tokenizer_config.json").is_file() else ["tokenizer_config.json"]
    if not (folder / "tokenizer.json").is_file():
        bpe_files = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
        if bpe_files:
            missing.append(f"tokenizer.json (or vocab.json + merges.txt; missing {' + '.join(bpe_files)})")
    return missing


def _require_tokenizer_files(folder: Path) -> None:
    missing = _missing_tokenizer_files(folder)
    if missing:
        raise QwenFolderError(
            f"'{folder}' lacks tokenizer file(s): {', '.join(missing)} (found: {_list_folder(folder)}). "
            f"Expected the tokenizer files of {_REQUIRED_MODEL}. Fix: copy them from the Hugging Face repo "
            f"into that folder, or {_DOWNLOAD_HINT}."
        )


def _missing_shards(folder: Path, index_path: Path) -> list[str]:
    weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})
    return sorted({name for name in weight_map.values() if not (folder / name).is_file()})


def _require_weights(folder: Path) -> None:
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        missing = _missing_shards(folder, index_path)
        if missing:
            raise QwenFolderError(
                f"'{folder}' has {index_path.name} but lacks the weight shard(s) {', '.join(missing)}. "
                f"Expected every shard of {_REQUIRED_MODEL}. Fix: finish or redo the download."
            )
        return
    if (folder / "model.safetensors").is_file():
        return
    pickles = [name for name in ("pytorch_model.bin.index.json", "pytorch_model.bin") if (folder / name).is_file()]
    if pickles:
        raise QwenFolderError(
            f"'{folder}' holds only pickled PyTorch weights ({pickles[0]}), which can run code when loaded; only "
            f"safetensors weights are loaded. Expected model.safetensors or model-0000x-of-0000y.safetensors with "
            f"model.safetensors.index.json of {_REQUIRED_MODEL}. Fix: {_DOWNLOAD_HINT}."
        )
    raise QwenFolderError(
        f"'{folder}' has no model weights (found: {_list_folder(folder)}). Expected model.safetensors or "
        f"sharded model-0000x-of-0000y.safetensors with model.safetensors.index.json of {_REQUIRED_MODEL}. "
        f"Fix: {_DOWNLOAD_HINT}."
    )


def validate_qwen_folder(path: str | Path) -> Path:
    """Check that ``path`` is a usable Qwen2.5-VL folder (either the Hugging Face 4.49-era layout or a
    transformers-5 ``save_pretrained`` layout); raise ``QwenFolderError`` saying what is wrong."""
    folder = Path(path).expanduser()
    _require_folder(folder)
    _require_model_type(folder, _read_config(folder))
    _require_tokenizer_files(folder)
    _require_weights(folder)
    return folder


def load_qwen_folder(path: str | Path, dtype: torch.dtype, attn_implementation: str | None = None,
                     keep_lm_head: bool = False) -> tuple[torch.nn.Module, Any, Any]:
    """(model, tokenizer, image processor) from a checked Qwen2.5-VL folder; the model on the CPU.

    ``keep_lm_head``: keep the LM head (needed to generate text; the encoder alone never uses it).
    """
    from transformers import AutoTokenizer

    folder = validate_qwen_folder(path)
    check_config_against_weights(folder)  # before building: a config that disagrees would drop or misread weights
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    _warn_if_chat_template_differs(folder, tokenizer)
    model = _load_model(folder, dtype, attn_implementation, keep_lm_head).eval().requires_grad_(False)
    _require_finite_weights(folder, model)
    return model, tokenizer, load_image_processor(folder)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the folder's weights (every shard the index names, or model.safetensors)."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / "model.safetensors"]


def check_config_against_weights(folder: Path) -> None:
    """Hold the shards' headers against the model config.json builds (on meta): names, shapes, dtypes, the
    config's layer counts and widths. Reads no weight."""
    from transformers import Qwen2_5_VLConfig

    try:
        shapes, dtypes = header_tensors(weight_files(folder), QwenFolderError)
    except QwenFolderError as error:
        raise QwenFolderError(f"'{folder}': {error}. Expected the complete safetensors checkpoint of "
                              f"{_REQUIRED_MODEL}. Fix: {_DOWNLOAD_HINT}.") from error
    try:
        config = Qwen2_5_VLConfig.from_pretrained(str(folder))
        skeleton = build_skeleton(config, torch.bfloat16)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise QwenFolderError(f"'{folder}/config.json' does not describe a Qwen2.5-VL that can be built ({error}). "
                              f"Fix: {_DOWNLOAD_HINT}.") from error
    fix = f"Fix: config.json and the weights must come from the same download of {_REQUIRED_MODEL}; {_DOWNLOAD_HINT}"
    check_tensors(folder.name, qwen_expected(skeleton, config, "config.json", fix), shapes, dtypes, QwenFolderError)


def _require_finite_weights(folder: Path, model: torch.nn.Module) -> None:
    """NaN/Inf in the loaded weights (transformers assigns them; one min/max pass per tensor, at memory speed)."""
    for name, tensor in model.named_parameters():
        if not all_finite(tensor):
            raise QwenFolderError(f"{folder.name}: tensor {hub_name(name)} holds {describe_non_finite(tensor)}; the "
                                  f"weights are corrupt (a damaged download or a broken conversion). {_DOWNLOAD_HINT}")


def _load_model(folder: Path, dtype: torch.dtype, attn_implementation: str | None, keep_lm_head: bool = False
                ) -> torch.nn.Module:
    from transformers import Qwen2_5_VLForConditionalGeneration

    # use_safetensors: never fall back to a pickled pytorch_model.bin lying next to the safetensors files.
    kwargs: dict[str, Any] = dict(dtype_kwarg(dtype), output_loading_info=True, use_safetensors=True)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, loading_info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), **kwargs)
    except (SafetensorError, OSError) as error:
        raise QwenFolderError(
            f"'{folder}': the weights cannot be read ({error}). {' '.join(unreadable_files(folder))} Expected the "
            f"complete safetensors checkpoint of {_REQUIRED_MODEL}. Fix: {_DOWNLOAD_HINT}."
        ) from error
    # The encoder never uses the LM head; anything else missing would silently stay random.
    missing = [key for key in loading_info.get("missing_keys", [])
               if keep_lm_head or not key.endswith("lm_head.weight")]
    if missing:
        raise QwenFolderError(
            f"'{folder}' weights lack {len(missing)} Qwen2.5-VL tensor(s), e.g. {', '.join(sorted(missing)[:5])}. "
            f"Expected the complete checkpoint of {_REQUIRED_MODEL}. Fix: {_DOWNLOAD_HINT}."
        )
    return model if keep_lm_head else drop_lm_head(model)


def _folder_chat_template(folder: Path) -> str | None:
    # transformers 5 saves chat_template.jinja; the 4.49-era Hub folder has chat_template.json.
    jinja_path, json_path = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    if json_path.is_file():
        return json.loads(json_path.read_text(encoding="utf-8")).get("chat_template")
    return None


def _warn_if_chat_template_differs(folder: Path, tokenizer: Any) -> None:
    """Step1X-Edit always uses the Qwen2.5-VL chat layout it was trained with; say so if the folder's
    template would render something else."""
    template = _folder_chat_template(folder)
    if template is None:
        return
    probe = "probe instruction"
    rendered = tokenizer.apply_chat_template(
        chat_messages(probe), chat_template=template, tokenize=False, add_generation_prompt=True, add_vision_id=True
    )
    if rendered != templated_prompt(probe, vision_id=True):
        logger.warning(
            "the chat template in '%s' differs from Qwen2.5-VL's; using the layout Step1X-Edit was trained with",
            folder,
        )
