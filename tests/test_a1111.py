"""The AlwaysOn script in a fake A1111 1.10.1 over real attention and ControlNet-shaped IP-Adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_controlnet import FakeIPAdapter, hacked_attn_forward
from fake_webui import InterruptedException
from webui_run import UNetCalls, generate, latents, make_p, monkey_values, with_fields

from monkey import args as A
from monkey.args import MonkeyArgs, MonkeyArgsError
from monkey.maskset import MaskSet
from monkey.rows import RowLayout
from monkey.session import MonkeySession, Phase
from monkey.webui import controlnet, run, schedule

ON = MonkeyArgs(enabled=True)
SIZE = {"width": 128, "height": 128}  # 16×16 latent: the paper's layer works at 4×4
# threshold 0 keeps every pixel; IP kept outside the window: pass 2 must equal plain IP-Adapter
FULL = MonkeyArgs(enabled=True, threshold=0.0, ip_off_outside=False)


def hacks_of(p) -> dict[str, list]:
    unet = p.sd_model.model.diffusion_model
    return {
        name: list(m.ipadapter_hacks)
        for name, m in unet.named_modules()
        if getattr(m, "ipadapter_hacks", None)
    }


def assert_no_hooks(webui, p) -> None:
    """Nothing of MONKEY's is left patched on the processing object, the UNet or the callbacks."""
    unet = p.sd_model.model.diffusion_model
    assert not any(cb.name == "monkey_step" for cb in webui.callbacks["callbacks_cfg_denoiser"])
    assert not unet._forward_pre_hooks
    for module in unet.modules():
        for fn in getattr(module, "ipadapter_hacks", []):
            assert fn.__name__ != "monkey_ip_hack", "a MONKEY wrapper is still in ipadapter_hacks"
    assert "sample" not in vars(p) or vars(p)["sample"].__name__ != "monkey_sample"
    sampler = getattr(p, "sampler", None)  # the schedule reader is gone from the sampler too
    assert not hasattr(getattr(sampler, "func", None), "__wrapped__")
    assert not run.LIVE_HOOKS


def assert_clean(webui, p) -> None:
    """... and the generation finished: its run state is gone too."""
    assert_no_hooks(webui, p)
    assert not hasattr(p, run.RUN_ATTR)


# -- off, and the fallbacks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("controlnet", "units", "reason"),
    [
        (False, None, "sd-webui-controlnet is not installed"),
        (True, [], "no active IP-Adapter unit"),
    ],
    ids=["no-controlnet", "no-ip-adapter-unit"],
)
def test_nothing_to_mask_runs_untouched_and_says_why(webui, controlnet, units, reason):
    plain = make_p(webui, monkey=False, controlnet=controlnet, units=units, **SIZE)
    generate(webui, plain)
    p = make_p(webui, ON, controlnet=controlnet, units=units, **SIZE)
    processed = generate(webui, p)
    assert torch.equal(latents(p), latents(plain))
    assert any(reason in comment for comment in p.comments)
    assert f'MONKEY status: "skipped: {reason}' in processed.infotexts[0]
    assert len(processed.images) == 1  # no preview for a mask that was never made
    assert not webui.errors
    assert_clean(webui, p)


def test_refiner_is_refused_with_a_message(webui):
    p = make_p(webui, ON, **SIZE)
    p.refiner_checkpoint = "refiner.safetensors"
    processed = generate(webui, p)
    assert "refiner" in processed.infotexts[0]
    assert p.controlnet.process_sample_calls == 1


# -- the two passes --------------------------------------------------------------------------------


def test_two_passes_through_controlnets_sample_with_pass_one_stopped_early(webui):
    p = make_p(webui, ON, steps=8, **SIZE)
    calls = UNetCalls(p.sd_model.model.diffusion_model)
    original_hacks = hacks_of(p)  # empty before ControlNet hooks
    generate(webui, p)
    calls.close()
    assert not original_hacks
    assert p.controlnet.process_sample_calls == 2  # both passes marked cond/uncond prompts
    # pass 1 on its own 4 steps records 1 and 2 (the reference's [1, 2]) and stops before 3
    assert len(calls.sizes) == 3 + 8
    assert webui.state.textinfos == [
        "MONKEY pass 1 of 2: recording the subject mask",
        "MONKEY pass 2 of 2: masked IP-Adapter",
    ]
    assert not webui.errors
    assert_clean(webui, p)


