"""Row -> image mapping for every batch layout the hosts produce."""

from __future__ import annotations

import pytest

from monkey.rows import RowLayout, RowTracker


def rows_of(layout: RowLayout, calls: list[int]) -> list[list[tuple[int, bool]]]:
    tracker = RowTracker(layout)
    tracker.new_denoiser_call()
    out = []
    for n in calls:
        rows = tracker.unet_call(n, (8, 8))
        out.append(list(zip(rows.images.tolist(), rows.cond.tolist())))
    return out


C, U = True, False


def test_webui_single_call_cond_then_uncond():
    assert rows_of(RowLayout.webui([1, 1, 1]), [6]) == [
        [(0, C), (1, C), (2, C), (0, U), (1, U), (2, U)]
    ]


def test_webui_split_calls_when_batch_cond_uncond_is_off():
    assert rows_of(RowLayout.webui([1, 1]), [2, 2]) == [[(0, C), (1, C)], [(0, U), (1, U)]]


def test_webui_and_prompts_repeat_cond_rows():
    layout = RowLayout.webui([2, 1])
    assert rows_of(layout, [5]) == [[(0, C), (0, C), (1, C), (0, U), (1, U)]]


def test_webui_skipped_uncond_and_edit_model_blocks():
    assert rows_of(RowLayout.webui([1, 1]), [2]) == [[(0, C), (1, C)]]  # NGMS: cond rows only
    assert rows_of(RowLayout.webui([1, 1]), [6]) == [
        [(0, C), (1, C), (0, U), (1, U), (0, U), (1, U)]
    ]


def test_diffusers_uncond_first_and_without_cfg():
    assert rows_of(RowLayout.diffusers(2, cfg=True), [4]) == [[(0, U), (1, U), (0, C), (1, C)]]
    assert rows_of(RowLayout.diffusers(2, cfg=False), [2]) == [[(0, C), (1, C)]]


def test_a_new_denoiser_call_restarts_the_count():
    tracker = RowTracker(RowLayout.webui([1, 1]))
    tracker.unet_call(2, (4, 4))
    tracker.new_denoiser_call()
    assert tracker.unet_call(2, (4, 4)).cond.tolist() == [True, True]


def test_every_image_needs_a_cond_row():
    with pytest.raises(ValueError, match="repeats"):
        RowLayout.webui([1, 0])


def test_chunked_calls_say_what_their_rows_are():
    tracker = RowTracker(RowLayout.webui([1, 1]))
    rows = tracker.chunks([False, True, True], 2, (4, 4))  # uncond first, then two AND prompts
    pairs = list(zip(rows.images.tolist(), rows.cond.tolist()))
    assert pairs == [(0, U), (1, U), (0, C), (1, C), (0, C), (1, C)]
    assert tracker.chunks([True], 2, (4, 4)).cond.tolist() == [True, True]  # cond-only call
    assert tracker.chunks([False, True, True], 2, (4, 4)) is rows  # same rows, same object
    with pytest.raises(ValueError, match="chunks of 3 rows"):
        tracker.chunks([True], 3, (4, 4))
