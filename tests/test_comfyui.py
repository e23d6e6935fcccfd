"""MONKEY in ComfyUI: the nodes over a fake of ComfyUI's patcher and sampler surface, with
IPAdapter_plus-style patches over the real tiny UNet."""

from __future__ import annotations

import sys

import fake_comfyui as fc
import pytest
import torch

from monkey import maskset
from monkey.args import MonkeyArgs, MonkeyArgsError
from monkey.attn2 import MonkeyAttn2
from monkey.session import MonkeySession

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two shared

STEPS = 8
LATENT = {"samples": torch.zeros(1, 4, 16, 16)}  # 128 px: the paper's layer works at 4×4
FULL = {"threshold": 0.0, "ip_off_outside": False}  # every pixel subject, IP kept outside


@pytest.fixture
def comfy(monkeypatch):
    """The fake ComfyUI modules in ``sys.modules``, a fresh interrupt flag and progress log."""
    for name, module in fc.make_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    fc.Interrupts.flag = False
    fc.Progress.updates = []
    fc.Options.low_memory = False
    from monkey.comfyui import nodes

    return nodes


def inputs(model, batch=1, denoise=1.0, cfg=7.0, latent=None, **settings):
    latent = latent or {"samples": torch.zeros(batch, 4, 16, 16)}
    return {
        "model": model, "seed": 5, "steps": STEPS, "cfg": cfg, "sampler_name": "euler",
        "scheduler": "normal", "positive": fc.conditioning(1), "negative": fc.conditioning(2),
        "latent_image": latent, "denoise": denoise, **settings,
    }  # fmt: skip


def ksampler(model, **kwargs):
    args = inputs(model, **kwargs)
    return fc.KSamplerNode().sample(**args)[0]["samples"]


def monkey(comfy, model, **kwargs):
    return comfy.MonkeyKSampler().sample(**inputs(model, **kwargs))


def ip_model(seeds=(7,), base=None):
    model = base or fc.new_model()
    for seed in seeds:
        model = fc.apply_ipadapter(model, seed)
    return model


def zero_masks(monkeypatch) -> None:
    """Every mask empty of subject (an EMPTY map would fall back to a full mask)."""
    for name in ("build", "build_units"):
        real = getattr(maskset, name)

        def build(*args, _real=real, **kwargs):
            built = _real(*args, **kwargs)
            for mask_set in getattr(built, "units", [built]):
                mask_set.binary = torch.zeros_like(mask_set.binary)
            return built

        monkeypatch.setattr(maskset, name, build)


def unet_calls(model):
    calls = []
    handle = model.model.diffusion_model.register_forward_pre_hook(
        lambda module, args: calls.append(args[0].shape[0])
    )
    return calls, handle


# -- off, plain, and the guarantees -----------------------------------------------------------------


def test_off_is_the_stock_ksampler_bit_for_bit(comfy):
    model = ip_model()
    stock = ksampler(model)
    latent, mask, first, status = monkey(comfy, model, enabled=False)
    assert torch.equal(latent["samples"], stock)
    assert torch.equal(first["samples"], stock)
    assert torch.equal(mask, torch.ones(1, 128, 128))
    assert status == "off"


@pytest.mark.parametrize("batch", [1, 2], ids=["one-image", "batch-of-two"])
def test_all_ones_mask_is_plain_ipadapter_exactly(comfy, batch):
    model = ip_model()
    plain = ksampler(model, batch=batch)
    latent, mask, _, status = monkey(comfy, model, batch=batch, **FULL)
    assert torch.equal(latent["samples"], plain)
    assert mask.shape == (batch, 128, 128) and bool((mask == 1).all())
    assert "(full mask)" in status


def test_zero_masks_leave_no_ip_contribution(comfy, monkeypatch):
    base = fc.new_model()
    no_ip = ksampler(base)
    zero_masks(monkeypatch)
    latent, mask, _, _ = monkey(comfy, ip_model(base=base))
    assert torch.equal(latent["samples"], no_ip)  # IP off outside, masked out inside
    assert not bool(mask.any())


