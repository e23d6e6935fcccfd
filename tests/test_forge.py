"""MONKEY on a fake Forge: the integrated ControlNet's IP-Adapter patches over real attention."""

from __future__ import annotations

import copy

import pytest
import torch
from fake_forge import CrossAttentionPatch, attention_function
from webui_run import UNetCalls, attn2_of, generate, latents, make_forge_p, with_fields

from monkey import maskset
from monkey.args import MonkeyArgs
from monkey.maskset import MaskSet
from monkey.rows import RowLayout
from monkey.session import MonkeySession, Phase
from monkey.webui import forge, forge_attn, run

ON = MonkeyArgs(enabled=True)
SIZE = {"width": 128, "height": 128}  # 16×16 latent: the paper's layer works at 4×4
# threshold 0 keeps every pixel; IP kept outside the window: pass 2 must equal plain IP-Adapter
FULL = MonkeyArgs(enabled=True, threshold=0.0, ip_off_outside=False)
LAYER = "output_blocks.4.1.transformer_blocks.0.attn2"


def unet_of(p):
    return p.sd_model.forge_objects_after_applying_lora.unet.model.diffusion_model


def assert_clean(webui, p) -> None:
    """Nothing of MONKEY's survives the generation: not in the UNet the model holds now, not in
    the callbacks, the sampler, ``p`` or the run's live hooks."""
    for patch in attn2_of(p.sd_model.forge_objects.unet).values():
        assert not isinstance(patch, forge_attn.MonkeyAttn2)
    assert not attn2_of(p.sd_model.forge_objects_after_applying_lora.unet)
    assert not any(cb.name == "monkey_step" for cb in webui.callbacks["callbacks_cfg_denoiser"])
    assert "sample" not in vars(p) or vars(p)["sample"].__name__ != "monkey_sample"
    assert not hasattr(getattr(getattr(p, "sampler", None), "func", None), "__wrapped__")
    assert not run.LIVE_HOOKS
    assert not hasattr(p, run.RUN_ATTR)


def zero_masks(monkeypatch) -> None:
    """Every image's mask empty of subject (an EMPTY map would fall back to a full mask)."""
    real = maskset.build

    def build(recorded, args, offset=0, unit=None):
        built = real(recorded, args, offset, unit)
        built.binary = torch.zeros_like(built.binary)
        return built

    monkeypatch.setattr(maskset, "build", build)


# -- off, and the fallbacks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("controlnet", "units", "reason"),
    [
        (False, None, "Forge's integrated ControlNet is not enabled"),
        (True, [], "no active IP-Adapter unit"),
        (True, [{"kind": "canny"}], "no active IP-Adapter unit"),
    ],
    ids=["no-controlnet", "no-unit", "only-a-controlnet-unit"],
)
def test_nothing_to_mask_runs_untouched_and_says_why(webui, controlnet, units, reason):
    plain = make_forge_p(webui, monkey=False, controlnet=controlnet, units=units, **SIZE)
    generate(webui, plain)
    p = make_forge_p(webui, ON, controlnet=controlnet, units=units, **SIZE)
    calls = UNetCalls(unet_of(p))
    processed = generate(webui, p)
    calls.close()
    assert torch.equal(latents(p), latents(plain))
    assert len(calls.sizes) == 8  # one plain pass
    assert f'MONKEY status: "skipped: {reason}' in processed.infotexts[0]
    assert len(processed.images) == 1
    assert not webui.errors
    assert_clean(webui, p)


# -- the two passes --------------------------------------------------------------------------------


def test_two_passes_with_pass_one_stopped_early_and_patches_rebuilt_per_pass(webui):
    p = make_forge_p(webui, ON, steps=8, **SIZE)
    calls = UNetCalls(unet_of(p))
    processed = generate(webui, p)
    calls.close()
    assert p.controlnet.applied == 2  # Forge rebuilt the IP-Adapter patches for each pass
    assert len(calls.sizes) == 3 + 8  # pass 1 records 1 and 2 of its 4 steps and stops
    assert webui.state.textinfos == [
        "MONKEY pass 1 of 2: recording the subject mask",
        "MONKEY pass 2 of 2: masked IP-Adapter",
    ]
    status = processed.infotexts[0].split("MONKEY status: ")[1]
    assert status.startswith('"masked') and "recorded steps 1, 2 of 4" in status
    assert len(processed.images) == 2  # the image, then its mask
    assert not webui.errors
    assert_clean(webui, p)


