"""Mask mode ``per_unit`` on each WebUI host: A1111 over sd-webui-controlnet-shaped IP-Adapter
units, Forge over its integrated ControlNet's patches (every unit recorded from its own keys in
its own window, each masked by its own mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_a1111 import assert_clean
from test_webui_hosts import HOSTS, Host
from webui_run import generate, latents, make_p, with_fields

from monkey import maskset
from monkey.args import MonkeyArgs
from monkey.maskset import MaskSet, UnitMasks

SIZE = {"width": 128, "height": 128}
UNITS = [{"seed": 7}, {"seed": 11}]
PER_UNIT = MonkeyArgs(enabled=True, mask_mode="per_unit", threshold=0.3)
SHARED = with_fields(PER_UNIT, mask_mode="shared")


@pytest.fixture(params=list(HOSTS), ids=list(HOSTS))
def host(request) -> Host:
    """Each test with this fixture runs on A1111 and on Forge."""
    return HOSTS[request.param]


def run(webui, settings, *, units=UNITS, api=True, make=make_p, **kwargs):
    p = make(webui, settings, units=units, **{**SIZE, **kwargs})
    p.is_api = api
    return p, generate(webui, p)


def statuses(processed, n: int) -> list[str]:
    """Each image's ``MONKEY status`` value (the kept maps' id, which names the mask mode too,
    follows it as a field of its own)."""
    return [
        text.split("MONKEY status: ")[1].split(", MONKEY maps: ")[0]
        for text in processed.infotexts[:n]
    ]


def per_unit_masks(processed, n_images: int, n_units: int = 2) -> list[list[np.ndarray]]:
    """The API's plain masks: after the images, per image an overlay then each unit's mask."""
    previews = processed.images[n_images:]
    assert len(previews) == n_images * (1 + n_units)
    out = []
    for image in range(n_images):
        overlay, *masks = previews[image * (1 + n_units) : (image + 1) * (1 + n_units)]
        assert overlay.mode == "RGB" and overlay.size == processed.images[image].size
        assert all(m.mode == "L" for m in masks)
        out.append([np.asarray(m) > 127 for m in masks])
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 2},
        {"batch_size": 2, "enable_hr": True, "steps": 8},
        {"batch_size": 2, "img2img": True},
    ],
    ids=["batch2", "hires", "img2img"],
)
def test_each_image_gets_two_disjoint_regions_covering_each_units_own(webui, host, kwargs):
    p, processed = run(webui, PER_UNIT, make=host.make_p, **kwargs)
    masks = per_unit_masks(processed, 2)
    alone = []
    for unit in (0, 1):
        _, shared = run(webui, with_fields(SHARED, source_unit=unit), make=host.make_p, **kwargs)
        alone.append([np.asarray(image) > 127 for image in shared.images[2:4]])
    for image, (a, b) in enumerate(masks):
        assert a.any() and b.any() and not (a & b).any()
        assert np.array_equal(a | b, alone[0][image] | alone[1][image])
    for text in statuses(processed, 2):
        assert text.startswith('"unit 0: masked') and "; unit 1: masked" in text
        assert "token 1 of 4" in text
    assert not webui.errors
    host.assert_clean(webui, p)


def test_the_gallery_shows_one_colour_preview_per_image(webui, host):
    settings = with_fields(PER_UNIT, save_masks=True)
    _, processed = run(webui, settings, api=False, make=host.make_p, batch_size=2)
    assert len(processed.images) == 2 + 2
    overlay = np.asarray(processed.images[2]).astype(int)
    generated = np.asarray(processed.images[0]).astype(int)
    assert overlay.shape == generated.shape and not np.array_equal(overlay, generated)
    masks = [s for s in webui.saved if "monkey" in s["suffix"]]
    assert (
        sorted(s["suffix"] for s in masks)
        == ["-monkey-mask-unit0"] * 2 + ["-monkey-mask-unit1"] * 2
    )
    assert all(set(np.unique(np.asarray(s["image"]))) <= {0, 255} for s in masks)


def test_swapping_the_units_swaps_the_masks(webui, host):
    _, forward = run(webui, PER_UNIT, make=host.make_p)
    _, swapped = run(webui, PER_UNIT, units=UNITS[::-1], make=host.make_p)
    (a, b), (swapped_a, swapped_b) = per_unit_masks(forward, 1)[0], per_unit_masks(swapped, 1)[0]
    assert np.array_equal(a, swapped_b) and np.array_equal(b, swapped_a)


def test_all_ones_for_every_unit_is_plain_ip_adapter_with_both_units(webui, host, monkeypatch):
    plain = host.make_p(webui, monkey=False, units=UNITS, batch_size=2, **SIZE)
    generate(webui, plain)
    built = []

    def full_units(recorded, n_units, n_images, args, image_offset=0):
        built.append((n_units, sorted(recorded)))
        return UnitMasks([MaskSet.full(n_images) for _ in range(n_units)], [4] * n_units)

    monkeypatch.setattr(maskset, "build_units", full_units)
    settings = with_fields(PER_UNIT, ip_off_outside=False)
    p, _ = run(webui, settings, make=host.make_p, batch_size=2)
    assert built == [(2, [0, 1])]  # both units recorded
    assert torch.equal(latents(p), latents(plain))


def test_each_unit_is_multiplied_by_its_own_mask(webui, host, monkeypatch):
    """Unit 0 everywhere, unit 1 nowhere, at every step: pass 2 is unit 0 alone."""
    only_first = host.make_p(webui, monkey=False, units=UNITS[:1], **SIZE)
    generate(webui, only_first)

    def first_unit_only(recorded, n_units, n_images, args, image_offset=0):
        none = MaskSet.full(n_images)
        none.binary = torch.zeros_like(none.binary)
        return UnitMasks([MaskSet.full(n_images), none], [4, 4])

    monkeypatch.setattr(maskset, "build_units", first_unit_only)
    p, _ = run(webui, with_fields(PER_UNIT, apply_start=0.0, apply_end=1.0), make=host.make_p)
    # Forge: text + (unit 0's output - text), equal to unit 0's output up to rounding
    assert (latents(p) - latents(only_first)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "silent",
    [{"seed": 11, "blank": True}, {"seed": 11, "start": 0.9, "end": 1.0}],
    ids=["flat-map", "never-recorded"],
)
def test_a_unit_without_attention_signal_stays_plain_and_says_so(webui, host, silent):
    p, processed = run(webui, PER_UNIT, units=[UNITS[0], silent], make=host.make_p)
    (text,) = statuses(processed, 1)
    assert text.startswith('"unit 0: masked')
    assert "unit 1: no attention signal, kept plain IP-Adapter" in text
    (first, second), *_ = per_unit_masks(processed, 1)
    assert first.any() and not first.all() and second.all()
    _, alone = run(webui, SHARED, units=[UNITS[0], silent], make=host.make_p)
    assert np.array_equal(first, np.asarray(alone.images[1]) > 127)  # unit 0 as if alone
    host.assert_clean(webui, p)


def test_shared_mode_is_todays_behaviour_bit_for_bit(webui):
    old_api = make_p(webui, script_args=[True, 0.3], units=UNITS, batch_size=2, **SIZE)
    generate(webui, old_api)  # an argument list from before mask_mode: shared by default
    p, processed = run(webui, SHARED, batch_size=2)
    assert torch.equal(latents(p), latents(old_api))
    assert "MONKEY mask mode: shared" in processed.infotexts[0]
    assert statuses(processed, 1)[0].startswith('"masked')


def test_one_unit_per_unit_equals_shared_bit_for_bit(webui, host):
    shared, shared_out = run(webui, SHARED, units=UNITS[:1], make=host.make_p, batch_size=2)
    per_unit, per_unit_out = run(webui, PER_UNIT, units=UNITS[:1], make=host.make_p, batch_size=2)
    assert torch.equal(latents(per_unit), latents(shared))
    assert statuses(per_unit_out, 2) == [f'"unit 0: {text[1:]}' for text in statuses(shared_out, 2)]


def test_unit_thresholds_reach_their_unit(webui, host):
    _, processed = run(webui, with_fields(PER_UNIT, thresholds=("unit1=0.8",)), make=host.make_p)
    (text,) = statuses(processed, 1)
    first, second = text.split("; unit 1:")
    assert "threshold 0.30" in first and "threshold 0.80" in second


def test_units_whose_weight_is_zero_at_the_layer_record_from_their_own_projected_keys(webui):
    from fake_controlnet import style_transfer_sd1

    units = [{**unit, "weight": style_transfer_sd1()} for unit in UNITS]
    p, processed = run(webui, PER_UNIT, units=units)
    ((a, b),) = per_unit_masks(processed, 1)
    assert a.any() and b.any() and not (a & b).any()
    (text,) = statuses(processed, 1)
    assert "unit 0: masked" in text and "unit 1: masked" in text
    assert "where its IP-Adapter weight is 0 (output_blocks.4.1)" in text
    assert_clean(webui, p)
