"""Property tests of the mask math."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from monkey import masks as M
from monkey.args import AUTO, MonkeyArgs
from monkey.maskset import build
from monkey.recorder import RecordedMaps

side = st.integers(1, 40)
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def tensor(draw_shape, elements=finite):
    return arrays("float32", draw_shape, elements=elements).map(torch.from_numpy)


@st.composite
def step_maps(draw, max_steps=4):
    steps = draw(st.integers(1, max_steps))
    n = draw(st.integers(2, 64))
    return draw(tensor((steps, n)))


@given(tensor(st.tuples(st.integers(1, 3), st.integers(1, 50))))
def test_minmax_is_in_unit_range_and_hits_both_ends(maps):
    norm, valid = M.minmax_normalize(maps)
    assert norm.shape == maps.shape and valid.shape == maps.shape[:1]
    assert bool((norm >= 0).all() and (norm <= 1).all())
    for row, ok in zip(norm, valid):
        if ok:
            assert row.min() == 0 and row.max() == 1
        else:
            assert bool((row == 0).all())


def test_flat_nan_and_inf_maps_are_invalid():
    maps = torch.tensor(
        [[0.3, 0.3, 0.3], [0.1, float("nan"), 0.2], [0.1, float("inf"), 0.2], [0.0, 1.0, 0.5]]
    )
    norm, valid = M.minmax_normalize(maps)
    assert valid.tolist() == [False, False, False, True]
    assert torch.isfinite(norm).all()


@given(step_maps(), st.floats(0, 1), st.floats(0, 1))
def test_mask_shrinks_monotonically_as_the_threshold_rises(maps, a, b):
    lo, hi = min(a, b), max(a, b)
    norm, valid = M.minmax_normalize(maps)
    loose, strict = M.union_of_steps(norm, valid, lo), M.union_of_steps(norm, valid, hi)
    assert strict.shape == (maps.shape[1],) and strict.dtype == torch.bool
    assert bool((strict <= loose).all())


@given(step_maps(), st.one_of(st.floats(0, 1), st.just(AUTO)))
def test_image_mask_is_never_empty(maps, threshold):
    norm, valid = M.minmax_normalize(maps)
    mask, status, used = M.image_mask(norm, valid, threshold)
    assert bool(mask.any())
    if not bool(valid.any()):
        assert status is M.MaskStatus.NO_SIGNAL and bool(mask.all()) and used is None
    else:
        assert (status is M.MaskStatus.FULL) == bool(mask.all())


def test_union_over_steps_is_the_papers_mask():
    norm = torch.tensor([[1.0, 0.6, 0.2, 0.0], [0.0, 0.4, 0.5, 1.0]])
    mask = M.union_of_steps(norm, torch.tensor([True, True]), 0.5)
    assert mask.tolist() == [True, True, True, True]
    mask = M.union_of_steps(norm, torch.tensor([True, False]), 0.5)
    assert mask.tolist() == [True, True, False, False]


@given(st.floats(0.05, 0.45), st.floats(0.55, 0.95), st.integers(3, 60), st.integers(3, 60))
def test_otsu_splits_two_clusters_between_them(lo, hi, n_lo, n_hi):
    values = torch.cat([torch.full((n_lo,), lo), torch.full((n_hi,), hi)])
    threshold, between = M.otsu(values)
    assert lo < float(threshold) <= hi + 1 / M.OTSU_BINS
    assert float(between) > 0
    assert int((values >= threshold).sum()) == n_hi


def test_otsu_on_a_constant_map_has_no_separation():
    _, between = M.otsu(torch.full((10,), 0.5))
    assert float(between) == 0


@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 6))
def test_layer_size_inverts_the_unet_downsampling(h, w, level):
    size = (h, w)
    for _ in range(level):
        size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
    assert M.layer_size(size[0] * size[1], (h, w)) == size


def test_layer_size_rejects_lengths_that_fit_no_level():
    with pytest.raises(ValueError, match="fit no UNet level"):
        M.layer_size(100, (64, 64))


@given(side, side, side, side, st.integers(1, 3))
def test_resize_any_size_keeps_range_and_binary_on_growth(h, w, out_h, out_w, batch):
    gen = torch.Generator().manual_seed(h * 1000 + w)
    binary = (torch.rand(batch, h, w, generator=gen) > 0.5).float()
    out = M.resize(binary, (out_h, out_w))
    assert out.shape == (batch, out_h, out_w)
    assert bool((out >= 0).all() and (out <= 1).all())
    if h <= out_h and w <= out_w:
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(out.amax(dim=(1, 2)), binary.amax(dim=(1, 2)))
    assert torch.equal(
        M.resize(torch.zeros(batch, h, w), (out_h, out_w)), torch.zeros(batch, out_h, out_w)
    )
    assert torch.equal(
        M.resize(torch.ones(batch, h, w), (out_h, out_w)), torch.ones(batch, out_h, out_w)
    )


def test_resize_down_by_an_integer_factor_is_the_block_mean():
    mask = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    assert M.resize(mask, (1, 2)).tolist() == [[[0.75, 0.0]]]


def test_resize_non_square_odd_sizes():
    mask = torch.zeros(1, 9, 13)
    mask[0, :5, :7] = 1
    assert M.resize(mask, (5, 7)).shape == (1, 5, 7)
    assert M.resize(mask, (65, 97)).shape == (1, 65, 97)
    assert (
        float(M.resize(mask, (65, 97))[0, 0, 0]) == 1.0
        and float(M.resize(mask, (65, 97))[0, -1, -1]) == 0.0
    )


@given(st.integers(0, 4))
def test_dilate_only_grows(radius):
    gen = torch.Generator().manual_seed(radius)
    mask = (torch.rand(2, 12, 9, generator=gen) > 0.8).float()
    grown = M.dilate(mask, radius)
    assert grown.shape == mask.shape
    assert bool((grown >= mask).all())
    if radius == 0:
        assert torch.equal(grown, mask)


def test_feather_softens_edges_and_keeps_the_inside():
    mask = torch.zeros(1, 20, 20)
    mask[0, 5:15, 5:15] = 1
    soft = M.feather(mask, 1.0)
    assert bool((soft >= 0).all() and (soft <= 1).all())
    assert float(soft[0, 10, 10]) > 0.99 and 0 < float(soft[0, 5, 10]) < 1
    assert torch.equal(M.feather(mask, 0), mask)


def test_ip_weights_keep_the_outside_weight():
    masks = torch.tensor([[1.0, 0.0, 0.5]])
    assert M.ip_weights(masks, 0.0).tolist() == [[1.0, 0.0, 0.5]]
    assert M.ip_weights(masks, 0.2)[0].tolist() == pytest.approx([1.0, 0.2, 0.6])


def test_row_weights_follow_the_row_images():
    per_image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rows = torch.tensor([0, 1, 0, 1])  # cond 0, cond 1, uncond 0, uncond 1
    weights = M.row_weights(per_image, rows)
    assert weights.shape == (4, 2, 1)
    assert weights[:, :, 0].tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]
    with pytest.raises(IndexError):
        M.row_weights(per_image, torch.tensor([2]))


def test_apply_checks_shapes():
    out = torch.ones(2, 4, 3)
    assert M.apply(out, torch.zeros(2, 4, 1)).abs().sum() == 0
    with pytest.raises(ValueError, match="do not match"):
        M.apply(out, torch.zeros(2, 5, 1))


@given(
    st.lists(st.one_of(st.floats(0.05, 0.95), st.just(AUTO)), min_size=1, max_size=4),
    st.integers(0, 3),
)
def test_per_image_thresholds_pick_the_right_images(thresholds, offset):
    images = 4
    gen = torch.Generator().manual_seed(len(thresholds) * 10 + offset)
    maps = torch.rand(images, 3, 6, 5, generator=gen)
    settings = MonkeyArgs(threshold=0.5, thresholds=tuple(thresholds))
    built = build(RecordedMaps(maps, (1, 2, 3), (12, 10), 1, 4), settings, image_offset=offset)
    assert built.binary.shape == (images, 6, 5)
    for image in range(images):
        norm, valid = M.minmax_normalize(maps[image].reshape(3, -1))
        expected, _, _ = M.image_mask(norm, valid, settings.threshold_for(offset + image))
        assert torch.equal(built.binary[image].reshape(-1), expected)


def test_auto_token_picks_the_token_that_separates():
    maps = torch.rand(1, 2, 4, 8, 8) * 0.01  # [images, steps, tokens, h, w]: tokens 0, 1, 3 noise
    maps[0, :, 2, :4, :] += 1.0  # token 2: a clean half-image subject
    built = build(RecordedMaps(maps, (1, 2), (16, 16), None, 4), MonkeyArgs(token=AUTO))
    assert built.tokens == [2]
    assert built.binary[0, :4].all() and not built.binary[0, 4:].any()


def test_unseen_step_maps_fall_back_to_a_full_mask():
    maps = torch.full((1, 2, 4, 4), float("nan"))
    built = build(RecordedMaps(maps, (1, 2), (8, 8), 1, 4), MonkeyArgs())
    assert built.statuses == [M.MaskStatus.NO_SIGNAL] and bool(built.binary.all())
