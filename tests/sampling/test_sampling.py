"""Schedule, packing, position ids and CFG arithmetic against the spec's worked examples."""

from __future__ import annotations

import pytest
import torch

from step1x_core.sampling.guidance import cfg_combine
from step1x_core.sampling.latents import edit_ids, image_ids, pack, unpack
from step1x_core.sampling.official import get_noise, get_schedule, img2img_start, time_shift_mu


@pytest.mark.parametrize("tokens, expected", [
    (1024, [1.0, 0.98066, 0.96064, 0.93993]),  # size level 512, 28 steps
    (4096, [1.0, 0.98841, 0.97622, 0.96339, 0.94987]),  # size level 1024
])
def test_shifted_schedule(tokens, expected):
    schedule = get_schedule(28, tokens)
    assert len(schedule) == 29 and schedule[-1] == 0.0
    assert schedule[: len(expected)] == pytest.approx(expected, abs=1e-5)


def test_mu_line():
    assert time_shift_mu(256) == pytest.approx(0.5)
    assert time_shift_mu(4096) == pytest.approx(1.15)
    assert time_shift_mu(1024) == pytest.approx(0.63, abs=1e-3)


@pytest.mark.parametrize("size_level, active_steps", [(512, 4), (768, 5), (1024, 6)])
def test_norm_cfg_active_steps(size_level, active_steps):
    """The spec: with threshold 0.93 normalised CFG is on for the first 4 / 5 / 6 of 28 steps."""
    tokens = (size_level // 16) ** 2
    assert sum(t > 0.93 for t in get_schedule(28, tokens)[:-1]) == active_steps


def test_pack_layout_and_round_trip():
    latent = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    tokens = pack(latent)
    assert tokens.shape == (2, 6, 64)
    # token 0 holds the top-left 2x2 patch of every channel, ordered (c, py, px)
    assert tokens[0, 0, :4].tolist() == [latent[0, 0, 0, 0], latent[0, 0, 0, 1], latent[0, 0, 1, 0], latent[0, 0, 1, 1]]
    assert tokens[0, 1, 0] == latent[0, 0, 0, 2]  # row-major tokens
    torch.testing.assert_close(unpack(tokens, 4, 6), latent)


def test_position_ids_per_version():
    v10, txt = edit_ids(4, 6, batch=2, version="v1.0", text_tokens=5)
    v11, _ = edit_ids(4, 6, batch=2, version="v1.1", text_tokens=5)
    assert txt.shape == (2, 5, 3) and not txt.any()
    target = image_ids(4, 6, 2)
    assert target[0, 4].tolist() == [0, 1, 1]  # row 1, col 1 of a 2x3 token grid
    torch.testing.assert_close(v10[:, 6:], target)  # v1.0: reference ids = target ids
    torch.testing.assert_close(v11[:, 6:], target + torch.tensor([1.0, 1.0, 1.0]))  # v1.1: (1, r+1, c+1)
    torch.testing.assert_close(v11[:, :6], target)


def test_cfg_plain_and_normalised():
    uncond = torch.zeros(1, 2, 64)
    cond = torch.zeros(1, 2, 64)
    cond[0, 0, 0] = 0.5  # small difference: norm < 1, not rescaled
    cond[0, 1, 0] = 4.0  # large difference: divided by 4 ** 0.4
    plain = cfg_combine(cond, uncond, 6.0, normalize=False)
    normed = cfg_combine(cond, uncond, 6.0, normalize=True)
    assert plain[0, 0, 0] == pytest.approx(3.0) and normed[0, 0, 0] == pytest.approx(3.0)
    assert plain[0, 1, 0] == pytest.approx(24.0)
    assert normed[0, 1, 0] == pytest.approx(24.0 / 4.0 ** 0.4)


def test_noise_is_seeded():
    a, b, c = get_noise(8, 10, seed=3), get_noise(8, 10, seed=3), get_noise(8, 10, seed=4)
    assert a.shape == (1, 16, 8, 10)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_img2img_start_index():
    schedule = get_schedule(28, 1024)
    assert img2img_start(schedule, 1.0) == 0
    assert img2img_start(schedule, 0.5) == 14
    with pytest.raises(ValueError, match="strength"):
        img2img_start(schedule, 0.0)
