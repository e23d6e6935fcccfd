"""``monkey_generate`` on real diffusers pipelines whose IP-Adapters diffusers itself loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
)
from PIL import Image
from tiny_pipeline import SIZE, SOURCE, tiny_lcm_pipeline, tiny_pipeline

from monkey.args import PASS1_MIN_STEPS, MonkeyArgs
from monkey.diffusers.hooks import MonkeyIPAdapterProcessor, ip_attention_modules
from monkey.diffusers.pipeline import (
    LoopClock,
    loop_steps,
    monkey_generate,
    runge_kutta_iterations,
)
from monkey.maskset import MaskSet
from monkey.session import MonkeySession

STEPS = 8
ON = {"layers": SOURCE}
"""MONKEY at the defaults, recording from a layer of the tiny UNet."""


def reference(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def pipe2(tmp_path_factory):
    """Two IP-Adapters loaded in one ``load_ip_adapter`` call."""
    return tiny_pipeline(tmp_path_factory.mktemp("sd2"), adapters=2)


def call(**extra):
    kwargs = {
        "prompt": "a dog on the beach",
        "ip_adapter_image": reference(),
        "height": SIZE,
        "width": SIZE,
        "num_inference_steps": STEPS,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(7),
    }
    kwargs.update(extra)
    return kwargs


def set_scale(pipe, scale: float) -> None:
    adapters = len(next(iter(ip_attention_modules(pipe.unet).values())).processor.scale)
    pipe.set_ip_adapter_scale([scale] * adapters)


def plain(pipe, scale: float = 1.0, **extra) -> torch.Tensor:
    set_scale(pipe, scale)
    try:
        return pipe(**call(**extra)).images
    finally:
        set_scale(pipe, 1.0)


def assert_unhooked(pipe, interrupted: bool = False, check_interrupt: bool = True) -> None:
    """No MONKEY hook left, and the interrupt flag as a plain call leaves it (set only by the
    user's own interrupt)."""
    assert not any(
        isinstance(p, MonkeyIPAdapterProcessor) for p in pipe.unet.attn_processors.values()
    )
    assert not pipe.unet._forward_pre_hooks
    assert not pipe.unet._forward_hooks
    assert not any(m._forward_hooks for m in pipe.unet.modules())
    assert "forward" not in vars(pipe.unet) and "step" not in vars(pipe.scheduler)
    if check_interrupt:
        assert pipe.interrupt is interrupted


@pytest.fixture
def forced_mask(monkeypatch):
    """Pass 2 gets a mask of the given value everywhere instead of the recorded one."""

    def force(value: bool) -> None:
        build = MonkeySession.build_masks

        def constant(session):
            built = build(session)
            built.binary = torch.full_like(built.binary, value)
            built.statuses = list(built.statuses)
            return built

        monkeypatch.setattr(MonkeySession, "build_masks", constant)

    return force


EVERY_STEP = {**ON, "apply_start": 0.0, "apply_end": 1.0}


def test_all_ones_mask_is_the_plain_ip_adapter_pipeline(pipe, forced_mask):
    forced_mask(True)
    out = monkey_generate(pipe, EVERY_STEP, **call())
    assert out.skipped_reason is None
    assert torch.equal(out.images, plain(pipe))
    assert_unhooked(pipe)


def test_zeros_mask_is_the_scale_zero_pipeline(pipe, forced_mask):
    forced_mask(False)
    out = monkey_generate(pipe, EVERY_STEP, **call())
    assert torch.equal(out.images, plain(pipe, scale=0.0))
    assert not torch.equal(out.images, plain(pipe))


def test_threshold_zero_keeps_plain_ip_adapter_where_the_reference_does(pipe):
    """Threshold 0 records a full mask; IP-Adapter kept outside the window: plain IP-Adapter."""
    out = monkey_generate(pipe, {**ON, "threshold": 0.0, "ip_off_outside": False}, **call())
    assert "full mask" in out.statuses[0]
    assert torch.equal(out.images, plain(pipe))


def test_defaults_mask_and_report_the_reference_schedule(pipe):
    out = monkey_generate(pipe, ON, **call(output_type="pil"))
    assert out.skipped_reason is None
    assert out.statuses[0].startswith("masked ")
    assert "recorded steps 1, 2 of 4, masked steps 2-5 of 8" in out.statuses[0]
    mask = np.array(out.masks[0])
    assert out.masks[0].size == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}
    assert out.first_images[0].size == (SIZE, SIZE)
    assert not np.array_equal(np.array(out.images[0]), np.array(plain(pipe, output_type="pil")[0]))
    assert_unhooked(pipe)


