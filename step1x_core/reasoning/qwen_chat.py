"""The fine-tuned Qwen2.5-VL of Step1X-Edit v1.2 as the thinker's chat model.

It is the reference's ``QwenGenerativeAIClient``: same chat text, images and ids (``chat_inputs``), the
same ``generate`` call (at most 128 new tokens, sampling with top-p 0.9 and temperature 0.7, merged by
transformers with the checkpoint's ``generation_config.json``: repetition penalty 1.05 and top-k 50 for
the published one), and the new tokens decoded without special tokens.

Unlike the reference it is seedable: every call draws its own seed from the client's generator and
samples under a forked RNG, so the same seed gives the same answers and the caller's global RNG
(CPU and device) is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..qwen.transformers_versions import image_token_types
from .chat import ChatModel
from .chat_inputs import encode_chat, thinker_image_processor
from .prompts import ChatItem

__all__ = ["MAX_NEW_TOKENS", "QwenChat", "Seed"]

# The reference always asks for 128 new tokens (its max_tokens argument is ignored), so long answers are
# cut and then retried as invalid; kept as the default to match it.
MAX_NEW_TOKENS = 128

Seed = int | torch.Generator | None


@contextmanager
def _seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the CPU RNG and ``device``'s RNG for the block; both are restored afterwards."""
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])  # the CPU state is always forked
    else:
        index = device.index if device.index is not None else 0
        fork = torch.random.fork_rng(devices=[index], device_type=device.type)
    with fork:
        torch.random.default_generator.manual_seed(seed)
        if device.type != "cpu":
            module = torch.get_device_module(device.type)
            if device.index is not None and hasattr(module, "device"):
                with module.device(device.index):
                    module.manual_seed(seed)
            else:
                module.manual_seed(seed)
        yield


class QwenChat(ChatModel):
    """Qwen2.5-VL (with its LM head) answering the thinker's requests.

    ``model``, ``tokenizer``, ``image_processor``: as the Qwen loaders return them (load with
    ``keep_lm_head=True``); the image processor is copied with the thinker's pixel limits.
    ``seed``: an int (reproducible answers), a ``torch.Generator`` to draw the per-call seeds from, or
    None (fresh entropy). ``max_new_tokens``: the reference's 128 by default.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, *, seed: Seed = None,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        if isinstance(getattr(model, "lm_head", None), nn.Identity):
            raise ValueError("this Qwen2.5-VL was loaded without its LM head, so it cannot write text; thinking "
                             "and reflection need it: load the text encoder with its head (ComfyUI: keep_lm_head on in Load "
                             "Step1X-Edit Qwen2.5-VL; Python: keep_lm_head=True, or reasoning=True in from_files)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = thinker_image_processor(image_processor)
        self.max_new_tokens = max_new_tokens
        self.reseed(seed)

    def reseed(self, seed: Seed) -> None:
        """Restart the answers' randomness: the same seed gives the same sequence of answers."""
        if isinstance(seed, torch.Generator):
            self._seeds = seed
            return
        self._seeds = torch.Generator()
        if seed is None:
            self._seeds.seed()  # fresh entropy; the global RNG is not touched
        else:
            self._seeds.manual_seed(seed)

    def generate_kwargs(self) -> dict[str, Any]:
        """The reference's arguments to ``generate`` besides the tensors."""
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "top_p": 0.9, "temperature": 0.7,
                "eos_token_id": self.tokenizer.eos_token_id}

    @torch.no_grad()
    def chat(self, system: str, content: Sequence[ChatItem], *, stage: str = "") -> str:
        device = self.model.device
        inputs = encode_chat(self.tokenizer, self.image_processor, system, content)
        inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
        inputs.update(image_token_types(self.model, inputs["input_ids"]))
        seed = int(torch.randint(2**62, (), generator=self._seeds))
        with _seeded_rng(device, seed):
            output = self.model.generate(**inputs, **self.generate_kwargs())
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
