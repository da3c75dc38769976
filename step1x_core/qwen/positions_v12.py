"""Position ids of Step1X-Edit v1.2's text stream: Qwen2.5-VL's 3-D rotary positions for the MLLM forward,
and the DiT's ``txt_ids`` made from them.

- ``mrope_positions``: what transformers 4.55's ``get_rope_index`` gives for one sequence and a mask
  (the reference passes ids > 0, so every "!" is skipped): positions start at ones; masked tokens keep
  (1, 1, 1) and are not counted; text gets (p, p, p); an image's tokens (S, S + row, S + col) with S the
  count before it; text after an image resumes at S + max(rows, cols). Written out here so that every
  transformers version gives the reference's numbers.
- ``dit_text_ids``: the kept rows, shifted so the last token sits at -1 on axis 0, zero on axes 1 and 2,
  except vision tokens, whose axes 1 and 2 become their place on the packed-latent grid through the
  reference's affine maps (float32, in its order of operations; note its offset 11/16).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dit_text_ids", "mrope_positions", "vision_grid_positions"]

MERGED_PATCH = 28  # pixels per merged vision token (patch 14 x merge 2)
LATENT_PATCH = 16  # pixels per packed latent token (VAE 8 x patch 2)


def mrope_positions(input_ids: list[int], attention_mask: list[int], grid: tuple[int, int, int],
                    image_token_id: int, merge: int = 2) -> Tensor:
    """[3, N] long positions of one sequence holding at most one image of ``grid`` = (t, h, w) patches."""
    rows, cols = grid[1] // merge, grid[2] // merge
    image_tokens = grid[0] * rows * cols
    positions = torch.ones(3, len(input_ids), dtype=torch.long)
    valid = [i for i, keep in enumerate(attention_mask) if keep]
    next_position = 0
    k = 0
    while k < len(valid):
        index = valid[k]
        if input_ids[index] != image_token_id:
            positions[:, index] = next_position
            next_position += 1
            k += 1
            continue
        start = next_position
        block = valid[k:k + image_tokens]
        for n, token_index in enumerate(block):  # single images: the temporal index stays at start
            positions[:, token_index] = torch.tensor([start, start + (n // cols) % rows, start + n % cols])
        next_position = start + max(rows, cols)
        k += image_tokens
    return positions


def _affine(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def vision_grid_positions(grid_hw: tuple[int, int], source_wh: tuple[int, int]) -> Tensor:
    """[rows * cols, 2] (row, col) of each merged vision token on the packed-latent grid, row-major.

    ``grid_hw`` is the merged token grid, ``source_wh`` the size of the image given to the MLLM. A token
    covers 28 pixels of the processor-resized image (centre 28k + 13.5); that image maps to the source
    with align-corners scaling; a latent token covers 16 source pixels (offset 11/16, as the reference)."""
    rows, cols = grid_hw
    resized_w, resized_h = torch.tensor(cols * MERGED_PATCH), torch.tensor(rows * MERGED_PATCH)
    source_w, source_h = source_wh
    resize = torch.eye(3)
    resize[0, 0] = (resized_w - 1) / (source_w - 1)
    resize[1, 1] = (resized_h - 1) / (source_h - 1)
    to_token = _affine([[1 / 28, 0, -13.5 / 28], [0, 1 / 28, -13.5 / 28], [0, 0, 1]])
    to_latent = _affine([[1 / 16, 0, -11 / 16], [0, 1 / 16, -11 / 16], [0, 0, 1]])
    token_to_latent = to_latent @ torch.linalg.inv(to_token @ resize)
    grid = torch.zeros(rows, cols, 3)
    grid[..., 1] += torch.arange(rows, dtype=torch.float32)[:, None]
    grid[..., 2] += torch.arange(cols, dtype=torch.float32)[None, :]
    xy = grid[..., [2, 1]].reshape(-1, 2)
    xy = xy @ token_to_latent[:2, :2].T + token_to_latent[:2, -1][None]
    return xy[:, [1, 0]]


def dit_text_ids(positions: Tensor, vision_mask: Tensor, grid_hw: tuple[int, int], source_wh: tuple[int, int],
                 start: int, length: int) -> Tensor:
    """[length, 3] float32 ``txt_ids`` of the kept tokens ``start .. start + length`` of a sequence with
    ``positions`` [3, N] and ``vision_mask`` [N] (True on image tokens)."""
    ids = positions.T[start:start + length].to(torch.float32)
    ids -= ids[:, 0].max() + 1
    ids[:, 1:] = 0
    kept_vision = vision_mask[start:start + length]
    count = int(kept_vision.sum())
    if count:  # a very long instruction can cut into the image: the first `count` grid cells are kept
        ids[kept_vision, 1:] = vision_grid_positions(grid_hw, source_wh)[:count]
    return ids