def test_monkey_off_is_the_plain_pipeline_bit_for_bit(pipe):
    out = monkey_generate(pipe, MonkeyArgs(enabled=False), **call())
    assert torch.equal(out.images, plain(pipe))
    assert out.masks is None and out.first_images is None


def test_batch_of_two_masks_each_image(pipe, forced_mask):
    out = monkey_generate(pipe, ON, **call(num_images_per_prompt=2, output_type="pil"))
    assert len(out.images) == len(out.masks) == len(out.statuses) == 2
    assert out.mask_set.binary.shape[0] == 2
    forced_mask(True)
    ones = monkey_generate(pipe, EVERY_STEP, **call(prompt=["a dog", "a cat"]))
    assert torch.equal(ones.images, plain(pipe, prompt=["a dog", "a cat"]))


def test_without_classifier_free_guidance(pipe, forced_mask):
    out = monkey_generate(pipe, ON, **call(guidance_scale=1.0))
    assert out.skipped_reason is None and out.statuses[0].startswith("masked")
    forced_mask(True)
    ones = monkey_generate(pipe, EVERY_STEP, **call(guidance_scale=1.0))
    assert torch.equal(ones.images, plain(pipe, guidance_scale=1.0))


def test_several_ip_adapters_share_the_mask(pipe2, forced_mask):
    images = [reference(1), reference(2)]
    source0 = monkey_generate(pipe2, ON, **call(ip_adapter_image=images))
    source1 = monkey_generate(pipe2, {**ON, "source_unit": 1}, **call(ip_adapter_image=images))
    assert source0.skipped_reason is None and source1.skipped_reason is None
    assert not torch.equal(source0.mask_set.binary, source1.mask_set.binary)
    missing = monkey_generate(pipe2, {**ON, "source_unit": 5}, **call(ip_adapter_image=images))
    assert "source unit 5 is not loaded" in missing.statuses[0]
    forced_mask(False)
    zeros = monkey_generate(pipe2, EVERY_STEP, **call(ip_adapter_image=images))
    assert torch.equal(zeros.images, plain(pipe2, scale=0.0, ip_adapter_image=images))


SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "heun": HeunDiscreteScheduler,
    "kdpm2": KDPM2DiscreteScheduler,
    "pndm": PNDMScheduler,
    "plms": lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_counts_sampler_steps(pipe, name, forced_mask):
    original = pipe.scheduler
    pipe.scheduler = scheduler_named(name, original.config)
    try:
        seen = []
        build = LoopClock.step_at

        def spy(clock, level):
            seen.append(build(clock, level))
            return seen[-1]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(LoopClock, "step_at", spy)
            out = monkey_generate(pipe, ON, **call())
        assert "recorded steps 1, 2 of 4, masked steps 2-5 of 8" in out.statuses[0]
        restart = next(i for i in range(1, len(seen)) if seen[i] < seen[i - 1])
        first, second = seen[:restart], seen[restart:]
        # pass 1 stops right after its last recorded step; pass 2 visits each step in order
        assert first == sorted(first) and first[-1] == 2
        assert second == sorted(second) and set(second) == set(range(STEPS))
        forced_mask(True)
        ones = monkey_generate(pipe, EVERY_STEP, **call())
        assert torch.equal(ones.images, plain(pipe))
    finally:
        pipe.scheduler = original


def scheduler_named(name: str, config):
    make = SCHEDULERS[name]
    return make.from_config(config) if isinstance(make, type) else make(config)


def progress_steps(timesteps, steps: int, order: int) -> list[int]:
    """The step of each loop iteration by the pipelines' own progress-bar rule."""
    warmup = len(timesteps) - steps * order
    out, done = [], 0
    for index in range(len(timesteps)):
        out.append(done)
        if index == len(timesteps) - 1 or (index + 1 > warmup and (index + 1) % order == 0):
            done += 1
    return out


