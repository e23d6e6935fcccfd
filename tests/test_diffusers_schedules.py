"""Every scheduler the command line offers × steps 1 to 12, txt2img and img2img (strength 0.3 to 1),
with and without MONKEY: MONKEY runs wherever the plain pipeline runs, and where the plain
pipeline cannot, the command line says so in one line before loading any model.

Pass 1 runs its own shorter schedule (``pass1_length``); a schedule too short for the scheduler
(PNDM's Runge-Kutta warm-up needs 4 steps) or for img2img (``int(steps · strength)`` steps are
run) is lengthened to the shortest one the pipeline can run. Written against whatever
``pass1_length`` says, so it holds however that rule changes.
"""

from __future__ import annotations

import argparse

import diffusers
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image
from test_diffusers_pipeline import reference
from tiny_pipeline import SIZE, SOURCE, micro_unet, tiny_pipeline

from monkey.args import MonkeyArgs
from monkey.diffusers.files import SCHEDULERS
from monkey.diffusers.options import MonkeyCliError, check_schedule
from monkey.diffusers.pipeline import PipelineRun, monkey_generate
from monkey.diffusers.schedule import loop_iterations
from monkey.steps import pass1_length

NAMES = [name for name in SCHEDULERS if SCHEDULERS[name]]
STEPS = range(1, 13)
STRENGTHS = (None, 0.3, 0.4, 0.5, 0.75, 1.0)
"""None: txt2img."""
SETTINGS = MonkeyArgs(enabled=True, layers=(SOURCE,))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """The micro pipeline (txt2img, and img2img on the same parts) and each scheduler, built
    from the model's own scheduler config as ``--scheduler`` builds it."""
    txt2img = tiny_pipeline(tmp_path_factory.mktemp("schedules"), unet=micro_unet())
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(txt2img)
    img2img.set_progress_bar_config(disable=True)
    config = txt2img.scheduler.config
    schedulers = {name: getattr(diffusers, SCHEDULERS[name]).from_config(config) for name in NAMES}
    return txt2img, img2img, schedulers


def plain_runs(scheduler, steps: int, strength: float | None) -> bool:
    """The scheduler's and the img2img pipeline's own rule: does this schedule run at all?"""
    get_timesteps = StableDiffusionImg2ImgPipeline.get_timesteps if strength else None
    return loop_iterations(scheduler, steps, strength, get_timesteps) > 0


def call(strength: float | None, steps: int) -> dict:
    kwargs = {
        "prompt": "a dog",
        "ip_adapter_image": reference(),
        "num_inference_steps": steps,
        "guidance_scale": 1.0,  # one UNet row: schedules are what is tested here
        "output_type": "latent",
    }
    if strength is None:
        kwargs.update(width=SIZE, height=SIZE)
    else:
        kwargs.update(image=Image.new("RGB", (SIZE, SIZE), "gray"), strength=strength)
    return kwargs


def test_pass_1_runs_wherever_the_plain_schedule_runs(pipes):
    """Every scheduler × steps × strength, without running a UNet: pass 1's step count is a
    schedule the pipeline can run, at least ``pass1_length``, at most the generation's."""
    txt2img, img2img, schedulers = pipes
    checked = 0
    for name in NAMES:
        for strength in STRENGTHS:
            pipe = txt2img if strength is None else img2img
            pipe.scheduler = schedulers[name]
            for steps in STEPS:
                if not plain_runs(pipe.scheduler, steps, strength):
                    continue
                first = PipelineRun(pipe, SETTINGS, call(strength, steps), None).first_steps
                wanted = pass1_length(steps, SETTINGS.pass1_steps)
                where = f"{name}, {steps} steps, strength {strength}: pass 1 of {first}"
                assert min(wanted, steps) <= first <= steps, where
                assert plain_runs(pipe.scheduler, first, strength), where
                checked += 1
    assert checked > 0.8 * len(NAMES) * len(STEPS) * len(STRENGTHS)


def test_the_command_line_refuses_in_one_line_exactly_the_schedules_that_cannot_run(
    pipes, user_folder
):
    """Before any weights load, from the model's scheduler config: no refusal where the plain
    pipeline runs, one line naming the flag and the fix where it cannot."""
    _, _, schedulers = pipes
    for name in NAMES:
        for strength in (None, 0.3, 1.0):
            for steps in STEPS:
                options = argparse.Namespace(
                    model=str(user_folder / "sd15"), config=None, scheduler=name, steps=steps
                )
                runs = plain_runs(schedulers[name], steps, strength)
                if runs:
                    check_schedule(options, strength)
                    continue
                with pytest.raises(MonkeyCliError) as error:
                    check_schedule(options, strength)
                message = str(error.value)
                assert "\n" not in message and "--steps" in message, message
                assert f"--steps {steps}" in message or f"--strength {strength}" in message


# The real runs: every scheduler × steps 1..12, txt2img and img2img at strength 0.3 (the
# lowest, where pass 1 most often needs lengthening), through the whole of MONKEY. The plain
# pipeline runs at the step counts around its own limit, to hold the rule above to the truth.
REAL = [(name, strength) for name in NAMES for strength in (None, 0.3)]


def plain_output(pipe, kwargs) -> torch.Tensor | None:
    """The plain pipeline's latents, None where it fails (an img2img run of 0 steps returns an
    empty batch when it does not raise)."""
    try:
        images = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    except Exception:
        return None
    return images if images.shape[0] else None


@pytest.mark.parametrize(
    ("name", "strength"), REAL, ids=[f"{n}-{'txt2img' if s is None else s}" for n, s in REAL]
)
def test_monkey_never_raises_where_the_plain_pipeline_does_not(pipes, name, strength):
    txt2img, img2img, schedulers = pipes
    pipe = txt2img if strength is None else img2img
    pipe.scheduler = schedulers[name]
    runs = {steps: plain_runs(pipe.scheduler, steps, strength) for steps in STEPS}
    first = min(steps for steps in STEPS if runs[steps])
    for steps in {first - 1, first} & set(STEPS):
        assert (plain_output(pipe, call(strength, steps)) is not None) is runs[steps], steps
    for steps in STEPS:
        if not runs[steps]:
            continue
        kwargs = call(strength, steps)
        out = monkey_generate(pipe, SETTINGS, **kwargs, generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (1, 4, SIZE // 8, SIZE // 8), (name, steps, strength)
        assert len(out.statuses) == 1 and out.statuses[0], (name, steps, strength)
