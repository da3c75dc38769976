"""Step1X-Edit's text+image encoder: Qwen2.5-VL-7B-Instruct hidden states for (instruction, reference image).

What the official ``Qwen25VL_7b_Embedder`` does, re-implemented on transformers' own pieces: the prompt
(``prompt.py``), the image (``vision_input.py``), then one forward per sample; the last hidden state
(after the final norm), the first 217 tokens dropped, at most 640 kept. The official code's output
depends on the transformers version it runs on (``transformers_versions.OfficialBehaviour``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..finite import require_finite_tensor
from ..ops import FP8_DTYPES
from ..images.sizing import tensor_to_pil
from ..versions import Version
from .embedder_v12 import QwenV12Embedder
from .encoding import PromptEncoding
from .folder import load_qwen_folder
from .packaged import PACKAGED_CONFIG, PACKAGED_TOKENIZER
from .prompt import DROP_TOKENS, MAX_LENGTH, checked_instruction, prompt_ids, templated_prompt
from .single_file import load_qwen_file
from .transformers_versions import (AS_TRANSFORMERS_4_49, OfficialBehaviour, backbone, mrope_position_ids,
                                    sequential_position_ids)
from .vision_input import load_image_processor, processor_sized_image

__all__ = ["QwenVLEmbedder", "SampleInputs"]

logger = logging.getLogger(__name__)

# Its weights are checked for NaN/Inf when loaded, so what is left is the arithmetic.
NON_FINITE_CAUSE = "the encoder's arithmetic: Qwen2.5-VL overflows in float16; run it in bfloat16 or float32"


def _load_single_file(path: str | Path, dtype: torch.dtype, attn_implementation: str | None,
                      keep_lm_head: bool = False) -> tuple[torch.nn.Module, Any, Any]:
    from transformers import AutoTokenizer

    model = load_qwen_file(path, dtype, attn_implementation, keep_lm_head=keep_lm_head)
    return model, AutoTokenizer.from_pretrained(str(PACKAGED_TOKENIZER)), load_image_processor(PACKAGED_CONFIG)


@dataclass
class SampleInputs:
    """What goes into one Qwen forward."""

    input_ids: torch.Tensor  # [1, L]
    attention_mask: torch.Tensor  # [1, L]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # [1, 3]


class QwenVLEmbedder:
    """Step1X-Edit's Qwen2.5-VL embedder: ``(instructions, images) -> PromptEncoding`` in v1.0/v1.1's format
    (hidden [B,640,hidden], mask [B,640], zero text ids, tokens lost to the 640 limit); ``encode`` picks the
    prompt format (v1.2's builder is ``embedder_v12``)."""

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

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        *,
        behaviour: OfficialBehaviour = AS_TRANSFORMERS_4_49,
        attn_implementation: str | None = None,
        keep_lm_head: bool = False,
    ) -> "QwenVLEmbedder":
        """Load Qwen2.5-VL-7B-Instruct from a Hugging Face folder (Hub 4.49-era or transformers-5 layout) or
        from a single .safetensors file in ComfyUI's layout (e.g. ``qwen_2.5_vl_7b_fp8_scaled.safetensors``;
        bf16 or fp8 scaled, fp8 weights stay fp8), which gets the tokenizer and image-processor settings
        packaged with this pack. ``keep_lm_head``: keep the LM head, which v1.2's thinking and reflection
        need to write text (1.1 GB the encoder alone never uses)."""
        if Path(path).expanduser().is_file():
            model, tokenizer, image_processor = _load_single_file(path, dtype, attn_implementation, keep_lm_head)
        else:
            model, tokenizer, image_processor = load_qwen_folder(path, dtype, attn_implementation, keep_lm_head)
        return cls(model.to(device), tokenizer, image_processor, behaviour=behaviour, dtype=dtype)

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

    def inputs(self, instruction: str, image: Image.Image | torch.Tensor) -> SampleInputs:
        """Ids, mask and pixels for one (instruction, reference image)."""
        if isinstance(image, torch.Tensor):
            require_finite_tensor("the image", image, "the node or step that made it produced NaN/Inf pixels")
        text = templated_prompt(checked_instruction(instruction, self.tokenizer), vision_id=self.behaviour.vision_id)
        vision_image = processor_sized_image(image, self.image_processor, self.behaviour.resize)
        vision = self.image_processor(images=[vision_image], return_tensors="pt")
        image_tokens = int(vision["image_grid_thw"].prod()) // self.image_processor.merge_size**2
        input_ids = torch.tensor([prompt_ids(self.tokenizer, text, image_tokens)], dtype=torch.long)
        return SampleInputs(
            input_ids=input_ids,
            attention_mask=(input_ids > 0).long(),  # id 0 is "!": masked, as in the official code
            pixel_values=torch.as_tensor(vision["pixel_values"]),
            image_grid_thw=torch.as_tensor(vision["image_grid_thw"]),
        )

    def token_ids(self, instruction: str, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """The ids fed to Qwen for one (instruction, image), 1-D long tensor."""
        return self.inputs(instruction, image).input_ids[0]

    # ---- forward ------------------------------------------------------------------------------------

    def position_ids(self, inputs: SampleInputs) -> torch.Tensor:
        """The 3-D rotary positions [3, 1, L] the official run would use (see ``OfficialBehaviour``)."""
        if self.behaviour.positions == "sequential":
            return sequential_position_ids(inputs.input_ids)
        return mrope_position_ids(self.model, inputs.input_ids, inputs.image_grid_thw, inputs.attention_mask)

    @torch.inference_mode()
    def _last_hidden_state(self, inputs: SampleInputs) -> torch.Tensor:
        """[L, hidden]: the last decoder layer's output after the final RMSNorm."""
        device = self.device
        outputs = backbone(self.model)(
            input_ids=inputs.input_ids.to(device),
            attention_mask=inputs.attention_mask.to(device),
            position_ids=self.position_ids(inputs).to(device),
            pixel_values=inputs.pixel_values.to(device, self.dtype),
            image_grid_thw=inputs.image_grid_thw.to(device),
            output_hidden_states=True,
            use_cache=False,
            return_dict=True,
        )
        return outputs.hidden_states[-1][0]

    def _keep(self, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Drop the constant first 217 tokens and cut to 640, warning about what is cut; returns the kept
        states and the number of tokens cut."""
        kept = hidden[DROP_TOKENS:]
        dropped = max(0, kept.shape[0] - MAX_LENGTH)
        if dropped:
            logger.warning(
                "Step1X-Edit prompt too long: %d tokens after the first %d, only %d kept; %d tokens dropped "
                "(the end of the instruction and the assistant turn are lost)",
                kept.shape[0], DROP_TOKENS, MAX_LENGTH, dropped,
            )
        kept = kept[:MAX_LENGTH]
        if self.behaviour.bf16_buffer:
            kept = kept.to(torch.bfloat16)  # the official output buffer is bfloat16
        return kept.to(self.dtype), dropped

    def __call__(self, instructions: Sequence[str], images: Sequence[Image.Image | torch.Tensor]) -> PromptEncoding:
        """Encode each (instruction, reference image) pair with one Qwen forward each."""
        if len(instructions) != len(images):
            raise ValueError(f"{len(instructions)} instructions but {len(images)} images")
        embs = torch.zeros(len(instructions), MAX_LENGTH, self.hidden_size, dtype=self.dtype, device=self.device)
        masks = torch.zeros(len(instructions), MAX_LENGTH, dtype=torch.long, device=self.device)
        dropped_tokens = []
        for index, (instruction, image) in enumerate(zip(instructions, images)):
            kept, dropped = self._keep(self._last_hidden_state(self.inputs(instruction, image)))
            require_finite_tensor("Qwen2.5-VL's hidden states", kept, NON_FINITE_CAUSE)
            embs[index, : kept.shape[0]] = kept
            masks[index, : kept.shape[0]] = 1
            dropped_tokens.append(dropped)
        txt_ids = torch.zeros(len(instructions), MAX_LENGTH, 3, device=self.device)
        return PromptEncoding(embs, masks, txt_ids, dropped_tokens=tuple(dropped_tokens))

    def encode_with_negative(
        self, instruction: str, image: Image.Image | torch.Tensor, negative: str = ""
    ) -> PromptEncoding:
        """Cond and uncond (``negative``, same image) in one call: ``hidden [2,640,hidden]``, ``mask [2,640]``."""
        return self([instruction, negative], [image, image])

    def encode(self, text: str, image: Image.Image | torch.Tensor, prompt_format: str = "v1.1") -> PromptEncoding:
        """One prompt with its image in ``prompt_format``'s layout: "v1.0"/"v1.1" (the official embedder) or
        "v1.2" (its own template, positions and quote marking; ``image`` as the v1.2 reference shows it)."""
        if Version.parse(prompt_format).reasoning_prompts:
            if isinstance(image, torch.Tensor):
                image = tensor_to_pil(image)
            return QwenV12Embedder.from_embedder(self)(text, image)
        return self([text], [image])
