"""Step1X-Edit's text+image encoder: Qwen2.5-VL-7B-Instruct hidden states for (instruction, reference image).

What the official ``Qwen25VL_7b_Embedder`` does, re-implemented on transformers' own pieces:

1. Chat text = system message + user message [PREFIX, image, instruction] + generation prompt.
2. Image: tensor -> PIL (``mul(255).byte()``), ``qwen_vl_utils``' first resize (multiples of 28, bicubic),
   then the Qwen2-VL image processor with min/max pixels 256*28*28 / 324*28*28.
3. Ids: the normal ids (``<|image_pad|>`` expanded) up to the first ``<|vision_end|>``, then the ids of a
   quote-aware re-tokenisation of the chat text from its first ``<|vision_end|>`` on; mask = ids > 0.
4. One forward per sample; last hidden state (after the final norm); drop the first 217 tokens; keep 640.

The official code's output depends on the transformers version it runs on (see ``OfficialBehaviour``).
"""

from __future__ import annotations

import dataclasses

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from PIL import Image
from safetensors import SafetensorError, safe_open

from ..imaging import tensor_to_pil
from ..ops import FP8_DTYPES
from .single_file import ASSETS, PACKAGED_CONFIG, drop_lm_head, PACKAGED_TOKENIZER, dtype_kwarg, load_qwen_file

__all__ = [
    "AS_TRANSFORMERS_4_49",
    "AS_TRANSFORMERS_4_54",
    "AS_TRANSFORMERS_5_3",
    "DROP_TOKENS",
    "EMPTY_INSTRUCTION_WARNING",
    "MAX_LENGTH",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "QWEN_PREFIX",
    "OfficialBehaviour",
    "QwenFolderError",
    "QwenVLEmbedder",
    "chat_messages",
    "prepare_vlm_image",
    "quote_aware_ids",
    "split_quoted",
    "templated_prompt",
    "validate_qwen_folder",
]

logger = logging.getLogger(__name__)

QWEN_PREFIX: str = (ASSETS / "qwen_prefix.txt").read_text(encoding="utf-8")
MAX_LENGTH = 640
EMPTY_INSTRUCTION_WARNING = ("empty instruction: with an empty negative too, guidance has no effect and the result "
                             "stays close to the input image")
DROP_TOKENS = 217
MIN_PIXELS = 256 * 28 * 28
MAX_PIXELS = 324 * 28 * 28

# qwen_vl_utils.process_vision_info's defaults for its own (first) resize of a PIL image.
_VL_UTILS_FACTOR = 28
_VL_UTILS_MIN_PIXELS = 4 * 28 * 28
_VL_UTILS_MAX_PIXELS = 16384 * 28 * 28

_IMAGE_PAD = "<|image_pad|>"
_VISION_END_ID = 151653
_OPEN_QUOTE_ID = 2073  # “
_CLOSE_QUOTE_ID = 854  # ”
# A '"' only toggles the in-quotes state past this character index, which skips the pair of quotes
# inside PREFIX (indices 108 and 124 of the chat text).
_QUOTE_TOGGLE_AFTER = 155

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

_TRANSFORMERS_VERSION = Version(transformers.__version__)


# --------------------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------------------


def templated_prompt(instruction: str, vision_id: bool = True) -> str:
    """The chat text the official embedder builds for ``instruction``: the Qwen2.5-VL chat template with
    ``add_generation_prompt=True`` and content [PREFIX, image, instruction].

    ``vision_id``: whether "Picture 1: " precedes the image. The official code asks for it
    (``add_vision_id=True``), but transformers <= 4.51 drops that argument on the way to the template.
    """
    picture = "Picture 1: " if vision_id else ""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        f"{QWEN_PREFIX}{picture}<|vision_start|>{_IMAGE_PAD}<|vision_end|>{instruction}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def chat_messages(instruction: str) -> list[dict[str, Any]]:
    """The chat messages behind ``templated_prompt``, for rendering with a tokenizer's chat template."""
    content = [{"type": "text", "text": QWEN_PREFIX}, {"type": "image"}, {"type": "text", "text": instruction}]
    return [{"role": "user", "content": content}]