def test_masked_result_differs_from_plain_and_from_no_ip(comfy):
    base = fc.new_model()
    no_ip = ksampler(base)
    model = ip_model(base=base)
    plain = ksampler(model)
    latent, mask, first, status = monkey(comfy, model, ip_off_outside=False)
    assert "(full mask)" not in status and status.startswith("image 0: masked")
    assert 0 < float(mask.mean()) < 1
    assert not torch.allclose(latent["samples"], plain, atol=1e-4)
    assert not torch.allclose(latent["samples"], no_ip, atol=1e-4)
    assert not torch.equal(first["samples"], latent["samples"])


def test_img2img_full_mask_is_plain_exactly(comfy):
    model = ip_model()
    start = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))}
    plain = ksampler(model, latent=start, denoise=0.6)
    latent, _, _, status = monkey(comfy, model, latent=start, denoise=0.6, **FULL)
    assert torch.equal(latent["samples"], plain)
    assert "of 4" in status  # pass 1: 4 of the 8 steps, its own schedule at denoise 0.6


@pytest.mark.parametrize("low_memory", [False, True], ids=["one-call", "a-call-per-chunk"])
def test_both_passes_are_clocked_by_their_sigmas_and_pass_one_is_cut(comfy, low_memory):
    fc.Options.low_memory = low_memory
    model = ip_model()
    calls, handle = unet_calls(model)
    _, _, _, status = monkey(comfy, model)
    handle.remove()
    per_step = 2 if low_memory else 1
    assert len(calls) == (3 + STEPS) * per_step  # pass 1 records steps 1, 2 of its 4 and stops
    assert "recorded steps 1, 2 of 4" in status and "masked steps 2-5 of 8" in status


def test_progress_covers_both_passes(comfy):
    monkey(comfy, ip_model())
    totals = {total for _, total in fc.Progress.updates}
    values = [value for value, _ in fc.Progress.updates]
    assert totals == {3 + STEPS}
    assert values == list(range(1, 3 + STEPS + 1))


def test_cond_only_at_cfg_one_still_records(comfy):
    _, mask, _, status = monkey(comfy, ip_model(), cfg=1.0, ip_off_outside=False)
    assert status.startswith("image 0: masked") and 0 < float(mask.mean()) <= 1


# -- units --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shared", "per_unit"])
def test_two_units_both_masked_in_either_mode(comfy, monkeypatch, mode):
    base = fc.new_model()
    no_ip = ksampler(base)
    model = ip_model((7, 11), base=base)
    observed = set()
    real = MonkeySession.observe

    def spy(self, layer, query, ip_key, unit=None):
        observed.add(unit)
        return real(self, layer, query, ip_key, unit)

    monkeypatch.setattr(MonkeySession, "observe", spy)
    _, mask, _, status = monkey(comfy, model, batch=2, mask_mode=mode)
    units = 2 if mode == "per_unit" else 1
    assert mask.shape == (units * 2, 128, 128)
    assert observed == ({0, 1} if mode == "per_unit" else {0})
    if mode == "per_unit":
        assert "unit 0:" in status and "unit 1:" in status
    zero_masks(monkeypatch)
    latent, _, _, _ = monkey(comfy, model, mask_mode=mode)
    assert torch.equal(latent["samples"], no_ip)  # neither unit leaks past its zero mask


def test_the_source_unit_records_its_own_keys(comfy, monkeypatch):
    model = ip_model((7, 11))
    keys = []
    real = MonkeySession.observe

    def spy(self, layer, query, ip_key, unit=None):
        keys.append((unit, ip_key))
        return real(self, layer, query, ip_key, unit)

    monkeypatch.setattr(MonkeySession, "observe", spy)
    monkey(comfy, model, source_unit=1)
    patch = fc.attn2_of(model)[("output", 4)]
    to_k = patch.kwargs[1]["ipadapter"].ip_layers.to_kvs[patch.kwargs[1]["module_key"] + "_to_k_ip"]
    expected = to_k(patch.kwargs[1]["cond"])[0].view(4, 2, -1).transpose(0, 1)
    assert keys and all(unit == 1 for unit, _ in keys)
    assert torch.equal(keys[0][1][1], expected)  # row 1 is the cond chunk (uncond leads)


# -- the MODEL, the middle block, cancel --------------------------------------------------------------


def snapshot(model):
    attn2 = fc.attn2_of(model)
    return {
        key: (id(patch), type(patch), list(patch.callback), [dict(kw) for kw in patch.kwargs])
        for key, patch in attn2.items()
    }


