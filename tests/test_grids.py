"""Masks between the recording layer, the latent and every layer, by the UNet's grid arithmetic.

A level-k cell ``(y, x)`` is the latent cells ``[y·2^k, (y+1)·2^k) × [x·2^k, (x+1)·2^k)`` clipped to
the latent; the references below compute that by scattering each latent cell into its coarse cell
(no padding, no blocks), a different route from ``M.regrid``'s.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from monkey import masks as M
from monkey.args import MonkeyArgs
from monkey.maskset import MaskSet, build
from monkey.recorder import RecordedMaps

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


def layer_weights(masks: MaskSet, latent_hw: tuple[int, int], level: int) -> torch.Tensor:
    h, w = ceil_level(latent_hw, level)
    out = masks.weights(h * w, latent_hw, torch.device("cpu"))
    assert out.shape == (masks.n_images, h * w)
    return out.reshape(masks.n_images, h, w)


# -- MaskSet: recording grid -> latent -> every layer ---------------------------------------------


@pytest.mark.parametrize("latent_hw", LATENT_CASES)
@given(seed=seeds)
def test_the_recorded_mask_comes_back_unchanged_at_the_recording_layer(latent_hw, seed):
    binary = random_binary(seed, ceil_level(latent_hw, RECORD_LEVEL))
    masks = MaskSet(binary, [M.MaskStatus.OK] * 2, [0.5] * 2, [1] * 2)
    back = layer_weights(masks, latent_hw, RECORD_LEVEL)
    assert torch.equal(back, binary.float())


@pytest.mark.parametrize("latent_hw", LATENT_CASES)
@settings(max_examples=15)
@given(seed=seeds)
def test_latent_cells_take_their_recording_cells_value(latent_hw, seed):
    for record_level in SD1_LEVEL_NUMBERS:
        binary = random_binary(seed, ceil_level(latent_hw, record_level))
        masks = MaskSet(binary, [M.MaskStatus.OK] * 2, [0.5] * 2, [1] * 2, latent_hw=latent_hw)
        latent = masks.latent_masks(latent_hw)
        assert latent.shape == (2, *latent_hw)
        rows = torch.arange(latent_hw[0]) >> record_level
        cols = torch.arange(latent_hw[1]) >> record_level
        assert torch.equal(latent, binary[:, rows[:, None], cols[None, :]].float())
        back = layer_weights(masks, latent_hw, record_level)
        assert torch.equal(back, binary.float()), f"recorded at level {record_level}"


# dilating and feathering cost a convolution per example: fewer examples, every level each
@pytest.mark.parametrize("latent_hw", LATENT_CASES)
@pytest.mark.parametrize("dilate_px", [0, 16], ids=["no-dilate", "dilate16"])
@settings(max_examples=15)
@given(seed=seeds)
def test_every_layer_is_the_block_mean_and_binary_down_to_the_recording_layer(
    latent_hw, dilate_px, seed
):
    binary = random_binary(seed, ceil_level(latent_hw, RECORD_LEVEL))
    masks = MaskSet(binary, [M.MaskStatus.OK] * 2, [0.5] * 2, [1] * 2, dilate_px=dilate_px)
    latent = masks.latent_masks(latent_hw)
    assert set(latent.unique().tolist()) <= {0.0, 1.0}
    for level in SD1_LEVEL_NUMBERS:
        layer = layer_weights(masks, latent_hw, level)
        reference = block_reference(latent, level, "mean")
        assert torch.allclose(layer.double(), reference, atol=1e-6), f"level {level}"
        if level <= RECORD_LEVEL and not dilate_px:  # each block lies in one recorded cell
            d = RECORD_LEVEL - level
            rows, cols = torch.arange(layer.shape[-2]) >> d, torch.arange(layer.shape[-1]) >> d
            assert torch.equal(layer, binary[:, rows[:, None], cols[None, :]].float())


@pytest.mark.parametrize("latent_hw", LATENT_CASES)
@settings(max_examples=15)
@given(seed=seeds, feather_px=st.integers(1, 48))
def test_feathered_layers_are_block_means_in_unit_range(latent_hw, seed, feather_px):
    binary = random_binary(seed, ceil_level(latent_hw, RECORD_LEVEL))
    masks = MaskSet(binary, [M.MaskStatus.OK] * 2, [0.5] * 2, [1] * 2, feather_px=feather_px)
    latent = masks.latent_masks(latent_hw)
    for level in SD1_LEVEL_NUMBERS:
        layer = layer_weights(masks, latent_hw, level)
        assert bool((layer >= 0).all() and (layer <= 1).all()), f"level {level}"
        reference = block_reference(latent, level, "mean")
        assert torch.allclose(layer.double(), reference, atol=1e-6), f"level {level}"
        # blocks wholly inside or outside the subject keep exactly 1 and 0
        inside = -block_reference(-latent, level, "max") == 1
        outside = block_reference(latent, level, "max") == 0
        assert bool((layer[inside] == 1).all() and (layer[outside] == 0).all()), f"level {level}"


@pytest.mark.parametrize("latent_hw", LATENT_CASES)
@pytest.mark.parametrize("level", SD1_LEVELS)
def test_layer_shapes_are_the_unets_round_up_halvings(latent_hw, level):
    expected = ceil_level(latent_hw, level)
    assert M.level_size(latent_hw, level) == expected
    assert M.layer_size(expected[0] * expected[1], latent_hw) == expected
    assert M.level_of(expected, latent_hw) == level or expected == (1, 1)
    masks = MaskSet.full(3, ceil_level(latent_hw, RECORD_LEVEL))
    assert layer_weights(masks, latent_hw, level).shape == (3, *expected)
    assert bool((layer_weights(masks, latent_hw, level) == 1).all())


@pytest.mark.parametrize("latent_hw", LATENT_CASES)
def test_build_keeps_pass_ones_latent_and_rejects_a_grid_of_another(latent_hw):
    hw = ceil_level(latent_hw, RECORD_LEVEL)
    maps = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    built = build(RecordedMaps(maps, (1, 2, 3), latent_hw, 1, 4), MonkeyArgs(threshold=0.5))
    assert built.latent_hw == latent_hw
    assert torch.equal(layer_weights(built, latent_hw, RECORD_LEVEL), built.binary.float())
    wrong = torch.rand(2, 3, hw[0] + 1, hw[1], generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no UNet level"):
        build(RecordedMaps(wrong, (1, 2, 3), latent_hw, 1, 4), MonkeyArgs(threshold=0.5))


@pytest.mark.parametrize(
    ("hires", "exact"),
    [pytest.param(2.0, True, id="hires-x2"), pytest.param(1.5, False, id="hires-x1.5")],
)
def test_a_hires_latent_resizes_pass_ones_latent_mask(hires, exact):
    base = (64, 65)
    binary = random_binary(7, ceil_level(base, RECORD_LEVEL))
    masks = MaskSet(binary, [M.MaskStatus.OK] * 2, [0.5] * 2, [1] * 2, latent_hw=base)
    big = (round(base[0] * hires), round(base[1] * hires))
    latent = masks.latent_masks(big)
    assert latent.shape == (2, *big) and set(latent.unique().tolist()) <= {0.0, 1.0}
    if exact:  # twice the size: cell i is pass 1's latent cell i // 2
        assert torch.equal(latent, M.regrid(masks.latent_masks(base), big))
    for level in range(4):  # every hires layer: block means of the hires latent mask
        layer = layer_weights(masks, big, level)
        assert torch.allclose(layer.double(), block_reference(latent, level, "mean"), atol=1e-6)


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


# -- the reference's per-layer masks ---------------------------------------------------------------


def reference_layer_masks(binary: torch.Tensor, size: tuple[int, int], tokens: list[int]):
    """What the reference code (jamesBaker361/monkey at 3dbb7ce, ``main_seg.py``) hands each
    layer for the recorded mask ``binary [h, w]``: 255 where kept, nearest-upsampled to the image
    size, clamped to 1, ``IPAdapterMaskProcessor.preprocess``-ed, then resized per layer by
    diffusers' own ``IPAdapterMaskProcessor.downsample`` (bicubic), as its processors do."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    mask = F.interpolate(binary.float()[None, None] * 255, size=size, mode="nearest")[0, 0]
    mask[mask > 1] = 1.0
    prepared = IPAdapterMaskProcessor().preprocess(mask)  # [1, 1, H, W]
    return [IPAdapterMaskProcessor.downsample(prepared[:, 0], 1, n, 1)[0, :, 0] for n in tokens]