@pytest.mark.parametrize("steps", [4, 6])
def test_short_generations_get_the_references_four_step_pass_one(webui, steps):
    p = make_forge_p(webui, ON, steps=steps, width=64, height=64)
    calls = UNetCalls(unet_of(p))
    processed = generate(webui, p)
    calls.close()
    assert len(calls.sizes) == 3 + steps  # pass 1: 4 steps, records 1 and 2, stops at 3
    assert "recorded steps 1, 2 of 4, masked steps" in processed.infotexts[0]
    assert_clean(webui, p)


def test_zero_masks_leave_no_ip_contribution(webui, monkeypatch):
    no_ip = make_forge_p(webui, monkey=False, units=[], **SIZE)
    generate(webui, no_ip)
    zero_masks(monkeypatch)
    p = make_forge_p(webui, ON, **SIZE)
    generate(webui, p)
    assert torch.equal(latents(p), latents(no_ip))  # IP off outside, masked out inside


def test_hires_pass_two_only_masked_at_hires_size_and_the_stale_call_is_harmless(
    webui, monkeypatch
):
    seen_hw = []
    real = MonkeySession.weights

    def spy(self, n_tokens, *args):
        seen_hw.append(self.rows.current.latent_hw)
        return real(self, n_tokens, *args)

    monkeypatch.setattr(MonkeySession, "weights", spy)
    p = make_forge_p(webui, ON, enable_hr=True, hr_scale=2.0, steps=8, **SIZE)
    calls = UNetCalls(unet_of(p))
    generate(webui, p)
    calls.close()
    base, hires = (16, 16), (32, 32)
    assert set(calls.sizes[:3]) == {base}  # pass 1: no hires
    assert calls.sizes[3:11] == [base] * 8 and set(calls.sizes[11:]) == {hires}
    assert {base, hires} <= set(seen_hw)
    assert p.controlnet.applied == 4  # pass 1, pass 2, and the hires pass's two calls
    assert p.enable_hr is True
    assert not webui.errors
    assert_clean(webui, p)


@pytest.mark.parametrize(
    ("cfg_one", "low_memory", "and_prompts", "expected"),
    [
        (False, False, 1, [[(0, False), (1, False), (0, True), (1, True)]]),
        (False, True, 1, [[(0, False), (1, False)], [(0, True), (1, True)]]),
        (True, False, 1, [[(0, True), (1, True)]]),
        (False, False, 2, [[(0, False), (1, False), (0, True), (1, True), (0, True), (1, True)]]),
    ],
    ids=["uncond-first", "split-chunks", "cond-only", "AND-prompt"],
)
def test_rows_map_to_their_images_in_every_forge_layout(
    webui, monkeypatch, cfg_one, low_memory, and_prompts, expected
):
    seen = []
    real = MonkeySession.begin_unet_chunks

    def spy(self, kinds, chunk, latent_hw):
        rows = real(self, kinds, chunk, latent_hw)
        if self.phase is Phase.APPLY and (not seen or seen[-1][1] is not rows):
            seen.append((list(zip(rows.images.tolist(), rows.cond.tolist())), rows))
        return rows

    monkeypatch.setattr(MonkeySession, "begin_unet_chunks", spy)
    p = make_forge_p(webui, ON, batch_size=2, and_prompts=and_prompts, steps=4, **SIZE)
    p.forge_cfg_one, p.forge_low_memory = cfg_one, low_memory
    processed = generate(webui, p)
    assert [pairs for pairs, _ in seen[: len(expected)]] == expected
    assert '"masked' in processed.infotexts[0]  # cond rows were there to record, also cond-only
    assert not webui.errors