def test_hires_fix_only_in_pass_two_with_the_mask_at_hires_size(webui):
    p = make_p(webui, ON, enable_hr=True, hr_scale=2.0, steps=8, **SIZE)
    calls = UNetCalls(p.sd_model.model.diffusion_model)
    seen_hw = []
    real_weights = MonkeySession.weights

    def spy(self, n_tokens, *args):
        seen_hw.append(self.rows.current.latent_hw)
        return real_weights(self, n_tokens, *args)

    MonkeySession.weights = spy
    try:
        generate(webui, p)
    finally:
        MonkeySession.weights = real_weights
        calls.close()
    base, hires = (16, 16), (32, 32)
    pass1, rest = calls.sizes[:3], calls.sizes[3:]
    assert set(pass1) == {base}  # pass 1: no hires
    assert rest[:8] == [base] * 8 and set(rest[8:]) == {hires} and len(rest[8:]) > 0
    assert hires in seen_hw and base in seen_hw
    assert p.enable_hr is True
    assert_clean(webui, p)


@pytest.mark.parametrize(
    ("batch_cond_uncond", "and_prompts", "expected"),
    [
        (True, 1, [[(0, True), (1, True), (0, False), (1, False)]]),
        (False, 1, [[(0, True), (1, True)], [(0, False), (1, False)]]),
        (True, 2, [[(0, True), (0, True), (1, True), (1, True), (0, False), (1, False)]]),
        (False, 2, [[(0, True), (0, True)], [(1, True), (1, True)], [(0, False), (1, False)]]),
    ],
    ids=["one-call", "split-calls", "AND-one-call", "AND-split-calls"],
)
def test_rows_map_to_their_images_in_every_webui_layout(
    webui, monkeypatch, batch_cond_uncond, and_prompts, expected
):
    # ControlNet caches IP keys from the first UNet call, so the images themselves differ between
    # layouts even without MONKEY; what MONKEY must get right is which image each row is.
    webui.shared.opts.data["batch_cond_uncond"] = batch_cond_uncond
    seen = []
    real = MonkeySession.begin_unet_call

    def spy(self, n_rows, latent_hw):
        rows = real(self, n_rows, latent_hw)
        if self.phase is Phase.APPLY:
            seen.append(list(zip(rows.images.tolist(), rows.cond.tolist())))
        return rows

    monkeypatch.setattr(MonkeySession, "begin_unet_call", spy)
    p = make_p(webui, ON, batch_size=2, and_prompts=and_prompts, steps=4, **SIZE)
    generate(webui, p)
    assert seen[: len(expected)] == expected
    assert len(seen) == 4 * len(expected)
    assert not webui.errors


# -- per-row masking inside ControlNet's attention ---------------------------------------------------


LAYER = "output_blocks.4.1.transformer_blocks.0.attn2"


def hooked_layer(cond_mark: list[float], phase: Phase, repeats: list[int]):
    """A real attn2 with a ControlNet-shaped IP-Adapter hook, and a session at one UNet call."""
    from fake_ldm import TinyLdmUNet

    unet = TinyLdmUNet().eval()
    adapter = FakeIPAdapter(unet, seed=3)
    adapter.hook(unet)
    unet.cond_mark = torch.tensor(cond_mark)[:, None, None, None]
    hack = next(h for h in controlnet.find_ip_hacks(unet) if h.layer == LAYER)
    session = MonkeySession(ON, (LAYER,), RowLayout.webui(repeats))
    if phase is Phase.APPLY:
        image0, image1 = torch.ones(4, 4), torch.zeros(4, 4)
        session.masks = MaskSet(
            torch.stack([image0, image1]).bool(), [None] * 2, [0.5] * 2, [1] * 2
        )
    session.begin(phase)
    session.begin_step(3, 8)  # recorded (steps 3 and 5 of 8) and masked (steps 2-5)
    session.begin_unet_call(len(cond_mark), (16, 16))
    module = unet.get_submodule(LAYER)
    x = torch.randn(len(cond_mark), 16, module.to_q.out_features)
    q = module.to_q(x).view(len(cond_mark), 16, 2, -1).transpose(1, 2)
    return adapter, hack, session, module, x, q


