"""The judges VIEScore can ask: a local Qwen2.5-VL through transformers, or any OpenAI-compatible chat
endpoint (OpenAI, vLLM, SGLang, ...). Each presents the images the way the official GEdit-Bench judge of
its kind does.

- Qwen2.5-VL (the official ``qwen25vl`` backbone, 72B-AWQ there): images first, then the prompt; each
  image resized like ``qwen_vl_utils`` (multiples of 28); greedy decoding, at most 512 new tokens.
- OpenAI-compatible (the official GPT-4.1 backbone): the prompt first, then the images as base64 JPEG
  data URLs; at most 1400 tokens. The API key comes from an environment variable, never from a file.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..qwen.transformers_versions import dtype_kwarg
from ..qwen.vision_input import prepare_vlm_image

__all__ = ["HttpJudge", "JudgeError", "JudgeUnavailable", "QwenJudge"]

logger = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """This question failed (the item is recorded as an error and asked again by the next run)."""


class JudgeUnavailable(JudgeError):
    """The judge cannot answer at all (wrong URL, model or key; server down): scoring stops."""


class QwenJudge:
    """Qwen2.5-VL-*-Instruct from a local Hugging Face folder (7B for a quick score, 72B-AWQ as published)."""

    def __init__(self, folder: str | Path, device: str | None = None, max_new_tokens: int = 512):
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise JudgeUnavailable(f"--judge-model {folder}: not a Hugging Face model folder (no config.json); "
                                   "give the folder of Qwen2.5-VL-7B-Instruct or Qwen2.5-VL-72B-Instruct-AWQ")
        on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        # On GPUs the checkpoint's own dtype (float16 for AWQ), spread over every visible GPU; float32 on CPU.
        placement = {**dtype_kwarg("auto"), "device_map": device or "auto"} if on_gpu else dtype_kwarg(torch.float32)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), **placement).eval()
        self.processor = AutoProcessor.from_pretrained(str(folder))
        self.max_new_tokens = max_new_tokens
        self.name = f"qwen-{folder.name}"

    @torch.inference_mode()
    def ask(self, images: Sequence[Image.Image], prompt: str) -> str:
        images = [prepare_vlm_image(image) for image in images]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
        inputs = self.processor(text=[text], images=images, return_tensors="pt").to(self.model.device)
        generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)[0]


def jpeg_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")  # Pillow's default quality, as the official client
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class HttpJudge:
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}
    FATAL_STATUSES = {401, 403, 404}

    def __init__(self, url: str, model: str, api_key: str | None = None, max_tokens: int = 1400,
                 timeout: float = 300.0, retry_delays: Sequence[float] = (2, 4, 8, 16)):
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model, self.api_key, self.max_tokens, self.timeout = model, api_key, max_tokens, timeout
        self.retry_delays = tuple(retry_delays)
        self.name = f"http-{model}"

    def _request(self, images: Sequence[Image.Image], prompt: str) -> urllib.request.Request:
        content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        content += [{"type": "image_url", "image_url": {"url": jpeg_data_url(image)}} for image in images]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": self.max_tokens}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(self.endpoint, json.dumps(body).encode("utf-8"), headers, method="POST")

    def ask(self, images: Sequence[Image.Image], prompt: str) -> str:
        request = self._request(images, prompt)
        for attempt, delay in enumerate((*self.retry_delays, None)):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._answer(response.read())
            except urllib.error.HTTPError as err:
                detail = err.read(300).decode("utf-8", "replace").strip()
                message = f"{self.endpoint} answered HTTP {err.code} {err.reason}: {detail}"
                if err.code in self.FATAL_STATUSES:
                    raise JudgeUnavailable(f"{message} (check --judge-url, --judge-model and the API key)") from None
                if err.code not in self.RETRY_STATUSES or delay is None:
                    raise JudgeError(message) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                reason = getattr(err, "reason", err)
                if delay is None:
                    raise JudgeUnavailable(f"cannot reach the judge at {self.endpoint}: {reason}") from None
            logger.info("judge busy or unreachable (attempt %d); retrying in %g s", attempt + 1, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _answer(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.endpoint} sent no chat completion: {raw[:200]!r}") from None
        if isinstance(content, list):  # some servers answer in content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content or ""