def test_the_users_model_is_never_changed_and_the_middle_block_patch_is_never_called(comfy):
    model = ip_model()
    before = snapshot(model)
    options = model.model_options
    monkey(comfy, model)
    assert snapshot(model) == before and model.model_options is options
    patches = fc.attn2_of(model)
    assert not any(isinstance(p, MonkeyAttn2) for p in patches.values())
    # the clone shares the user's patches (ran through the wrappers, never changed); ComfyUI
    # never asks for ("middle", 1)
    assert all(patch.calls > 0 for key, patch in patches.items() if key != ("middle", 1))
    assert patches[("middle", 1)].calls == 0


def test_every_wrapped_patch_is_called_and_the_middle_key_is_left_alone(comfy, monkeypatch):
    from monkey.comfyui import patches as comfy_patches

    works = []
    real = comfy_patches.wrapped_clone

    def keep(*args):
        works.append(real(*args))
        return works[-1]

    monkeypatch.setattr(sys.modules["monkey.comfyui.run"], "wrapped_clone", keep)
    model = ip_model()
    monkey(comfy, model)
    attn2, users = fc.attn2_of(works[0]), fc.attn2_of(model)
    wrapped = {key for key, patch in attn2.items() if isinstance(patch, MonkeyAttn2)}
    assert len(wrapped) == 15 and ("middle", 1) not in wrapped
    assert all(attn2[key].patch.calls > 0 for key in wrapped)
    assert attn2[("middle", 1)].calls == 0  # ComfyUI never asks for it
    assert all(not attn2[key].session.active for key in wrapped)
    # the user's patches themselves (not deep copies with the adapter's weights), in dicts of
    # the clone's own
    assert all(attn2[key].patch is users[key] for key in wrapped)
    assert attn2[("middle", 1)] is users[("middle", 1)]
    assert attn2 is not users and works[0].model_options is not model.model_options


def test_the_clone_leaves_nothing_for_the_hosts_del_to_detach(comfy, monkeypatch):
    """ComfyUI's (and reForge's) ``ModelPatcher.__del__`` detaches: the stand-in the shared
    clone is made from must neither eject the loaded MODEL's injections nor fail there."""
    import gc

    from monkey.patcher import clone_sharing

    ejected, unraisable = [], []

    class Injection:
        def eject(self, patcher):
            ejected.append(patcher)

    model = ip_model()
    model.injections, model.is_injected = {"probe": [Injection()]}, True  # as when loaded
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    work = clone_sharing(model, {})
    gc.collect()
    assert not ejected and not unraisable and model.is_injected
    assert work.parent is model and work.model is model.model
    del work
    gc.collect()
    assert not ejected and not unraisable  # the clone itself was never injected


def test_the_middle_block_as_mask_layer_is_refused_naming_the_setting(comfy):
    with pytest.raises(MonkeyArgsError, match=r"'layers'.*middle-block"):
        monkey(comfy, ip_model(), layers="middle_block.1.transformer_blocks.0.attn2")


def test_a_bad_setting_names_the_setting(comfy):
    with pytest.raises(MonkeyArgsError, match="'threshold'"):
        monkey(comfy, ip_model(), threshold=1.5)


@pytest.mark.parametrize("at_call", [2, 6], ids=["in-pass-1", "in-pass-2"])
def test_cancel_in_either_pass_leaves_the_patches_as_they_were(comfy, monkeypatch, at_call):
    from monkey.comfyui import patches as comfy_patches

    model = ip_model()
    before = snapshot(model)
    works = []
    real = comfy_patches.wrapped_clone
    monkeypatch.setattr(
        sys.modules["monkey.comfyui.run"],
        "wrapped_clone",
        lambda *args: works.append(real(*args)) or works[-1],
    )
    calls, handle = unet_calls(model)

    def interrupt(module, args):
        if len(calls) == at_call:
            fc.Interrupts.flag = True

    hook = model.model.diffusion_model.register_forward_pre_hook(interrupt)
    with pytest.raises(fc.InterruptProcessingException):
        monkey(comfy, model)
    handle.remove()
    hook.remove()
    assert len(calls) == at_call
    assert snapshot(model) == before
    wrappers = [p for p in fc.attn2_of(works[0]).values() if isinstance(p, MonkeyAttn2)]
    assert wrappers and not any(w.session.active for w in wrappers)
    assert torch.equal(ksampler(model), ksampler(model))  # the model still samples, plainly