def test_each_row_gets_its_own_images_mask_in_cond_and_uncond_rows():
    _, hack, session, module, x, q = hooked_layer([1.0, 1.0, 0.0, 0.0], Phase.APPLY, [1, 1])
    plain = hack.fn(module, x, q)
    masked = controlnet.wrap(hack, session, 1)(module, x, q)
    assert torch.equal(masked[[0, 2]], plain[[0, 2]])  # cond and uncond rows of image 0: kept
    assert torch.equal(masked[[1, 3]], torch.zeros_like(plain[[1, 3]]))  # image 1: masked out
    assert hacked_attn_forward  # the hacked forward is what calls these in a real run


def test_recording_reads_controlnets_own_cached_keys():
    adapter, hack, session, module, x, q = hooked_layer([1.0, 0.0], Phase.RECORD, [1])
    assert hack.adapter is adapter and hack.number == 7
    out = controlnet.wrap(hack, session, 0)(module, x, q)
    assert torch.equal(out, hack.fn(module, x, q))  # recording leaves ControlNet's output alone
    k = adapter.cache["15_to_k_ip"].view(2, -1, 2, q.shape[-1]).transpose(1, 2)
    probs = torch.softmax(q[:1] @ k[:1].transpose(-1, -2), -1)  # the reference's unscaled map
    recorded = session.recorder.result().maps[0, 0].reshape(1, -1)
    torch.testing.assert_close(recorded, probs[..., 1].mean(1), rtol=0, atol=1e-6)


# -- errors, interrupts, teardown --------------------------------------------------------------------


def failing_unet(p, phase_calls: int):
    """Make the UNet raise on its ``phase_calls``-th call."""
    unet = p.sd_model.model.diffusion_model
    count = {"n": 0}

    def boom(_module, _args):
        count["n"] += 1
        if count["n"] == phase_calls:
            raise RuntimeError("CUDA out of memory (simulated)")

    return unet.register_forward_pre_hook(boom)


@pytest.mark.parametrize(
    ("call", "where"), [(3, "pass 1"), (9, "pass 2")], ids=["in-pass-1", "in-pass-2"]
)
def test_an_exception_inside_a_pass_leaves_nothing_patched(webui, call, where):
    p = make_p(webui, ON, enable_hr=True, steps=8, **SIZE)
    cn_sample = {}
    original_process = p.controlnet.process

    def process_and_remember(p_, *args):
        original_process(p_, *args)
        cn_sample["fn"] = p_.sample

    p.controlnet.process = process_and_remember
    webui.state.reset()
    p.scripts.process(p)  # ControlNet hooks, MONKEY parses: as process_images would
    handle = failing_unet(p, call)
    hacks_before = hacks_of(p)
    p.scripts.before_process_batch(p)
    p.iteration, p.prompts, p.seeds, p.subseeds = 0, ["x"], [1], [0]
    from fake_webui import ImageRNG

    p.rng = ImageRNG((4, 16, 16), p.seeds)
    p.scripts.process_batch(p)
    p.setup_conds()
    with pytest.raises(RuntimeError, match="simulated"):
        p.sample(
            conditioning=p.c,
            unconditional_conditioning=p.uc,
            seeds=p.seeds,
            subseeds=p.subseeds,
            subseed_strength=0,
            prompts=p.prompts,
        )
    handle.remove()
    assert p.sample is cn_sample["fn"]
    assert p.enable_hr is True
    assert hacks_of(p) == hacks_before
    assert not any(cb.name == "monkey_step" for cb in webui.callbacks["callbacks_cfg_denoiser"])
    assert not p.sd_model.model.diffusion_model._forward_pre_hooks
    assert not run.LIVE_HOOKS


def test_interrupt_during_pass_one_skips_pass_two_and_keeps_the_image(webui):
    p = make_p(webui, ON, steps=8, **SIZE)

    def interrupt(params):
        if params.denoiser.step == 2:
            webui.state.interrupted = True

    webui.modules["modules.script_callbacks"].on_cfg_denoiser(interrupt)
    calls = UNetCalls(p.sd_model.model.diffusion_model)
    processed = generate(webui, p)
    calls.close()
    assert len(calls.sizes) == 3  # step 2 finishes, step 3 sees the flag; no pass 2
    assert len(processed.images) == 1 and latents(p).shape == (1, 4, 16, 16)
    assert "interrupted after pass 1" in processed.infotexts[0]
    assert_clean(webui, p)