def test_two_units_are_both_masked_and_the_chosen_one_records(webui, monkeypatch):
    observed = []
    real = MonkeySession.observe

    def spy(self, layer, query, ip_key, unit=None):
        observed.append((unit, ip_key))
        return real(self, layer, query, ip_key, unit)

    monkeypatch.setattr(MonkeySession, "observe", spy)
    units = [{"seed": 7}, {"seed": 11}]
    p = make_forge_p(webui, with_fields(ON, source_unit=1), units=units, **SIZE)
    generate(webui, p)
    patch = attn2_of(p.sd_model.forge_objects.unet)[("output", 4)]
    adapter = patch.ipadapters[1].ip_layers.to_kvs[patch.k_key]
    # rows: the uncond chunk, then the cond chunk; the recorder reads the cond row's keys
    assert observed and {unit for unit, _ in observed} == {1}  # shared: the source unit only
    key = adapter(patch.conds[1])[0].view(4, 2, -1).transpose(0, 1)
    assert torch.equal(observed[0][1][1], key)
    zero_masks(monkeypatch)
    no_ip = make_forge_p(webui, monkey=False, units=[], **SIZE)
    generate(webui, no_ip)
    both = make_forge_p(webui, ON, units=units, **SIZE)
    generate(webui, both)
    assert torch.equal(latents(both), latents(no_ip))  # neither unit leaks past a zero mask


def test_a_missing_source_unit_falls_back_to_the_first_with_a_note(webui):
    p = make_forge_p(webui, with_fields(ON, source_unit=3), **SIZE)
    generate(webui, p)
    assert any("source unit 3 does not exist" in comment for comment in p.comments)


# -- the wrapper itself, one layer ------------------------------------------------------------------


def one_layer(kinds: list[int], phase: Phase, n_images: int = 2, units: int = 1):
    """Forge-shaped inputs at the paper's layer and a session at one UNet call there."""
    from fake_forge import IPAdapterModule, TinyForgeUNet

    unet = TinyForgeUNet()
    gen = torch.Generator().manual_seed(4)
    patch = None
    for unit in range(units):
        kwargs = {
            "weight": 0.8,
            "ipadapter": IPAdapterModule(unet, seed=3 + unit),
            "cond": torch.randn(1, 4, 16, generator=gen),
            "uncond": torch.randn(1, 4, 16, generator=gen),
            "sigma_start": 999999999.9,
            "sigma_end": 0.0,
        }
        if patch is None:
            patch = CrossAttentionPatch(number=7, **kwargs)
        else:
            patch.set_new_condition(number=7, **kwargs)
    session = MonkeySession(ON, (LAYER,), RowLayout.webui([1] * n_images))
    if phase is Phase.APPLY:
        masks = torch.stack([torch.ones(4, 4), torch.zeros(4, 4)][:n_images]).bool()
        session.masks = MaskSet(masks, [None] * n_images, [0.5] * n_images, [1] * n_images)
    session.begin(phase)
    session.begin_step(3, 8)  # recorded (steps 3 and 5 of 8) and masked (steps 2-5)
    rows = len(kinds) * n_images
    channels = unet.get_submodule(LAYER).to_q.out_features
    q = torch.randn(rows, 16, channels, generator=gen)
    k, v = torch.randn(2, rows, 5, channels, generator=gen)
    extra = {
        "cond_or_uncond": kinds,
        "sigmas": torch.full((n_images,), 3.0),
        "original_shape": [rows, 4, 16, 16],
        "n_heads": 2,
        "dim_head": channels // 2,
    }
    wrapper = forge_attn.MonkeyAttn2(patch, LAYER, session)
    return patch, wrapper, session, (q, k, v, extra)


@pytest.mark.parametrize(
    ("kinds", "images_of_rows"),
    [([1, 0], [0, 1, 0, 1]), ([0], [0, 1]), ([1], [0, 1]), ([1, 0, 0], [0, 1, 0, 1, 0, 1])],
    ids=["uncond-first", "cond-only", "uncond-only-chunk", "AND"],
)
def test_each_row_gets_its_images_mask(kinds, images_of_rows):
    patch, wrapper, _, call = one_layer(kinds, Phase.APPLY)
    q, k, v, extra = call
    plain = patch(q, k, v, extra)
    text = attention_function(q, k, v, 2)
    masked = wrapper(q, k, v, extra)
    kept = [r for r, image in enumerate(images_of_rows) if image == 0]
    dropped = [r for r, image in enumerate(images_of_rows) if image == 1]
    torch.testing.assert_close(masked[kept], plain[kept], rtol=0, atol=1e-6)
    assert torch.equal(masked[dropped], text[dropped])  # image 1's mask is empty: text only