def split_quoted(text: str) -> list[str]:
    """Split ``text`` the way Step1X-Edit re-tokenises quoted text (one piece per quoted character).

    “ ” and ' all count as ". A " past character index 155 opens or closes a quote; the quote characters
    stay in the surrounding text; every character inside quotes becomes its own piece, wrapped as “c”.
    """
    normalised = text.replace("“", '"').replace("”", '"').replace("'", '"')
    pieces: list[str] = []
    outside = ""
    in_quotes = False
    for index, char in enumerate(normalised):
        if char == '"' and index > _QUOTE_TOGGLE_AFTER:
            outside += char
            if not in_quotes:  # an opening quote ends the text before it
                pieces.append(outside)
                outside = ""
            in_quotes = not in_quotes
        elif in_quotes:
            pieces.append(f"“{char}”")
        else:
            outside += char
    if outside:
        pieces.append(outside)
    return pieces


def quote_aware_ids(tokenizer: Any, text: str) -> list[int]:
    """Tokenise each ``split_quoted`` piece on its own; drop the “ ” around a piece when both survive as
    their own tokens (2073 ... 854), so quoted text ends up one token per character."""
    ids: list[int] = []
    for piece in split_quoted(text):
        piece_ids = list(tokenizer(piece)["input_ids"])
        if piece_ids[0] == _OPEN_QUOTE_ID and piece_ids[-1] == _CLOSE_QUOTE_ID:
            piece_ids = piece_ids[1:-1]
        ids.extend(piece_ids)
    return ids


# --------------------------------------------------------------------------------------------------------
# Image
# --------------------------------------------------------------------------------------------------------


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    # transformers >= 5 keeps a torchvision-free copy in the PIL image-processor module; 4.x only has the
    # (PIL-based) slow image-processor module.
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def prepare_vlm_image(image: Image.Image | torch.Tensor) -> Image.Image:
    """The reference image as the official code hands it to the Qwen processor: RGB PIL, resized
    (bicubic) to multiples of 28 like ``qwen_vl_utils.process_vision_info`` does with its defaults."""
    pil = image if isinstance(image, Image.Image) else tensor_to_pil(image)
    pil = pil.convert("RGB")
    height, width = _smart_resize(
        pil.height, pil.width, _VL_UTILS_FACTOR, _VL_UTILS_MIN_PIXELS, _VL_UTILS_MAX_PIXELS
    )
    return pil.resize((width, height), Image.Resampling.BICUBIC)


def _resize_like_torchvision(image: Image.Image, height: int, width: int) -> Image.Image:
    """The resize of transformers' default ("fast") Qwen2-VL image processor, without torchvision.

    That processor resizes the uint8 tensor with torchvision, which on CPU calls torch's antialiased
    bicubic kernel on uint8 directly (and skips same-size resizes); this makes the same call.
    """
    if (image.height, image.width) == (height, width):
        return image
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
    resized = F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return Image.fromarray(resized[0].permute(1, 2, 0).contiguous().numpy(), mode="RGB")


# --------------------------------------------------------------------------------------------------------
# Which official run to reproduce
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfficialBehaviour:
    """The official embedder's numbers depend on the transformers version under it.

    - ``vision_id``: "Picture 1: " before the image. transformers <= 4.51 (the official pin is 4.49) drops
      the ``add_vision_id=True`` the official code passes to the processor's chat template; later
      versions forward it. This shifts what the fixed 217-token cut removes.
    - ``resize``: up to transformers 4.53 (and on any version without torchvision) the PIL image processor
      resizes ("pil"); from 4.54 on, with torchvision installed, the torchvision one is forced ("torch").
      They differ by +-1 on a few pixels.
    - ``positions``: up to transformers 5.2 Qwen2.5-VL's 3-D mRoPE positions are derived from the ids
      ("mrope"); from 5.3 on they need ``mm_token_type_ids``, which the official code does not pass, so
      the model silently falls back to plain sequential positions ("sequential").
    - ``bf16_buffer``: the official code writes the features into a bfloat16 buffer whatever the model
      dtype, so float32 runs come out rounded to bfloat16.
    """

    vision_id: bool
    resize: Literal["pil", "torch"]
    positions: Literal["mrope", "sequential"]
    bf16_buffer: bool = True


