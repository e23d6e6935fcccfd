"""The accordion's live mask preview: drawn from the kept maps, redrawn as the sliders move."""

from __future__ import annotations

import numpy as np
from webui_run import generate, make_p

from monkey.args import MonkeyArgs
from monkey.kept import STORE
from monkey.webui import preview

SIZE = {"width": 64, "height": 64}


def test_nothing_kept_yet_shows_nothing(webui):
    assert preview.on_change(0.5, "", 0, 0, 0.0) is None


def test_the_mask_panel_follows_the_threshold_and_the_heatmap_stays(webui):
    generate(webui, make_p(webui, MonkeyArgs(enabled=True), batch_size=2, **SIZE))
    low = np.asarray(preview.on_change(0.1, "", 0, 0, 0.0))
    high = np.asarray(preview.on_change(0.9, "", 0, 0, 0.0))
    assert low.shape == (64, 4 * 64, 3)  # two images, (heatmap | mask) each
    heat, mask = low[:, :64], low[:, 64:128]
    assert np.array_equal(heat, high[:, :64])  # the map does not depend on the settings
    assert mask.sum() > high[:, 64:128].sum()  # a lower threshold keeps more of the image
    grown = np.asarray(preview.on_change(0.9, "", 16, 0, 0.0))
    assert grown[:, 64:128].sum() > high[:, 64:128].sum()  # dilate grows it
    assert preview.on_change(0.5, "0.5, nonsense", 0, 0, 0.0) is None  # half-typed: keep


def test_the_preview_mask_is_the_mask_pass_two_applies(webui):
    processed = generate(webui, make_p(webui, MonkeyArgs(enabled=True, threshold=0.3), **SIZE))
    drawn = np.asarray(preview.on_change(0.3, "", 0, 0, 0.0))[:, 64:].astype(float)
    mask = np.asarray(processed.images[1]) > 127  # the mask preview after the image
    base = STORE.latest().images[0].numpy().astype(float)
    assert np.allclose(drawn[mask], base[mask], atol=1)  # subject: the image at full brightness
    assert np.allclose(drawn[~mask], base[~mask] * preview.DIM, atol=1)


def test_per_unit_draws_a_row_per_unit(webui):
    settings = MonkeyArgs(enabled=True, mask_mode="per_unit")
    generate(webui, make_p(webui, settings, units=[{"seed": 7}, {"seed": 11}], **SIZE))
    assert np.asarray(preview.on_change(0.5, "", 0, 0, 0.0)).shape == (128, 128, 3)


def test_the_sliders_redraw_the_preview(webui):
    p = make_p(webui, MonkeyArgs(enabled=True), **SIZE)
    threshold = p.monkey_script.controls[1]
    ((args, kwargs),) = threshold.changes
    assert args[0] is preview.on_change and len(kwargs["inputs"]) == len(preview.PREVIEW_FIELDS)
    assert kwargs["outputs"][0].elem_id.endswith("mask_preview")
