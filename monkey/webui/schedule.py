"""The schedule each WebUI sampler run is handed, read for MONKEY's step clock.

The WebUI builds a sampler's schedule inside ``sampler.sample``/``sample_img2img`` and hands it to
``sampler.func`` as keyword arguments; wrapping ``func`` for the batch is the one place it can be
read, whatever the sampler and scheduler. An ``on_cfg_denoiser`` callback then places each
denoiser call on that schedule by its noise level, and ends pass 1 after its last recorded step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from ..hooks import CallbackHook
from ..session import MonkeySession, Phase
from ..steps import StepClock

STEP_END_EVALS = {"Heun": 1 << 30, "Restart": 1 << 30, "PLMS": 1}
"""Samplers that evaluate a step again at the next step's noise level, and for how many of their
leading steps (PLMS only on its first)."""


def sampler_clock(sampler: Any, p: Any, kwargs: dict) -> StepClock | None:
    """The step clock of one sampler run, from the schedule ``sampler.func`` is handed."""
    name = getattr(getattr(sampler, "config", None), "name", None)
    end_evals = STEP_END_EVALS.get(name, 0)
    if kwargs.get("sigmas") is not None:  # k-diffusion, Restart: the trailing 0 ends the run
        levels = [float(sigma) for sigma in kwargs["sigmas"].tolist()][:-1]
    elif kwargs.get("timesteps") is not None:  # DDIM, PLMS, UniPC: timesteps, ascending
        # one step per timestep, as the user counts them; the WebUI's DDIM-style loops never
        # evaluate the smallest one, so their last step simply never comes
        levels = sorted((float(t) for t in kwargs["timesteps"].tolist()), reverse=True)
        levels = _as_callback_levels(sampler, levels)
    elif kwargs.get("sigma_min") is not None and kwargs.get("sigma_max") is not None:
        # DPM fast / adaptive choose their own sigmas: steps of equal log-sigma length
        count = int(kwargs.get("n") or p.steps)
        high, low = math.log(float(kwargs["sigma_max"])), math.log(float(kwargs["sigma_min"]))
        levels = [math.exp(high + (low - high) * i / count) for i in range(count)]
    else:
        return None
    return StepClock(levels, end_evals) if levels else None


def _as_callback_levels(sampler: Any, timesteps: list[float]) -> list[float]:
    """Forge's timestep denoisers turn the timestep into its sigma before the denoiser callback
    (``classic_ddim_eps_estimation``), so the clock must count in sigmas there, converted as they
    convert it: ``sqrt((1 − ᾱ_t) / ᾱ_t)``."""
    denoiser = getattr(sampler, "model_wrap_cfg", None)
    if not getattr(denoiser, "classic_ddim_eps_estimation", False):
        return timesteps
    alphas = denoiser.inner_model.inner_model.alphas_cumprod
    last = int(alphas.shape[0]) - 1
    sigmas = []
    for t in timesteps:
        alpha = float(alphas[min(max(round(t), 0), last)])
        sigmas.append(((1.0 - alpha) / alpha) ** 0.5)
    return sigmas


def schedule_reader(func: Callable, sampler: Any, p: Any, session: MonkeySession) -> Callable:
    # the WebUI picks the keyword arguments it passes from inspect.signature(sampler.func), which
    # follows __wrapped__: the wrapper must show the sampler function's own signature
    @functools.wraps(func)
    def monkey_read_schedule(*args, **kwargs):
        session.use_schedule(sampler_clock(sampler, p, kwargs))
        return func(*args, **kwargs)

    return monkey_read_schedule


def denoiser_callback(
    session: MonkeySession, identify: Callable[[Any], None] | None = None
) -> CallbackHook:
    """The step clock; at pass 1's first call (before the UNet runs) ``identify(params)``
    fingerprints it, and pass 1 ends right there when its kept maps are reused."""
    from modules import script_callbacks, sd_samplers_common

    def on_cfg_denoiser(params) -> None:
        if session.clock is not None:
            sigma = params.sigma
            session.begin_level(float(sigma.max()) if hasattr(sigma, "max") else float(sigma))
        else:  # a sampler whose schedule could not be read: count its denoiser calls
            denoiser = getattr(params, "denoiser", None)
            step, total = getattr(denoiser, "step", None), getattr(denoiser, "steps", None)
            if step is None or not total:
                step, total = params.sampling_step, params.total_sampling_steps
            session.begin_step(min(int(step), int(total) - 1), int(total))
        if identify is not None and session.phase is Phase.RECORD and session.pass_id is None:
            identify(params)
        if session.should_stop():
            raise sd_samplers_common.InterruptedException  # ends pass 1; launch_sampling catches it

    return CallbackHook(
        lambda: script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="monkey_step"),
        lambda: script_callbacks.remove_callbacks_for_function(on_cfg_denoiser),
    )
