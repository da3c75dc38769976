"""Masked paste: outside the mask the original comes back bit for bit; the edge fades in inside the mask."""

from __future__ import annotations

import pytest
import torch

from step1x_core.images.masking import feather_inward, paste_masked, resize_mask


def _square_mask(size: int = 40, lo: int = 10, hi: int = 30) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, lo:hi, lo:hi] = 1
    return mask


def test_feather_is_zero_outside_and_full_deep_inside():
    mask = _square_mask()
    soft = feather_inward(mask, 4)
    assert torch.equal(soft[mask == 0], torch.zeros_like(soft[mask == 0]))
    assert torch.all(soft[:, 14:26, 14:26] == 1)  # 4 px in from every edge
    row = soft[0, 20, 10:15]  # from the left edge inward: a ramp
    assert torch.all(row[1:] > row[:-1]) and 0 < row[0] < 0.25


def test_feather_zero_is_the_mask_and_negative_is_refused():
    mask = _square_mask()
    assert feather_inward(mask, 0) is mask
    with pytest.raises(ValueError, match="feather must be >= 0"):
        feather_inward(mask, -1)


def test_a_mask_touching_the_image_border_stays_full_there():
    mask = torch.zeros(1, 20, 20)
    mask[:, :, :10] = 1
    assert torch.all(feather_inward(mask, 3)[:, :, :6] == 1)


def test_paste_keeps_the_original_bit_for_bit_outside():
    gen = torch.Generator().manual_seed(0)
    original, edited = torch.rand(2, 40, 40, 3, generator=gen), torch.rand(2, 40, 40, 3, generator=gen)
    mask = feather_inward(_square_mask().expand(2, -1, -1), 4)
    out = paste_masked(original, edited, mask)
    outside = (mask == 0)[..., None].expand_as(out)
    assert torch.equal(out[outside], original[outside])
    inside = (mask == 1)[..., None].expand_as(out)
    torch.testing.assert_close(out[inside], edited[inside])


def test_mask_resize_keeps_soft_values_and_accepts_2d():
    mask = _square_mask(8, 2, 6)[0]
    resized = resize_mask(mask, 16, 16)
    assert resized.shape == (1, 16, 16) and resized.min() == 0 and resized.max() == 1
    assert ((resized > 0) & (resized < 1)).any()