# The official requirements.txt pin (transformers 4.49.0); also 4.50-4.51.
AS_TRANSFORMERS_4_49 = OfficialBehaviour(vision_id=False, resize="pil", positions="mrope")
# transformers 4.54 to 5.2 with torchvision installed (which the official code imports anyway).
AS_TRANSFORMERS_4_54 = OfficialBehaviour(vision_id=True, resize="torch", positions="mrope")
# transformers 5.3 and later with torchvision: how the golden vectors in shared/golden were made.
AS_TRANSFORMERS_5_3 = OfficialBehaviour(vision_id=True, resize="torch", positions="sequential")


def behaviour_for_transformers(version: str) -> OfficialBehaviour:
    """What the official embedder does under a given transformers version (with torchvision)."""
    v = Version(version)
    if v < Version("4.52"):
        return AS_TRANSFORMERS_4_49
    if v < Version("4.54"):
        return dataclasses.replace(AS_TRANSFORMERS_4_49, vision_id=True)
    if v < Version("5.3"):
        return AS_TRANSFORMERS_4_54
    return AS_TRANSFORMERS_5_3


# --------------------------------------------------------------------------------------------------------
# Folder validation
# --------------------------------------------------------------------------------------------------------


class QwenFolderError(ValueError):
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


# --------------------------------------------------------------------------------------------------------
# Loading (version differences isolated in one small function each)
# --------------------------------------------------------------------------------------------------------


def _pil_image_processor_class() -> type:
    # transformers 5: the default Qwen2VLImageProcessor needs torchvision; the PIL backend is its own class.
    # transformers 4.x: the "slow" Qwen2VLImageProcessor is the PIL/numpy one.
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    return Qwen2VLImageProcessorPil


def _pixel_limit_kwargs() -> dict[str, Any]:
    # The constructor of every version takes min_pixels/max_pixels (4.49 resizes with them; 4.5x and 5.x
    # turn them into size). transformers 5 spells the limits as size={"shortest_edge", "longest_edge"}.
    limits: dict[str, Any] = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    if _TRANSFORMERS_VERSION.major >= 5:
        limits["size"] = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    return limits


def _effective_pixel_limits(image_processor: Any) -> set[tuple[int, int]]:
    # 4.49 resizes with its min_pixels/max_pixels attributes, later versions with size; check all present.
    found = set()
    size = getattr(image_processor, "size", None)
    if size is not None:
        found.add((size["shortest_edge"], size["longest_edge"]))
    if isinstance(getattr(image_processor, "min_pixels", None), int):
        found.add((image_processor.min_pixels, image_processor.max_pixels))
    return found


def _load_image_processor(folder: Path) -> Any:
    processor_class = _pil_image_processor_class()
    has_config = any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json"))
    if has_config:
        settings, _ = processor_class.get_image_processor_dict(str(folder))
    else:
        logger.warning("'%s' has no preprocessor_config.json; using Qwen2-VL's default image settings", folder)
        settings = {}
    # Override the folder's limits before construction: from_pretrained(**kwargs) would set them as
    # attributes afterwards, which 4.49 leaves half-applied (min_pixels updated, size not).
    image_processor = processor_class.from_dict({**settings, **_pixel_limit_kwargs()})
    if _effective_pixel_limits(image_processor) != {(MIN_PIXELS, MAX_PIXELS)}:
        raise RuntimeError(
            f"the Qwen2-VL image processor did not take min/max pixels {MIN_PIXELS}/{MAX_PIXELS} "
            f"(transformers {transformers.__version__}); got {_effective_pixel_limits(image_processor)}"
        )
    return image_processor