def test_each_unit_is_masked_on_its_own_contribution():
    patch, wrapper, _, call = one_layer([1, 0], Phase.APPLY, units=2)
    q, k, v, extra = call
    text = attention_function(q, k, v, 2)
    first = forge_attn.view(patch, (0,))(q, k, v, extra)
    second = forge_attn.view(patch, (1,))(q, k, v, extra)
    masked = wrapper(q, k, v, extra)
    expected = text + (first - text) + (second - text)  # image 0 (rows 0, 2): both units kept
    torch.testing.assert_close(masked[[0, 2]], expected[[0, 2]], rtol=0, atol=1e-5)
    assert torch.equal(masked[[1, 3]], text[[1, 3]])


def test_recording_reads_the_units_own_keys_for_cond_rows_only():
    patch, wrapper, session, call = one_layer([1, 0], Phase.RECORD, n_images=1)
    q, k, v, extra = call
    out = wrapper(q, k, v, extra)
    assert torch.equal(out, patch(q, k, v, extra))  # recording leaves the output alone
    key = patch.ipadapters[0].ip_layers.to_kvs[patch.k_key](patch.conds[0])
    q_cond = q[1:].view(1, 16, 2, -1).transpose(1, 2)  # row 1 is the cond chunk
    key = key.view(1, 4, 2, -1).transpose(1, 2)
    probs = torch.softmax(q_cond @ key.transpose(-1, -2), -1)  # the reference's unscaled map
    recorded = session.recorder.result().maps[0, 0].reshape(1, -1)
    torch.testing.assert_close(recorded, probs[..., 1].mean(1), rtol=0, atol=1e-6)


def test_a_unit_outside_its_sigma_window_is_not_recorded():
    patch, wrapper, session, call = one_layer([1, 0], Phase.RECORD, n_images=1)
    patch.sigma_end[0] = 5.0  # the call runs at sigma 3: past this unit's end
    wrapper(*call)
    assert not session.recorder.has_data