@pytest.mark.parametrize(
    "size",
    [(256, 256), (512, 512), (768, 768), (320, 320), (256, 384)],
    ids=["256px", "512px", "768px", "320px-odd-5x5-middle", "384x256px"],
)
def test_every_layer_gets_the_reference_codes_mask(size):
    """At the paper's layer (level 2) on SD1's four levels: levels 0-2 are copies, the middle
    block (level 3, 5×5 at 320 px) the mean of each 2×2 block: the reference's bicubic values."""
    latent_hw = (size[0] // 8, size[1] // 8)
    gen = torch.Generator().manual_seed(sum(size))
    binary = torch.rand(*ceil_level(latent_hw, RECORD_LEVEL), generator=gen) < 0.5
    masks = MaskSet(binary[None], [M.MaskStatus.OK], [0.5], [1], latent_hw=latent_hw)
    tokens = [math.prod(ceil_level(latent_hw, level)) for level in SD1_LEVEL_NUMBERS]
    expected = reference_layer_masks(binary, size, tokens)
    for level, (n, reference) in enumerate(zip(tokens, expected)):
        ours = masks.weights(n, latent_hw, torch.device("cpu"))[0]
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6, msg=f"level {level}")
    assert set(expected[3].unique().tolist()) - {0.0, 1.0}  # the middle block is soft
    ones = MaskSet(torch.ones_like(binary)[None], [M.MaskStatus.FULL], [0.0], [1])
    for n in tokens:  # all-ones stays exactly 1: plain IP-Adapter
        assert torch.equal(ones.weights(n, latent_hw, torch.device("cpu")), torch.ones(1, n))