def test_skip_between_passes_returns_pass_one(webui):
    p = make_p(webui, ON, steps=8, **SIZE)
    real_nextjob = webui.state.nextjob

    def skip_after_pass_one():
        real_nextjob()
        webui.state.skipped = True

    webui.state.nextjob = skip_after_pass_one
    calls = UNetCalls(p.sd_model.model.diffusion_model)
    generate(webui, p)
    calls.close()
    assert len(calls.sizes) == 3  # pass 1 only
    assert_clean(webui, p)


def test_pass_one_ends_with_an_interrupted_exception_that_sampling_catches(webui):
    p = make_p(webui, ON, steps=8, **SIZE)
    generate(webui, p)
    assert not any(isinstance(e, InterruptedException) for e in webui.errors)


# -- settings in and out -----------------------------------------------------------------------------


def test_api_dict_form_and_wrong_values_name_the_field(webui):
    p = make_p(webui, {"enabled": True, "threshold": 0.3}, **SIZE)
    processed = generate(webui, p)
    assert "MONKEY threshold: 0.3" in processed.infotexts[0]
    bad = make_p(webui, {"enabled": True, "threshold": "high"}, **SIZE)
    with pytest.raises(MonkeyArgsError, match="'threshold' got 'high'"):
        generate(webui, bad)
    assert_no_hooks(webui, bad)


def test_api_list_form_partial_keeps_ui_defaults(webui):
    p = make_p(webui, script_args=[True, 0.4], **SIZE)
    processed = generate(webui, p)
    assert "MONKEY threshold: 0.4" in processed.infotexts[0]
    assert "MONKEY token: default" in processed.infotexts[0]
    assert "token 1 of 4" in processed.infotexts[0]  # what 'default' used on a 4-token adapter


def test_unknown_mask_layer_is_a_clear_error(webui):
    p = make_p(
        webui, with_fields(ON, layers=("output_blocks.4.1.transformer_blocks.5.attn2",)), **SIZE
    )
    with pytest.raises(MonkeyArgsError, match="'layers'"):
        generate(webui, p)
    assert_no_hooks(webui, p)


def test_infotext_round_trips_through_the_webui_parser_and_paste_fields(webui):
    settings = MonkeyArgs(
        enabled=True, threshold=0.35, thresholds=(0.2, "auto"), token="auto", dilate=8, feather=4
    )
    p = make_p(webui, settings, **SIZE)
    processed = generate(webui, p)
    parsed = webui.infotext_utils.parse_generation_parameters(processed.infotexts[0])
    assert MonkeyArgs.from_infotext(parsed) == settings
    assert parsed["MONKEY version"] == run.__version__
    fields = p.monkey_script.infotext_fields
    assert [field.api for field in fields] == list(A.names())
    pasted = {field.api: field.function(parsed) for field in fields}
    assert MonkeyArgs.from_ui([pasted[name] for name in A.names()]) == settings
    no_monkey = {field.api: field.function({"Steps": "20"}) for field in fields}
    assert no_monkey["enabled"] is False and no_monkey["threshold"] is None
    assert set(p.monkey_script.paste_field_names) == set(A.labels().values())


def test_ui_components_are_in_settings_order_with_settings_defaults(webui):
    webui.shared.opts.data.update(
        monkey_threshold=0.42, monkey_preview=False, monkey_save_masks=True
    )
    p = make_p(webui, ON, **SIZE)
    controls = p.monkey_script.controls
    assert len(controls) == len(A.names())
    values = MonkeyArgs.from_ui([control.value for control in controls])
    assert values == MonkeyArgs(threshold=0.42, preview=False, save_masks=True)
    assert controls[0].elem_id == "script_txt2img_monkey_enabled"