@pytest.mark.parametrize("name", [name for name in SCHEDULERS if name != "pndm"])
@pytest.mark.parametrize("steps", [4, 8, 25])
def test_loop_steps_agree_with_the_pipeline_progress_bar(pipe, name, steps):
    scheduler = scheduler_named(name, pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    assert loop_steps(timesteps, scheduler.order) == progress_steps(
        timesteps, steps, scheduler.order
    )


def test_pndm_runge_kutta_steps_take_four_iterations(pipe):
    """The pipeline's progress bar lumps PNDM's warm-up into its first step; MONKEY does not."""
    scheduler = scheduler_named("pndm", pipe.scheduler.config)
    scheduler.set_timesteps(8)
    clock = LoopClock(scheduler.timesteps, 1, runge_kutta_iterations(scheduler, 0))
    assert clock.steps == [0] * 4 + [1] * 4 + [2] * 4 + [3, 4, 5, 6, 7]


def test_img2img_runs_on_its_own_shorter_schedule(pipe, forced_mask):
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    init = reference(3).resize((SIZE, SIZE))
    extra = {"image": init, "strength": 0.5}
    out = monkey_generate(img2img, ON, **call(**extra, num_inference_steps=16))
    # pass 1: 8 steps at strength 0.5 run 4; pass 2: 16 run 8
    assert "recorded steps 1, 2 of 4, masked steps 2-5 of 8" in out.statuses[0]
    forced_mask(True)
    ones = monkey_generate(img2img, EVERY_STEP, **call(**extra))
    img2img.set_ip_adapter_scale(1.0)
    assert torch.equal(ones.images, img2img(**call(**extra)).images)
    assert_unhooked(img2img)


def test_user_callback_runs_in_both_passes_and_pass_1_stops_early(pipe):
    calls = []

    def callback(_pipe, index, _t, tensors):
        calls.append((index, tuple(tensors)))
        return {}

    out = monkey_generate(
        pipe,
        ON,
        **call(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"]),
    )
    assert out.skipped_reason is None
    # pass 1 (4 steps) records steps 1 and 2 and stops; pass 2 runs its 8
    assert [index for index, _ in calls] == [0, 1, 2, *range(STEPS)]
    assert all(names == ("latents",) for _, names in calls)


def test_interrupt_in_pass_1_returns_pass_1_unmasked(pipe):
    def stop(pipe_, index, _t, _tensors):
        if index == 0:
            pipe_._interrupt = True
        return {}

    out = monkey_generate(pipe, ON, **call(callback_on_step_end=stop))
    assert out.skipped_reason == "interrupted after pass 1"
    assert out.images is out.first_images
    assert out.statuses[0].startswith("not masked")
    assert_unhooked(pipe, interrupted=True)


def test_interrupt_in_pass_2_ends_pass_2(pipe):
    runs = []

    def stop(pipe_, index, _t, _tensors):
        if index == 0:
            runs.append([])
        runs[-1].append(index)
        if len(runs) == 2 and index == 3:
            pipe_._interrupt = True
        return {}

    out = monkey_generate(pipe, ON, **call(callback_on_step_end=stop))
    assert runs == [[0, 1, 2], [0, 1, 2, 3]] and out.mask_set is not None
    assert_unhooked(pipe, interrupted=True)


def test_hooks_are_removed_when_the_call_raises(pipe):
    before = dict(pipe.unet.attn_processors)

    def boom(_pipe, index, _t, _tensors):
        if index == 1:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        monkey_generate(pipe, ON, **call(callback_on_step_end=boom))
    assert_unhooked(pipe)
    assert all(a is b for a, b in zip(pipe.unet.attn_processors.values(), before.values()))


def test_nothing_recorded_returns_the_plain_image(pipe, monkeypatch):
    """A pass 1 that records nothing keeps plain IP-Adapter (the whole plain run)."""
    monkeypatch.setattr(MonkeySession, "observe", lambda *_args, **_kwargs: None)
    out = monkey_generate(pipe, ON, **call())
    assert out.mask_set is None and "no IP-Adapter attention" in out.skipped_reason
    assert torch.equal(out.images, plain(pipe))


def test_a_source_layer_at_scale_0_still_masks_from_the_adapters_own_keys(pipe):
    """InstantStyle-style per-layer scales that zero the source layer: the mask comes from the
    adapter's own keys there, as on the WebUI hosts, and the status says so."""
    pipe.set_ip_adapter_scale({"up": {"block_0": [1.0, 0.0]}})  # diffusers' own per-layer dict
    try:
        scales = {name: m.processor.scale for name, m in ip_attention_modules(pipe.unet).items()}
        assert scales[SOURCE] == [0.0]
        assert scales[SOURCE.replace("attentions.1", "attentions.0")] == [1.0]
        out = monkey_generate(pipe, ON, **call())
        styled = pipe(**call()).images
    finally:
        set_scale(pipe, 1.0)
    assert out.skipped_reason is None and out.statuses[0].startswith("masked ")
    assert "recorded from the unit's own keys where its IP-Adapter weight is 0" in out.statuses[0]
    assert "(up_blocks.0.attentions.1)" in out.statuses[0]
    assert not torch.equal(out.images, styled)
    assert_unhooked(pipe)


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    return tiny_lcm_pipeline(tmp_path_factory.mktemp("lcm"))


@pytest.mark.parametrize("steps", [4, 6, 8])
def test_the_lcm_pipeline_stops_pass_1_after_its_last_recorded_step(lcm, steps):
    """LatentConsistencyModelPipeline (the reference's) never reads its interrupt flag; pass 1
    (4 steps, recording 1 and 2) still evaluates the UNet at its steps 0-2 only, and its image
    is LCM's denoised estimate after step 2."""
    evaluations = []  # the UNet's first convolution runs once per real evaluation
    handle = lcm.unet.conv_in.register_forward_hook(lambda *_: evaluations.append(1))
    try:
        out = monkey_generate(lcm, ON, **call(num_inference_steps=steps))
    finally:
        handle.remove()
    assert out.skipped_reason is None
    assert f"recorded steps 1, 2 of {PASS1_MIN_STEPS}, masked steps" in out.statuses[0]
    assert len(evaluations) == 3 + steps  # pass 1 steps 0-2, then every pass-2 step
    seen = {}

    def grab(_pipe, index, _t, tensors):
        if index == 2:
            seen["denoised"] = tensors["denoised"]
        return {}

    lcm(
        **call(
            num_inference_steps=4,
            callback_on_step_end=grab,
            callback_on_step_end_tensor_inputs=["denoised"],
        )
    )
    with torch.no_grad():
        decoded = lcm.vae.decode(seen["denoised"] / lcm.vae.config.scaling_factor).sample
    assert torch.equal(out.first_images, lcm.image_processor.postprocess(decoded, "pt"))
    assert "forward" not in vars(lcm.unet) and "step" not in vars(lcm.scheduler)
    assert not getattr(lcm, "_interrupt", False)
    assert_unhooked(lcm, check_interrupt=False)


def test_clear_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="ip_adapter_image"):
        monkey_generate(pipe, ON, **call(ip_adapter_image=None))
    with pytest.raises(ValueError, match="name the mask layer"):
        monkey_generate(pipe, {}, **call())
    with pytest.raises(ValueError, match="threshold"):
        monkey_generate(pipe, {"threshold": 2}, **call())
    assert_unhooked(pipe)


def test_mask_images_follow_the_mask_set():
    from monkey.diffusers.pipeline import mask_images

    binary = torch.tensor([[[True, False], [False, False]]])
    masks = MaskSet(binary, [None], [0.5], [1])
    (image,) = mask_images(masks, (8, 8), (64, 64))
    pixels = np.array(image)
    assert pixels[:32, :32].min() == 255 and pixels[32:].max() == 0 and pixels[:, 32:].max() == 0


def test_sdxl_pipeline_and_its_img2img(tmp_path, forced_mask):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from tiny_pipeline import tiny_xl_pipeline

    xl = tiny_xl_pipeline(tmp_path)
    out = monkey_generate(xl, ON, **call())
    assert out.statuses[0].startswith("masked")
    assert "recorded steps 1, 2 of 4, masked steps 2-5 of 8" in out.statuses[0]
    forced_mask(True)
    ones = monkey_generate(xl, EVERY_STEP, **call())
    assert torch.equal(ones.images, xl(**call()).images)
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(xl)
    extra = {"image": reference(3).resize((SIZE, SIZE)), "strength": 0.5}
    ones = monkey_generate(img2img, EVERY_STEP, **call(**extra))
    assert torch.equal(ones.images, img2img(**call(**extra)).images)
    assert_unhooked(img2img)