def test_per_unit_every_unit_records_from_its_own_keys():
    patch, wrapper, session, call = one_layer([1, 0], Phase.RECORD, n_images=1, units=2)
    session.per_unit = True
    q, k, v, extra = call
    assert torch.equal(wrapper(q, k, v, extra), patch(q, k, v, extra))
    q_cond = q[1:].view(1, 16, 2, -1).transpose(1, 2)  # row 1 is the cond chunk
    for unit in (0, 1):
        key = patch.ipadapters[unit].ip_layers.to_kvs[patch.k_key](patch.conds[unit])
        probs = torch.softmax(q_cond @ key.view(1, 4, 2, -1).permute(0, 2, 3, 1), -1)
        recorded = session.recorders[unit].result().maps[0, 0].reshape(1, -1)
        torch.testing.assert_close(recorded, probs[..., 1].mean(1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_unit", [False, True], ids=["shared", "per_unit"])
def test_only_units_inside_their_own_window_record(per_unit):
    patch, wrapper, session, call = one_layer([1, 0], Phase.RECORD, n_images=1, units=2)
    session.per_unit = per_unit
    patch.sigma_end[0] = 5.0  # the call runs at sigma 3: past unit 0's end, unit 1 still in
    wrapper(*call)
    recorded = sorted(unit for unit, r in session.recorders.items() if r.has_data)
    assert recorded == ([1] if per_unit else [])  # shared: unit 0 is the source and is out


def test_the_wrapper_is_inert_after_its_session_and_survives_a_clone():
    patch, wrapper, session, call = one_layer([1, 0], Phase.APPLY)
    clone = copy.deepcopy({"attn2": {("output", 4): wrapper}})["attn2"][("output", 4)]
    assert isinstance(clone, forge_attn.MonkeyAttn2) and clone.session is session
    assert clone.patch is not patch  # the patch was copied, as UnetPatcher.clone copies it
    assert not torch.equal(clone(*call), patch(*call))  # the clone masks in this session too
    session.end()
    assert torch.equal(wrapper(*call), patch(*call))
    # the IP-Adapter appends a second unit to an entry it finds (the hires pass's stale call)
    clone.set_new_condition(0.5, patch.ipadapters[0], 7, patch.conds[0], patch.unconds[0])
    assert len(clone.patch.weights) == 2 and len(patch.weights) == 1


def test_layer_names_of_forge_keys():
    assert forge_attn.layer_name(("output", 4)) == LAYER
    assert forge_attn.layer_name(("input", 7, 3)) == "input_blocks.7.1.transformer_blocks.3.attn2"
    assert forge_attn.layer_name(("middle", 0)) == "middle_block.1.transformer_blocks.0.attn2"


# -- nothing cached is touched; errors, interrupts, teardown ---------------------------------------


def test_the_cached_patcher_and_controlnets_patches_are_never_changed(webui):
    p = make_forge_p(webui, ON, **SIZE)
    cached = p.sd_model.forge_objects_after_applying_lora.unet
    options = copy.deepcopy(cached.model_options)
    built = []
    real = p.controlnet.process_before_every_sampling

    def remember(p_, *args, **kwargs):
        real(p_, *args, **kwargs)
        built.append((p_.sd_model.forge_objects.unet, attn2_of(p_.sd_model.forge_objects.unet)))

    p.controlnet.process_before_every_sampling = remember
    generate(webui, p)
    assert cached.model_options == options
    for unet, patches in built:
        assert attn2_of(unet) == patches  # ControlNet's patcher still holds its own patches
        assert all(isinstance(patch, CrossAttentionPatch) for patch in patches.values())
        assert all(len(patch.weights) == 1 for patch in patches.values())


def test_the_wrapped_clone_shares_controlnets_patches_instead_of_copying_them(webui, monkeypatch):
    """Forge's ``clone`` deep-copies every patch with its adapter's weights; MONKEY's clone holds
    its wrappers around ControlNet's very patch objects, and ControlNet's patcher keeps them
    unwrapped."""
    clones = []
    real = forge.clone_sharing

    def spy(unet, replacements):
        work = real(unet, replacements)
        clones.append((unet, work, forge.attn2_entries(work)))
        return work

    monkeypatch.setattr(forge, "clone_sharing", spy)
    units = [{"seed": 7}, {"seed": 11}]
    generate(webui, make_forge_p(webui, with_fields(ON, mask_mode="per_unit"), units=units, **SIZE))
    assert len(clones) == 2  # pass 1 and pass 2
    for unet, work, ours in clones:
        theirs = forge.attn2_entries(unet)
        assert ours.keys() == theirs.keys() and len(ours) == 16
        for key, (entry, patch) in ours.items():
            assert isinstance(entry, forge_attn.MonkeyAttn2) and patch is theirs[key][1]
            assert len(patch.weights) == 2  # both units, once
            assert entry.records == (forge_attn.layer_name(key) == LAYER)
        assert not any(isinstance(entry, forge_attn.MonkeyAttn2) for entry, _ in theirs.values())
        # once the batch ended, the clone (Forge may keep it loaded) holds no wrapper, no session
        after = forge.attn2_entries(work)
        assert all(entry is patch for entry, patch in after.values()) and len(after) == 16
        assert work.model_options is not unet.model_options
        assert (
            work.model_options["transformer_options"]
            is not unet.model_options["transformer_options"]
        )


def test_the_wrapped_clone_is_the_patchers_own_clone_and_points_a_parent_at_the_patcher():
    from fake_forge import UnetPatcher

    class ReForgePatcher(UnetPatcher):  # reForge's clone remembers where it came from
        def clone(self):
            n = ReForgePatcher(self.model)
            n.model_options = copy.deepcopy(self.model_options)
            n.parent, n.extra = self, list(self.extra)
            return n

    unet = ReForgePatcher(model=None)
    unet.extra = ["kept"]
    patch = CrossAttentionPatch(1.0, None, 7, torch.ones(1), torch.zeros(1))
    unet.set_model_attn2_replace(patch, "output", 4)
    options = copy.deepcopy(unet.model_options)
    wrapper = object()
    work = forge.clone_sharing(unet, {id(patch): wrapper})
    assert type(work) is ReForgePatcher and work.parent is unet and work.extra == ["kept"]
    assert work.extra is not unet.extra
    assert attn2_of(work)[("output", 4)] is wrapper
    assert attn2_of(unet)[("output", 4)] is patch and unet.model_options.keys() == options.keys()


def failing_call(p, call: int):
    """Make the UNet raise on its ``call``-th call."""
    count = {"n": 0}

    def boom(_module, _args):
        count["n"] += 1
        if count["n"] == call:
            raise RuntimeError("CUDA out of memory (simulated)")

    return unet_of(p).register_forward_pre_hook(boom)


@pytest.mark.parametrize(
    ("call", "where"), [(2, "pass 1"), (6, "pass 2")], ids=["in-pass-1", "in-pass-2"]
)
def test_an_exception_inside_a_pass_leaves_nothing_behind(webui, call, where):
    p = make_forge_p(webui, ON, enable_hr=True, steps=8, **SIZE)
    webui.state.reset()
    p.scripts.process(p)
    handle = failing_call(p, call)
    from fake_webui import ImageRNG

    p.iteration, p.prompts, p.seeds, p.subseeds = 0, ["x"], [1], [0]
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
    assert p.enable_hr is True
    for patch in attn2_of(p.sd_model.forge_objects.unet).values():
        assert isinstance(patch, CrossAttentionPatch), where
    assert not any(cb.name == "monkey_step" for cb in webui.callbacks["callbacks_cfg_denoiser"])
    assert not run.LIVE_HOOKS
    assert vars(p)["sample"].__name__ != "monkey_sample" if "sample" in vars(p) else True


def test_interrupt_during_pass_one_keeps_its_image_and_skips_pass_two(webui):
    p = make_forge_p(webui, ON, steps=8, **SIZE)

    def interrupt(params):
        if params.denoiser.step == 2:
            webui.state.interrupted = True

    webui.modules["modules.script_callbacks"].on_cfg_denoiser(interrupt)
    calls = UNetCalls(unet_of(p))
    processed = generate(webui, p)
    calls.close()
    assert len(calls.sizes) == 3
    assert "interrupted after pass 1" in processed.infotexts[0]
    assert_clean(webui, p)


def test_pass_two_without_patches_to_wrap_says_it_did_not_mask(webui):
    p = make_forge_p(webui, ON, **SIZE)
    real = p.controlnet.process_before_every_sampling

    def only_once(p_, *args, **kwargs):
        if p.controlnet.applied == 0:
            real(p_, *args, **kwargs)

    p.controlnet.process_before_every_sampling = only_once
    processed = generate(webui, p)
    assert "pass 2 found no IP-Adapter patch" in processed.infotexts[0]
    assert len(processed.images) == 1  # no mask preview for a mask never applied


def test_the_script_picks_the_forge_backend_on_forge(webui):
    p = make_forge_p(webui, ON, **SIZE)
    assert webui.script_module.backend(p) is forge.BACKEND


def test_forge_timestep_samplers_are_clocked_in_the_sigmas_their_callback_sees():
    from types import SimpleNamespace as Ns

    from monkey.webui import schedule

    alphas = torch.linspace(0.999, 0.01, 1000)
    timesteps = torch.tensor([1, 251, 501, 751])
    converting = Ns(classic_ddim_eps_estimation=True, inner_model=Ns(inner_model=Ns(alphas_cumprod=alphas)))  # fmt: skip
    forge_ddim = Ns(config=Ns(name="DDIM"), model_wrap_cfg=converting)
    clock = schedule.sampler_clock(forge_ddim, Ns(steps=4), {"timesteps": timesteps})
    order = [751, 501, 251, 1]
    sigmas = ((1 - alphas[order]) / alphas[order]).sqrt()  # as Forge's denoiser converts them
    assert [clock.step_at(float(sigma)) for sigma in sigmas] == [0, 1, 2, 3]
    a1111_ddim = Ns(config=Ns(name="DDIM"), model_wrap_cfg=Ns())
    plain = schedule.sampler_clock(a1111_ddim, Ns(steps=4), {"timesteps": timesteps})
    assert plain.levels == [float(t) for t in order]  # A1111 hands the callback timesteps