def test_settings_section_and_xyz_axes(webui):
    sc = webui.modules["modules.script_callbacks"]
    sc.fire("ui_settings")
    assert {"monkey_threshold", "monkey_preview", "monkey_save_masks"} <= set(
        webui.shared.opts.data_labels
    )
    import types

    xyz = types.SimpleNamespace(
        axis_options=[], boolean_choice=lambda reverse=False: lambda: ["False", "True"]
    )
    xyz.AxisOption = lambda label, type, apply, **kw: types.SimpleNamespace(
        label=label, type=type, apply=apply, **kw
    )
    webui.scripts.scripts_data.append(
        types.SimpleNamespace(script_class=type("X", (), {"__module__": "xyz_grid.py"}), module=xyz)
    )
    sc.fire("before_ui")
    sc.fire("before_ui")  # idempotent
    labels = [option.label for option in xyz.axis_options]
    assert labels == [
        "[MONKEY] Enabled",
        "[MONKEY] Threshold",
        "[MONKEY] Token",
        "[MONKEY] Layer",
        "[MONKEY] Attention scale",
        "[MONKEY] Recorded steps",
        "[MONKEY] Pass 1 steps",
        "[MONKEY] Mask mode",
    ]
    p = make_p(webui, MonkeyArgs(enabled=False), **SIZE)
    by_label = {option.label: option for option in xyz.axis_options}
    by_label["[MONKEY] Enabled"].apply(p, "True", [])
    by_label["[MONKEY] Threshold"].apply(p, 0.7, [])
    by_label["[MONKEY] Recorded steps"].apply(p, "all", [])
    assert by_label["[MONKEY] Pass 1 steps"].type is str  # "4" stays "4" in the grid's labels
    by_label["[MONKEY] Pass 1 steps"].apply(p, "4", [])
    with pytest.raises(MonkeyArgsError, match="shorter than the reference's 4"):
        by_label["[MONKEY] Pass 1 steps"].confirm(p, ["0.5", "2"])
    with pytest.raises(MonkeyArgsError):
        by_label["[MONKEY] Token"].confirm(p, ["first"])
    with pytest.raises(MonkeyArgsError):
        by_label["[MONKEY] Attention scale"].confirm(p, ["exact"])
    with pytest.raises(MonkeyArgsError):
        by_label["[MONKEY] Mask mode"].confirm(p, ["both"])
    processed = generate(webui, p)
    assert "MONKEY threshold: 0.7" in processed.infotexts[0]
    assert "MONKEY record steps: all" in processed.infotexts[0]
    assert "MONKEY pass 1 steps: 4," in processed.infotexts[0]


def test_settings_schema_route_lists_every_setting(webui):
    from monkey.webui import ui

    routes = {}
    app = type(
        "App", (), {"add_api_route": lambda self, path, fn, methods: routes.__setitem__(path, fn)}
    )()
    webui.modules["modules.script_callbacks"].fire("app_started", None, app)
    schema = routes["/monkey/v1/settings"]()
    assert schema["order"] == list(A.names())
    assert schema["settings"]["threshold"]["label"] == "MONKEY threshold"
    assert ui.settings_schema() == schema


# -- previews, saving, progress --------------------------------------------------------------------


def test_masks_and_pass_one_images_follow_the_images_with_their_infotext(webui):
    settings = with_fields(ON, preview=True, preview_pass1=True, save_masks=True)
    p = make_p(webui, settings, batch_size=2, **SIZE)
    processed = generate(webui, p)
    assert len(processed.images) == 2 + 2 * 2
    masks = processed.images[2::2]
    assert all(image.mode == "L" and image.size == (128, 128) for image in masks)
    pixels = [np.asarray(image) for image in masks]
    assert all(set(np.unique(a)) <= {0, 255} and 0 < a.mean() < 255 for a in pixels)
    assert (
        processed.infotexts[2] == processed.infotexts[0]
        and processed.infotexts[4] == processed.infotexts[1]
    )
    mask_saves = [s for s in webui.saved if s["suffix"] == "-monkey-mask"]
    assert [s["seed"] for s in mask_saves] == [1, 2] and all(
        s["extension"] == "png" for s in mask_saves
    )


def test_no_saving_when_the_generation_does_not_save(webui):
    p = make_p(webui, with_fields(ON, save_masks=True), **SIZE)
    p.do_not_save_samples = True
    generate(webui, p)
    assert not webui.saved


def test_progress_counts_both_passes(webui):
    p = make_p(webui, ON, n_iter=2, **SIZE)
    generate(webui, p)
    assert webui.state.job_count == 2 + 2  # one extra job per batch for pass 1
    assert webui.state.job_no == webui.state.job_count