def _load_model(folder: Path, dtype: torch.dtype, attn_implementation: str | None) -> torch.nn.Module:
    from transformers import Qwen2_5_VLForConditionalGeneration

    # use_safetensors: never fall back to a pickled pytorch_model.bin lying next to the safetensors files.
    kwargs: dict[str, Any] = dict(dtype_kwarg(dtype), output_loading_info=True, use_safetensors=True)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, loading_info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), **kwargs)
    except (SafetensorError, OSError) as error:
        raise QwenFolderError(
            f"'{folder}': the weights cannot be read ({error}). {_unreadable_weights(folder)} Expected the "
            f"complete safetensors checkpoint of {_REQUIRED_MODEL}. Fix: {_DOWNLOAD_HINT}."
        ) from error
    # The LM head is never used here; anything else missing would silently stay random.
    missing = [key for key in loading_info.get("missing_keys", []) if not key.endswith("lm_head.weight")]
    if missing:
        raise QwenFolderError(
            f"'{folder}' weights lack {len(missing)} Qwen2.5-VL tensor(s), e.g. {', '.join(sorted(missing)[:5])}. "
            f"Expected the complete checkpoint of {_REQUIRED_MODEL}. Fix: {_DOWNLOAD_HINT}."
        )
    return drop_lm_head(model)


def _unreadable_weights(folder: Path) -> str:
    """Name the safetensors files of ``folder`` whose header cannot be read, and what they hold instead."""
    from ..dit.checkpoint import describe_unreadable

    found = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            found.append(f"{path.name}: {describe_unreadable(path)}.")
    return " ".join(found)


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


# --------------------------------------------------------------------------------------------------------
# Forward (version differences isolated)
# --------------------------------------------------------------------------------------------------------


def _rope_index_function(model: torch.nn.Module) -> Any:
    # transformers >= 4.52 keeps get_rope_index on the inner Qwen2_5_VLModel; 4.49 on the outer model.
    return getattr(model.model, "get_rope_index", None) or model.get_rope_index


