"""Masks between the recording layer, the latent and every layer, by the UNet's grid arithmetic.

A level-k cell ``(y, x)`` is the latent cells ``[y·2^k, (y+1)·2^k) × [x·2^k, (x+1)·2^k)`` clipped to
the latent; the references below compute that by scattering each latent cell into its coarse cell
(no padding, no blocks), a different route from ``M.regrid``'s.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from monkey import masks as M

LATENTS = {
    # A1111 writes width×height; the latent is (height, width) / 8
    "520x512px": (64, 65),
    "536x536px": (67, 67),
    "776x568px": (71, 97),
    "1080x720px": (90, 135),
    "72x56latent": (72, 56),
}
LATENT_CASES = [
    pytest.param(hw if not flip else hw[::-1], id=name + ("-T" if flip else ""))
    for name, hw in LATENTS.items()
    for flip in (False, True)
    if not (flip and hw[0] == hw[1])
]
SD1_LEVEL_NUMBERS = range(4)  # SDXL uses levels 0..2
SD1_LEVELS = [pytest.param(k, id=f"level{k}") for k in SD1_LEVEL_NUMBERS]
RECORD_LEVEL = 2  # the paper's layer: output_blocks at 1/4 of the latent
seeds = st.integers(0, 2**31 - 1)


def random_binary(seed: int, hw: tuple[int, int], images: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    density = torch.rand(images, 1, 1, generator=gen) * 0.9 + 0.05
    return torch.rand(images, *hw, generator=gen) < density


def ceil_level(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    return math.ceil(latent_hw[0] / 2**level), math.ceil(latent_hw[1] / 2**level)


def block_reference(fine: torch.Tensor, d: int, reduce: str) -> torch.Tensor:
    """``[B, h, w]`` -> the coarse grid ``d`` halvings up, each latent cell scattered into
    coarse cell ``(i >> d, j >> d)``."""
    b, h, w = fine.shape
    out_h, out_w = ceil_level((h, w), d)
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    index = ((ii >> d) * out_w + (jj >> d)).reshape(1, -1).expand(b, -1)
    out = torch.zeros(b, out_h * out_w, dtype=torch.float64)
    how = "amax" if reduce == "max" else "mean"
    out = out.scatter_reduce(1, index, fine.double().reshape(b, -1), how, include_self=False)
    return out.reshape(b, out_h, out_w)


# -- regrid: the arithmetic itself, for masks and for the recorder's soft maps ---------------------

grid_sides = st.integers(1, 140)


@given(h=grid_sides, w=grid_sides, d=st.integers(0, 4), seed=seeds)
def test_regrid_down_is_the_clipped_block_max_or_mean(h, w, d, seed):
    fine = torch.rand(2, h, w, generator=torch.Generator().manual_seed(seed))
    coarse = ceil_level((h, w), d)
    assert torch.equal(M.regrid(fine, coarse, "max").double(), block_reference(fine, d, "max"))
    mean = M.regrid(fine, coarse, "mean")
    assert mean.shape == (2, *coarse)
    assert torch.allclose(mean.double(), block_reference(fine, d, "mean"), atol=1e-6)


@given(h=grid_sides, w=grid_sides, d=st.integers(0, 4), seed=seeds)
def test_regrid_up_gathers_and_comes_back_unchanged(h, w, d, seed):
    coarse_hw = ceil_level((h, w), d)
    # [B, T, h, w]: the recorder's all-token maps have a token axis
    coarse = torch.randn(2, 3, *coarse_hw, generator=torch.Generator().manual_seed(seed))
    fine = M.regrid(coarse, (h, w))
    assert fine.shape == (2, 3, h, w) and fine.dtype == coarse.dtype
    rows, cols = torch.arange(h) >> d, torch.arange(w) >> d
    assert torch.equal(fine, coarse[..., rows[:, None], cols[None, :]])
    assert torch.equal(M.regrid(fine, coarse_hw, "max"), coarse)
    assert torch.allclose(M.regrid(fine, coarse_hw, "mean"), coarse, atol=1e-6)


def test_regrid_keeps_bool_masks_bool():
    mask = torch.tensor([[[True, False, False], [False, False, False], [False, False, True]]])
    assert M.regrid(mask, (2, 2), "max").tolist() == [[[True, False], [False, True]]]
    assert M.regrid(mask[:, :2, :2], (3, 3)).dtype == torch.bool


def test_regrid_mean_divides_edge_blocks_by_their_own_cells():
    fine = torch.tensor([[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]])
    # 3×3 -> 2×2: blocks of 4, 2, 2 and 1 cells
    assert M.regrid(fine, (2, 2), "mean").tolist() == [[[1.0, 1.0], [0.0, 1.0]]]


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        pytest.param((64, 65), (17, 17), id="no-level"),
        pytest.param((64, 64), (32, 16), id="two-levels"),
        pytest.param((16, 16), (32, 8), id="up-and-down"),
        pytest.param((9, 9), (19, 19), id="up-not-a-level"),
    ],
)
def test_regrid_rejects_grids_that_are_no_levels_of_each_other(src, dst):
    with pytest.raises(ValueError, match="no UNet level"):
        M.regrid(torch.zeros(1, *src), dst)


def test_regrid_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match="reduce must be one of"):
        M.regrid(torch.zeros(1, 4, 4), (2, 2), "sum")


@given(h=st.integers(1, 300), w=st.integers(1, 300), level=st.integers(0, 9))
def test_level_of_inverts_level_size(h, w, level):
    hw = M.level_size((h, w), level)
    found = M.level_of(hw, (h, w))
    assert M.level_size((h, w), found) == hw and found <= level


def test_level_of_names_the_levels_there_are():
    with pytest.raises(ValueError, match=r"65×64, 33×32, 17×16, 9×8"):
        M.level_of((17, 17), (65, 64))


@pytest.mark.parametrize("latent_hw", LATENT_CASES)
def test_the_preview_at_8_px_per_latent_cell_is_the_same_gather(latent_hw):
    # a1111_images resizes the latent mask to image pixels; at 8 px a cell that is index
    # arithmetic too (pixel i is latent cell i >> 3), so the preview shows what pass 2 used
    latent = random_binary(3, latent_hw).float()
    pixels = (latent_hw[0] * 8, latent_hw[1] * 8)
    rows, cols = torch.arange(pixels[0]) >> 3, torch.arange(pixels[1]) >> 3
    assert torch.equal(M.resize(latent, pixels), latent[:, rows[:, None], cols[None, :]])