def test_monkey_values_helper_matches_ui_order():
    assert MonkeyArgs.from_ui(monkey_values(ON)) == ON


def test_unload_removes_live_hooks(webui):
    from monkey.hooks import CallbackHook, HookSet

    removed = []
    hooks = HookSet([CallbackHook(lambda: None, lambda: removed.append(1))])
    hooks.install()
    run.LIVE_HOOKS.add(hooks)
    webui.modules["modules.script_callbacks"].fire("script_unloaded")
    assert removed == [1] and not run.LIVE_HOOKS


def test_several_units_are_all_masked_and_the_chosen_one_records(webui, monkeypatch):
    recorded_by = []
    real_record = controlnet._record

    def spy(hack, session, query, out, unit):
        recorded_by.append((hack.adapter, unit))
        return real_record(hack, session, query, out, unit)

    monkeypatch.setattr(controlnet, "_record", spy)
    units = [{"seed": 7}, {"seed": 8, "weight": 0.5}]
    plain = make_p(webui, monkey=False, units=units, **SIZE)
    generate(webui, plain)
    p = make_p(webui, with_fields(FULL, source_unit=1), units=units, **SIZE)
    generate(webui, p)
    assert (latents(p) - latents(plain)).abs().max() <= 1e-6  # both units ran, same noise
    assert len(recorded_by) == 2  # the paper's layer at the two recorded steps
    assert all(a is p.controlnet.adapters[1] and unit == 1 for a, unit in recorded_by)
    masked = make_p(webui, ON, units=units, **SIZE)
    generate(webui, masked)
    assert not torch.allclose(latents(masked), latents(plain), atol=1e-3)


def test_a_missing_source_unit_falls_back_to_the_first_with_a_note(webui):
    p = make_p(webui, with_fields(ON, source_unit=3), **SIZE)
    processed = generate(webui, p)
    assert any("source unit 3 does not exist" in comment for comment in p.comments)
    assert '"masked' in processed.infotexts[0]


def test_a_batch_that_never_sampled_does_not_nest_wrappers(webui):
    p = make_p(webui, ON, **SIZE)
    webui.state.reset()
    p.scripts.process(p)
    cn_sample = p.sample
    p.scripts.process_batch(p)
    p.scripts.process_batch(p)  # the previous batch failed before p.sample
    assert p.sample.__name__ == "monkey_sample"
    p.scripts.postprocess(p, webui.processing.Processed(p, []))
    assert p.sample is cn_sample
    assert not hasattr(p, run.RUN_ATTR)


def test_nothing_recorded_with_hires_still_returns_the_plain_hires_image(webui):
    units = [{"seed": 7, "start": 0.9, "end": 1.0}]  # the unit is off during the record window
    plain = make_p(webui, monkey=False, units=units, enable_hr=True, **SIZE)
    generate(webui, plain)
    p = make_p(webui, ON, units=units, enable_hr=True, **SIZE)
    processed = generate(webui, p)
    assert latents(p).shape == latents(plain).shape == (1, 4, 32, 32)
    assert (latents(p) - latents(plain)).abs().max() <= 1e-6
    assert "no IP-Adapter attention was recorded" in processed.infotexts[0]
    assert len(processed.images) == 1
    assert_clean(webui, p)


@pytest.mark.parametrize("pass1_steps", [0.5, 1.0], ids=["short-pass-1", "full-pass-1"])
def test_nothing_recorded_returns_the_plain_image_whatever_pass_one_ran(webui, pass1_steps):
    units = [{"seed": 7, "start": 0.8, "end": 1.0}]  # the unit is off during the record window
    plain = make_p(webui, monkey=False, units=units, **SIZE)
    generate(webui, plain)
    p = make_p(webui, with_fields(ON, pass1_steps=pass1_steps), units=units, **SIZE)
    processed = generate(webui, p)
    assert (latents(p) - latents(plain)).abs().max() <= 1e-6  # never pass 1's shorter image
    assert "no IP-Adapter attention was recorded" in processed.infotexts[0]
    assert_clean(webui, p)


