"""Reusing pass 1 in the A1111 host: bit-identical to running it, and never when it would differ."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from webui_run import UNetCalls, generate, latents, make_p, with_fields

from monkey.args import MAPS_LABEL, MonkeyArgs
from monkey.kept import STORE

ON = MonkeyArgs(enabled=True)
SIZE = {"width": 64, "height": 64}
TUNED = {"threshold": 0.3, "dilate": 8, "outside_weight": 0.2, "ip_off_outside": False}
"""Every kind of mask setting changed at once: none of them needs a new pass 1."""
TWO_UNITS = [{"seed": 7}, {"seed": 11}]


@pytest.fixture(autouse=True)
def empty_store():
    STORE.clear()
    yield
    STORE.clear()


def set_reuse(webui, on: bool) -> None:
    webui.shared.opts.data["monkey_reuse_pass1"] = on


def run(webui, settings: MonkeyArgs, **kwargs):
    """One generation; returns (p, processed, UNet calls' latent sizes)."""
    p = make_p(webui, settings, **{**SIZE, **kwargs})
    calls = UNetCalls(p.sd_model.model.diffusion_model)
    try:
        processed = generate(webui, p)
    finally:
        calls.close()
    assert not webui.errors, webui.errors
    return p, processed, calls.sizes


def pixels(processed) -> list[np.ndarray]:
    return [np.asarray(image) for image in processed.images]


def status_of(processed, index: int = 0) -> str:
    return processed.infotexts[index].split("MONKEY status: ", 1)[1]


CASES = {
    "euler-a": ({}, {}),
    "heun": ({}, {"sampler_name": "Heun"}),
    "dpm2": ({}, {"sampler_name": "DPM2"}),
    "batch-size-and-count": ({}, {"batch_size": 2, "n_iter": 2}),
    "hires": ({}, {"enable_hr": True}),
    "img2img": ({}, {"img2img": True}),
    "short-pass-1": ({"pass1_steps": 0.5}, {}),
    "two-units-shared": ({"source_unit": 1}, {"units": TWO_UNITS}),
    "two-units-per-unit": ({"mask_mode": "per_unit"}, {"units": TWO_UNITS}),
}


@pytest.mark.parametrize(("settings", "kwargs"), list(CASES.values()), ids=list(CASES))
def test_a_mask_change_reuses_pass_one_pixel_identical_to_running_it(webui, settings, kwargs):
    base = with_fields(ON, **settings)
    tuned = with_fields(base, **TUNED)
    _, first, first_calls = run(webui, base, **kwargs)
    ids = {text.split(f"{MAPS_LABEL}: ", 1)[1].split(",")[0] for text in first.infotexts}
    assert len(ids) == kwargs.get("n_iter", 1)  # one id per batch, on each of its images
    _, reused, reused_calls = run(webui, tuned, **kwargs)
    set_reuse(webui, False)
    _, fresh, fresh_calls = run(webui, tuned, **kwargs)
    assert all("pass 1 reused" in status_of(reused, i) for i in range(len(reused.infotexts)))
    assert not any("pass 1 reused" in text for text in fresh.infotexts)
    # pass 1 cost no UNet call: every call of the reused generation is one of pass 2's
    assert len(reused_calls) == len(fresh_calls) - (len(first_calls) - len(reused_calls))
    assert len(reused_calls) < len(fresh_calls)
    for a, b in zip(pixels(reused), pixels(fresh), strict=True):
        assert np.array_equal(a, b)
    unreused = [
        re.sub(r"pass 1 reused \((recorded steps [^)]*)\)", r"\1", status_of(reused, i))
        for i in range(len(reused.infotexts))
    ]
    assert unreused == [status_of(fresh, i) for i in range(len(fresh.infotexts))]


def test_reuse_compares_latents_bit_for_bit(webui):
    run(webui, ON)
    p_reused, _, _ = run(webui, with_fields(ON, threshold=0.3))
    set_reuse(webui, False)
    p_fresh, _, _ = run(webui, with_fields(ON, threshold=0.3))
    assert torch.equal(latents(p_reused), latents(p_fresh))


def lora(prompt: str) -> str:
    return f"{prompt} <lora:fake:0.8>"


CHANGES = {
    "seed": ({}, {"seed": 2}),
    "prompt": ({}, {"prompt": "a cat in the snow"}),
    "negative prompt": ({}, {"negative_prompt": "blurry"}),
    "lora in the prompt": ({}, {"prompt": lora("a dog on the beach")}),
    "sampler": ({}, {"sampler_name": "Heun"}),
    "steps": ({}, {"steps": 10}),
    "cfg": ({}, {"cfg_scale": 5.0}),
    "size": ({}, {"width": 128}),
    "reference image": ({}, {"units": [{"seed": 8}]}),
    "unit weight": ({}, {"units": [{"seed": 7, "weight": 0.8}]}),
    "unit start": ({}, {"units": [{"seed": 7, "start": 0.1}]}),
    "unit end": ({}, {"units": [{"seed": 7, "end": 0.9}]}),
    "layers": ({"layers": ("output_blocks.5.1.transformer_blocks.0.attn2",)}, {}),
    "token": ({"token": 2}, {}),
    "attention scale": ({"attention_scale": "sdpa"}, {}),
    "record start": ({"record_start": 0.0}, {}),
    "record end": ({"record_end": 0.9}, {}),
    "record steps": ({"record_steps": "all"}, {}),
    "pass 1 steps": ({"pass1_steps": 1.0}, {}),
    "mask mode": ({"mask_mode": "per_unit"}, {}),
}
IMG2IMG_CHANGES = {
    "init image": {"init_seed": 6},
    "denoising strength": {"denoising_strength": 0.8},
}


def test_any_change_to_what_pass_one_sees_runs_pass_one_again(webui):
    """Each single change after one generation: the next generation must run its own pass 1
    (with the threshold changed too, so only pass 1's inputs differ from a reusable one)."""
    run(webui, ON)
    _, same, _ = run(webui, with_fields(ON, threshold=0.3))
    assert "pass 1 reused" in status_of(same)  # the control: nothing changed, reused
    reused = []
    for name, (settings, kwargs) in CHANGES.items():
        _, processed, _ = run(webui, with_fields(ON, threshold=0.3, **settings), **kwargs)
        assert "MONKEY status" in processed.infotexts[0], name
        if "pass 1 reused" in processed.infotexts[0]:
            reused.append(name)
    assert reused == []


def test_a_variation_seed_counts_only_at_a_strength_above_zero(webui):
    """The WebUI draws a new variation seed per call (subseed -1, the API's default); at
    strength 0 it changes nothing, so it must not cost reuse; above 0 it changes the noise."""
    run(webui, ON, subseed=-1)
    _, same, _ = run(webui, with_fields(ON, threshold=0.3), subseed=-1)
    assert "pass 1 reused" in status_of(same)
    run(webui, ON, subseed=5, subseed_strength=0.3)
    _, same, _ = run(webui, with_fields(ON, threshold=0.3), subseed=5, subseed_strength=0.3)
    assert "pass 1 reused" in status_of(same)
    _, other, _ = run(webui, with_fields(ON, threshold=0.3), subseed=6, subseed_strength=0.3)
    assert "pass 1 reused" not in status_of(other)


def test_img2img_changes_to_the_init_image_or_strength_run_pass_one_again(webui):
    run(webui, ON, img2img=True)
    _, same, _ = run(webui, with_fields(ON, threshold=0.3), img2img=True)
    assert "pass 1 reused" in status_of(same)
    for name, kwargs in IMG2IMG_CHANGES.items():
        _, processed, _ = run(webui, with_fields(ON, threshold=0.3), img2img=True, **kwargs)
        assert "pass 1 reused" not in processed.infotexts[0], name


def test_the_source_unit_is_a_record_setting(webui):
    run(webui, ON, units=TWO_UNITS)
    _, other, _ = run(webui, with_fields(ON, source_unit=1), units=TWO_UNITS)
    assert "pass 1 reused" not in other.infotexts[0]


def test_no_kept_maps_means_no_id_and_no_reuse(webui):
    webui.shared.opts.data["monkey_kept_maps"] = 0
    _, first, _ = run(webui, ON)
    _, second, _ = run(webui, with_fields(ON, threshold=0.3))
    assert MAPS_LABEL not in first.infotexts[0] and "pass 1 reused" not in second.infotexts[0]
    assert len(STORE) == 0


def test_the_store_keeps_the_configured_number_of_batches(webui):
    webui.shared.opts.data["monkey_kept_maps"] = 2
    run(webui, ON, n_iter=3)
    assert len(STORE) == 2
    assert STORE.nbytes < 3 * (1 << 20)
    kept = STORE.latest()
    assert kept.size == (64, 64) and kept.images[0].shape == (64, 64, 3)


def test_reuse_off_still_keeps_maps_for_the_api(webui):
    set_reuse(webui, False)
    _, first, _ = run(webui, ON)
    _, second, _ = run(webui, with_fields(ON, threshold=0.3))
    assert MAPS_LABEL in first.infotexts[0] and "pass 1 reused" not in second.infotexts[0]


def test_an_unfingerprintable_backend_never_reuses(webui, monkeypatch):
    from monkey.webui import controlnet as controlnet_backend

    monkeypatch.setattr(
        controlnet_backend.ControlNetBackend, "fingerprint", lambda self, p, batch, fp: None
    )
    run(webui, ON)
    _, second, _ = run(webui, with_fields(ON, threshold=0.3))
    assert "pass 1 reused" not in second.infotexts[0] and MAPS_LABEL not in second.infotexts[0]


def test_a_failing_fingerprint_costs_reuse_not_the_image(webui, monkeypatch):
    from monkey.webui import fingerprint as webui_fingerprint

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(webui_fingerprint, "pass_one", broken)
    _, plain_monkey, _ = run(webui, ON)
    assert "masked" in status_of(plain_monkey)
    assert MAPS_LABEL not in plain_monkey.infotexts[0]


def test_settings_register_the_store_size_and_the_reuse_switch(webui):
    webui.modules["modules.script_callbacks"].fire("ui_settings")
    labels = webui.shared.opts.data_labels
    assert labels["monkey_kept_maps"].default == 32
    assert labels["monkey_reuse_pass1"].default is True


def test_changed_fields_are_exact_for_a_reused_generation(webui):
    """Reuse keeps mask settings the user changed, never the kept ones."""
    run(webui, ON)
    _, tuned, _ = run(webui, dataclasses.replace(ON, threshold=0.9))
    assert "at threshold 0.90" in status_of(tuned)


def test_forge_reuses_pass_one_pixel_identical_and_not_for_another_reference(webui):
    from webui_run import make_forge_p

    def forge_run(settings, **kwargs):
        p = make_forge_p(webui, settings, **{**SIZE, **kwargs})
        return p, generate(webui, p)

    forge_run(ON)
    p_reused, reused = forge_run(with_fields(ON, **TUNED))
    other = forge_run(with_fields(ON, **TUNED), units=[{"seed": 8}])[1]
    set_reuse(webui, False)
    p_fresh, fresh = forge_run(with_fields(ON, **TUNED))
    assert not webui.errors, webui.errors
    assert "pass 1 reused" in status_of(reused) and "pass 1 reused" not in status_of(other)
    assert "pass 1 reused" not in status_of(fresh)
    assert torch.equal(latents(p_reused), latents(p_fresh))