def test_no_ipadapter_on_the_model_runs_the_stock_sampler_and_says_why(comfy):
    model = fc.new_model()
    latent, mask, _, status = monkey(comfy, model)
    assert torch.equal(latent["samples"], ksampler(model))
    assert status.startswith("skipped: no IPAdapter patch") and bool((mask == 1).all())


# -- MONKEY Mask ----------------------------------------------------------------------------------


def test_monkey_mask_runs_pass_one_only(comfy):
    model = ip_model((7, 11))
    calls, handle = unet_calls(model)
    mask, first, status = comfy.MonkeyMask().mask(**inputs(model, batch=2, mask_mode="per_unit"))
    handle.remove()
    assert len(calls) == 3
    assert mask.shape == (4, 128, 128) and mask.dtype == torch.float32
    assert first["samples"].shape == (2, 4, 16, 16)
    assert "unit 1:" in status


# -- the nodes' contract ------------------------------------------------------------------------------


def test_node_inputs_are_the_ksamplers_then_every_monkey_setting_with_a_tooltip(comfy):
    from monkey.args import names

    for node in (comfy.MonkeyKSampler, comfy.MonkeyMask):
        types = node.INPUT_TYPES()
        assert list(types["required"]) == list(fc.KSamplerNode.INPUT_TYPES()["required"])
        optional = types["optional"]
        assert list(optional) == [
            n for n in names() if n not in ("preview", "preview_pass1", "save_masks")
        ]
        assert all(options.get("tooltip") for _, options in optional.values())
        assert node.CATEGORY == "MONKEY"
    optional = comfy.MonkeyKSampler.INPUT_TYPES()["optional"]
    assert optional["enabled"] == ("BOOLEAN", optional["enabled"][1])
    assert optional["enabled"][1]["default"] is True
    assert optional["threshold"][0] == "FLOAT" and optional["threshold"][1]["max"] == 1.0
    assert optional["dilate"][0] == "INT" and optional["dilate"][1]["max"] == 256
    assert optional["mask_mode"][0] == ["shared", "per_unit"]
    assert optional["token"][0] == "STRING" and optional["token"][1]["default"] == "default"
    assert comfy.NODE_DISPLAY_NAME_MAPPINGS == {
        "MonkeyKSampler": "MONKEY KSampler",
        "MonkeyMask": "MONKEY Mask",
    }


def test_widget_defaults_parse_back_to_the_node_defaults(comfy):
    from monkey.args import MonkeyArgs
    from monkey.comfyui.inputs import monkey_inputs, settings_from

    values = {name: options["default"] for name, (_, options) in monkey_inputs().items()}
    assert settings_from(values) == MonkeyArgs(enabled=True)


def test_sdxl_keys_resolve_to_sdxl_layers_without_the_middle_block():
    from monkey.comfyui.patches import called_layers
    from monkey.comfyui.run import _layers
    from monkey.layers import SDXL

    keys = [("input", i, j) for i in (4, 5) for j in range(2)]
    keys += [("input", i, j) for i in (7, 8) for j in range(10)]
    keys += [("output", i, j) for i in range(6) for j in range(10 if i < 3 else 2)]
    keys += [("middle", 1, j) for j in range(10)]  # IPAdapter_plus's SDXL middle keys
    called = called_layers(dict.fromkeys(keys))
    assert len(keys) == 70 and len(called) == 60
    family, source = _layers(MonkeyArgs(enabled=True), sorted(called.values()))
    assert family is SDXL and source == SDXL.default_source
    assert not any(name.startswith("middle_block") for name in called.values())


@pytest.mark.parametrize("mask_mode", ["shared", "per_unit"])
def test_nothing_of_a_run_waits_for_the_garbage_collector(comfy, mask_mode):
    """As on the WebUIs (test_webui_cycles): a run's session, hooks, wrapped clone and masks
    go with reference counting, not at ComfyUI's next full collection."""
    import gc

    from monkey.comfyui.run import MonkeyRun
    from monkey.hooks import HookSet

    model = ip_model(seeds=(7, 11))
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        monkey(comfy, model, mask_mode=mask_mode)
        gc.collect()
        ours = (MonkeySession, HookSet, MonkeyRun, MonkeyAttn2, fc.ModelPatcher)
        left = [o for o in gc.garbage if isinstance(o, ours)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