def test_controlnet_hooks_it_cannot_read_are_left_alone_with_a_message(webui, monkeypatch):
    monkeypatch.setattr(controlnet, "closure_vars", lambda fn: {})
    plain = make_p(webui, monkey=False, **SIZE)
    generate(webui, plain)
    p = make_p(webui, ON, **SIZE)
    processed = generate(webui, p)
    assert torch.equal(latents(p), latents(plain))
    assert "cannot read sd-webui-controlnet's IP-Adapter hooks" in processed.infotexts[0]


def test_a_sample_wrapper_left_under_another_is_inert(webui):
    p = make_p(webui, ON, **SIZE)
    webui.state.reset()
    p.scripts.process(p)
    p.scripts.process_batch(p)
    ours = p.sample
    p.sample = lambda *a, **k: ours(*a, **k)  # another extension wraps on top of MONKEY
    p.iteration, p.prompts, p.seeds, p.subseeds = 0, ["x"], [1], [0]
    p.rng = webui.rng.ImageRNG((4, 16, 16), p.seeds)
    p.setup_conds()
    kwargs = {
        "conditioning": p.c,
        "unconditional_conditioning": p.uc,
        "seeds": p.seeds,
        "subseeds": p.subseeds,
        "subseed_strength": 0,
        "prompts": p.prompts,
    }
    p.sample(**kwargs)
    assert p.controlnet.process_sample_calls == 2  # the two passes
    p.sample(**kwargs)
    assert p.controlnet.process_sample_calls == 3  # afterwards: straight through, one pass


# -- the step clock and pass 1's own schedule --------------------------------------------------------

SAMPLER_NAMES = ["Euler a", "Heun", "DPM2", "DPM adaptive"]


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_full_mask_is_plain_ip_adapter_for_every_sampler_whatever_pass_one_ran(webui, sampler):
    plain = make_p(webui, monkey=False, sampler_name=sampler, **SIZE)
    generate(webui, plain)
    p = make_p(webui, FULL, sampler_name=sampler, **SIZE)
    generate(webui, p)
    assert (latents(p) - latents(plain)).abs().max() <= 1e-6
    assert not webui.errors
    assert_clean(webui, p)


def denoiser_steps(monkeypatch) -> list[tuple[Phase, int, int]]:
    seen = []
    real = MonkeySession.begin_step

    def spy(self, step, total):
        seen.append((self.phase, step, total))
        return real(self, step, total)

    monkeypatch.setattr(MonkeySession, "begin_step", spy)
    return seen


def test_both_evaluations_of_a_heun_step_get_that_steps_decision(webui, monkeypatch):
    seen = denoiser_steps(monkeypatch)
    p = make_p(webui, ON, sampler_name="Heun", steps=8, **SIZE)
    generate(webui, p)
    pass1 = [step for phase, step, total in seen if phase is Phase.RECORD and total == 4]
    pass2 = [step for phase, step, total in seen if phase is Phase.APPLY and total == 8]
    assert pass1 == [0, 0, 1, 1, 2, 2, 3]  # records 1 and 2, ends at step 3's first call
    assert pass2 == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7]  # the last step is Euler's
    assert len(seen) == len(pass1) + len(pass2)


def test_an_adaptive_sampler_is_clocked_by_sigma_and_calls_past_the_end_are_the_last_step(
    webui, monkeypatch
):
    seen = denoiser_steps(monkeypatch)
    p = make_p(webui, ON, sampler_name="DPM adaptive", steps=8, **SIZE)
    processed = generate(webui, p)
    pass2 = [step for phase, step, _ in seen if phase is Phase.APPLY]
    assert len(pass2) == 25  # the sampler's own number of calls, not the nominal 8
    assert pass2 == sorted(pass2) and set(pass2) == set(range(8)) and pass2[-1] == 7
    assert "recorded steps 1, 2 of 4" in processed.infotexts[0]


def test_pass_one_runs_its_own_shorter_schedule_from_the_same_noise(webui, monkeypatch):
    seen = denoiser_steps(monkeypatch)
    p = make_p(webui, with_fields(ON, pass1_steps=1.0), steps=8, **SIZE)
    generate(webui, p)
    assert {total for phase, _, total in seen if phase is Phase.RECORD} == {8}
    # records 3 and 5; the first call of step 6 ends pass 1 before the UNet runs
    assert [s for ph, s, _ in seen if ph is Phase.RECORD] == [0, 1, 2, 3, 4, 5, 6]
    seen.clear()
    p = make_p(webui, ON, steps=30, **SIZE)
    processed = generate(webui, p)
    assert [s for ph, s, _ in seen if ph is Phase.RECORD] == list(range(11))  # 15 steps: 5, 9
    assert "recorded steps 5, 9 of 15, masked steps 7-22 of 30" in processed.infotexts[0]
    assert p.steps == 30