def _mrope_position_ids(
    model: torch.nn.Module, input_ids: torch.Tensor, image_grid_thw: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Qwen2.5-VL's 3-D positions [3, 1, L] as transformers 4.x computes them from the ids."""
    get_rope_index = _rope_index_function(model)
    kwargs: dict[str, Any] = {"image_grid_thw": image_grid_thw, "attention_mask": attention_mask}
    if "mm_token_type_ids" in inspect.signature(get_rope_index).parameters:
        # transformers >= 5.3 finds the image tokens through their token type instead of the ids.
        kwargs["mm_token_type_ids"] = (input_ids == model.config.image_token_id).int()
    position_ids, _ = get_rope_index(input_ids, **kwargs)
    # Masked tokens (id 0 = "!") are skipped when counting; 4.x leaves them at 1 (transformers 5.3+: 0).
    return position_ids.masked_fill(attention_mask[None] == 0, 1)


def _sequential_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """What transformers >= 5.3 falls back to without ``mm_token_type_ids``: 0..L-1 on all three axes."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return positions.view(1, 1, -1).expand(3, input_ids.shape[0], -1)


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    # transformers >= 4.52: model.model is the whole vision+language backbone (no LM head, no logits).
    # transformers 4.49: model.model is text-only; only the outer forward merges the image features.
    return model.model if hasattr(model.model, "visual") else model


# --------------------------------------------------------------------------------------------------------
# The embedder
# --------------------------------------------------------------------------------------------------------


@dataclass
class _SampleInputs:
    input_ids: torch.Tensor  # [1, L]
    attention_mask: torch.Tensor  # [1, L]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # [1, 3]


class QwenVLEmbedder:
    """Step1X-Edit's Qwen2.5-VL embedder: ``(instructions, images) -> (embs [B,640,hidden], masks [B,640])``."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        image_processor: Any,
        behaviour: OfficialBehaviour = AS_TRANSFORMERS_4_49,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.behaviour = behaviour
        # The compute dtype; fp8-stored weights do not tell it.
        self._dtype = dtype or next(p.dtype for p in model.parameters() if p.dtype not in FP8_DTYPES)
        # Tokens cut by the 640 limit for each sample of the latest call (0 = nothing lost).
        self.last_dropped_tokens: list[int] = []

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        *,
        behaviour: OfficialBehaviour = AS_TRANSFORMERS_4_49,
        attn_implementation: str | None = None,
    ) -> "QwenVLEmbedder":
        """Load Qwen2.5-VL-7B-Instruct from a Hugging Face folder (Hub 4.49-era or transformers-5 layout) or
        from a single .safetensors file in ComfyUI's layout (bf16 or fp8 scaled; see ``qwen_file``)."""
        from transformers import AutoTokenizer

        if Path(path).expanduser().is_file():
            return cls.from_single_file(path, dtype, device, behaviour=behaviour,
                                        attn_implementation=attn_implementation)
        folder = validate_qwen_folder(path)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        _warn_if_chat_template_differs(folder, tokenizer)
        image_processor = _load_image_processor(folder)
        model = _load_model(folder, dtype, attn_implementation).to(device).eval().requires_grad_(False)
        return cls(model, tokenizer, image_processor, behaviour=behaviour, dtype=dtype)

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        *,
        behaviour: OfficialBehaviour = AS_TRANSFORMERS_4_49,
        attn_implementation: str | None = None,
    ) -> "QwenVLEmbedder":
        """Load ComfyUI's single-file Qwen2.5-VL-7B (e.g. ``qwen_2.5_vl_7b_fp8_scaled.safetensors``) with the
        tokenizer and image-processor settings packaged with this pack. fp8 weights stay fp8."""
        from transformers import AutoTokenizer

        model = load_qwen_file(path, dtype, attn_implementation).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(PACKAGED_TOKENIZER))
        image_processor = _load_image_processor(PACKAGED_CONFIG)
        return cls(model, tokenizer, image_processor, behaviour=behaviour, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def to(self, device: str | torch.device) -> "QwenVLEmbedder":
        """Move the model (e.g. for offloading between pipeline stages); returns ``self``."""
        self.model.to(device)
        return self

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return getattr(config, "text_config", config).hidden_size

    # ---- inputs -------------------------------------------------------------------------------------

    def _vision_image(self, image: Image.Image | torch.Tensor) -> Image.Image:
        """The image after both official resizes (or, for "pil", ready for the processor's own resize)."""
        pil = prepare_vlm_image(image)
        if self.behaviour.resize == "pil":
            return pil  # the PIL image processor resizes it itself
        factor = self.image_processor.patch_size * self.image_processor.merge_size
        height, width = _smart_resize(pil.height, pil.width, factor, MIN_PIXELS, MAX_PIXELS)
        # Already at its final size, so the image processor's own resize leaves it untouched.
        return _resize_like_torchvision(pil, height, width)

    def _processor_ids(self, text: str, image_grid_thw: torch.Tensor) -> list[int]:
        # What Qwen2_5_VLProcessor does to the text (its constructor needs torchvision in transformers 5).
        image_tokens = int(image_grid_thw.prod()) // self.image_processor.merge_size**2
        return list(self.tokenizer(text.replace(_IMAGE_PAD, _IMAGE_PAD * image_tokens, 1))["input_ids"])

    def _checked_text(self, text: str) -> str:
        """User text made safe to template: unpaired UTF-16 surrogates (a broken escape; the tokenizer cannot
        encode them) become U+FFFD; Qwen's control tokens are refused, since they would restructure the
        prompt (an <|image_pad|> even asks for a second image)."""
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        if fixed != text:
            logger.warning("the instruction held unpaired UTF-16 surrogates; they were replaced by U+FFFD")
        tokens = sorted(t for t in self.tokenizer.get_added_vocab() if t.startswith("<|") and t in fixed)
        if tokens:
            raise ValueError(
                f"the instruction {fixed[:80]!r} contains Qwen2.5-VL control token(s) {', '.join(tokens)}, which "
                "would break Step1X-Edit's prompt template; remove them"
            )
        return fixed

    def _prepare(self, instruction: str, image: Image.Image | torch.Tensor) -> _SampleInputs:
        text = templated_prompt(self._checked_text(instruction), vision_id=self.behaviour.vision_id)
        vision = self.image_processor(images=[self._vision_image(image)], return_tensors="pt")
        processor_ids = self._processor_ids(text, vision["image_grid_thw"])
        requoted_ids = quote_aware_ids(self.tokenizer, text)
        # Normal ids up to the first <|vision_end|>, quote-aware ids from there on.
        head = processor_ids[: processor_ids.index(_VISION_END_ID)]
        tail = requoted_ids[requoted_ids.index(_VISION_END_ID) :]
        input_ids = torch.tensor([head + tail], dtype=torch.long)
        return _SampleInputs(
            input_ids=input_ids,
            attention_mask=(input_ids > 0).long(),  # id 0 is "!": masked, as in the official code
            pixel_values=torch.as_tensor(vision["pixel_values"]),
            image_grid_thw=torch.as_tensor(vision["image_grid_thw"]),
        )

    def token_ids(self, instruction: str, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """The ids fed to Qwen for one (instruction, image), 1-D long tensor."""
        return self._prepare(instruction, image).input_ids[0]

    # ---- forward ------------------------------------------------------------------------------------

    def _position_ids(self, inputs: _SampleInputs) -> torch.Tensor:
        if self.behaviour.positions == "sequential":
            return _sequential_position_ids(inputs.input_ids)
        return _mrope_position_ids(self.model, inputs.input_ids, inputs.image_grid_thw, inputs.attention_mask)

    @torch.inference_mode()
    def _last_hidden_state(self, inputs: _SampleInputs) -> torch.Tensor:
        """[L, hidden]: the last decoder layer's output after the final RMSNorm."""
        device = self.device
        outputs = _backbone(self.model)(
            input_ids=inputs.input_ids.to(device),
            attention_mask=inputs.attention_mask.to(device),
            position_ids=self._position_ids(inputs).to(device),
            pixel_values=inputs.pixel_values.to(device, self.dtype),
            image_grid_thw=inputs.image_grid_thw.to(device),
            output_hidden_states=True,
            use_cache=False,
            return_dict=True,
        )
        return outputs.hidden_states[-1][0]

    def _keep(self, hidden: torch.Tensor) -> torch.Tensor:
        """Drop the constant first 217 tokens and cut to 640, warning about what is cut."""
        kept = hidden[DROP_TOKENS:]
        dropped = max(0, kept.shape[0] - MAX_LENGTH)
        self.last_dropped_tokens.append(dropped)
        if dropped:
            logger.warning(
                "Step1X-Edit prompt too long: %d tokens after the first %d, only %d kept; %d tokens dropped "
                "(the end of the instruction and the assistant turn are lost)",
                kept.shape[0], DROP_TOKENS, MAX_LENGTH, dropped,
            )
        kept = kept[:MAX_LENGTH]
        if self.behaviour.bf16_buffer:
            kept = kept.to(torch.bfloat16)  # the official output buffer is bfloat16
        return kept.to(self.dtype)

    def __call__(
        self, instructions: Sequence[str], images: Sequence[Image.Image | torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each (instruction, reference image) pair with one Qwen forward each.

        Returns ``embs`` [B, 640, hidden] in the model's dtype (zero past each sample's tokens) and
        ``masks`` [B, 640] long (1 for kept tokens).
        """
        if len(instructions) != len(images):
            raise ValueError(f"{len(instructions)} instructions but {len(images)} images")
        embs = torch.zeros(len(instructions), MAX_LENGTH, self.hidden_size, dtype=self.dtype, device=self.device)
        masks = torch.zeros(len(instructions), MAX_LENGTH, dtype=torch.long, device=self.device)
        self.last_dropped_tokens = []
        for index, (instruction, image) in enumerate(zip(instructions, images)):
            kept = self._keep(self._last_hidden_state(self._prepare(instruction, image)))
            embs[index, : kept.shape[0]] = kept
            masks[index, : kept.shape[0]] = 1
        return embs, masks

    def encode_with_negative(
        self, instruction: str, image: Image.Image | torch.Tensor, negative: str = ""
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cond and uncond (``negative``, same image) in one call: ``embs [2,640,hidden]``, ``masks [2,640]``."""
        return self([instruction, negative], [image, image])