@pytest.mark.parametrize(
    ("steps", "pass1_steps", "schedule"),
    [
        (1, 0.5, "recorded steps 0 of 1, masked steps 0 of 1"),
        (3, 0.5, "recorded steps 0, 2 of 3, masked steps 0-2 of 3"),
        (4, 0.5, "recorded steps 1, 2 of 4, masked steps 1, 2 of 4"),
        (6, 0.5, "recorded steps 1, 2 of 4, masked steps 1-4 of 6"),
        (12, 4, "recorded steps 1, 2 of 4, masked steps 3-8 of 12"),
    ],
    ids=["1-step", "3-step", "4-step", "6-step", "12-step-pass1-4"],
)
def test_pass_one_is_never_shorter_than_the_references_four_steps(
    webui, monkeypatch, steps, pass1_steps, schedule
):
    seen = denoiser_steps(monkeypatch)
    settings = with_fields(ON, pass1_steps=pass1_steps)
    processed = generate(webui, make_p(webui, settings, steps=steps, width=64, height=64))
    assert schedule in processed.infotexts[0]
    last = max(step for phase, step, _ in seen if phase is Phase.RECORD)
    assert last == (steps - 1 if steps < 4 else 3)  # 4 steps or more: step 3 ends pass 1


def test_the_hires_pass_masks_on_its_own_step_clock_and_says_so(webui, monkeypatch):
    seen = denoiser_steps(monkeypatch)
    p = make_p(webui, ON, enable_hr=True, steps=8, **SIZE)
    processed = generate(webui, p)
    pass2 = [(step, total) for phase, step, total in seen if phase is Phase.APPLY]
    assert pass2 == [(step, 8) for step in range(8)] * 2  # the hires pass: its own 8 steps
    status = processed.infotexts[0].split("MONKEY status: ")[1]
    assert "masked steps 2-5 of 8, hires pass masked steps 2-5 of 8" in status
    seen.clear()
    p = make_p(webui, ON, enable_hr=True, steps=8, **SIZE)
    p.hr_second_pass_steps = 4
    processed = generate(webui, p)
    assert "masked steps 2-5 of 8, hires pass masked steps 1, 2 of 4" in processed.infotexts[0]


def test_a_token_past_the_adapters_count_fails_the_generation_naming_the_count(webui):
    p = make_p(webui, with_fields(ON, token=4), **SIZE)
    with pytest.raises(MonkeyArgsError, match="this IP-Adapter has 4 image tokens"):
        generate(webui, p)
    assert_no_hooks(webui, p)


@pytest.mark.parametrize(
    ("name", "kwargs", "levels", "end_evals"),
    [
        ("Euler a", {"sigmas": torch.tensor([9.0, 4.0, 1.0, 0.0])}, [9.0, 4.0, 1.0], 0),
        ("Heun", {"sigmas": torch.tensor([9.0, 4.0, 0.0])}, [9.0, 4.0], 1 << 30),
        ("DDIM", {"timesteps": torch.tensor([1, 251, 501, 751])}, [751.0, 501.0, 251.0, 1.0], 0),
        ("PLMS", {"timesteps": torch.tensor([1, 501])}, [501.0, 1.0], 1),
        ("DPM fast", {"sigma_min": 0.1, "sigma_max": 10.0, "n": 2}, [10.0, 1.0], 0),
        ("LMS", {}, None, None),
    ],
    ids=["k-diffusion", "heun", "ddim", "plms", "dpm-fast", "unreadable"],
)
def test_the_schedule_is_read_from_what_the_sampler_function_is_handed(
    name, kwargs, levels, end_evals
):
    sampler = type("Sampler", (), {"config": type("Config", (), {"name": name})()})()
    clock = schedule.sampler_clock(sampler, None, kwargs)
    if levels is None:
        assert clock is None  # the host then counts denoiser calls
        return
    assert clock.levels == pytest.approx(levels) and clock.end_evals == end_evals
