"""Which schedules a diffusers pipeline can run, and so how long MONKEY's pass 1 may be.

Pass 1 runs a shorter schedule of its own (``monkey.steps.pass1_length``). Some schedules are too
short for their pipeline: PNDM's Runge-Kutta warm-up needs 4 steps, and img2img runs only
``int(steps · strength)`` of them, none below ``1 / strength``. Rather than a table of such rules,
the scheduler (a copy) and the pipeline class's own ``get_timesteps`` are asked.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any


def loop_iterations(
    scheduler: Any,
    steps: int,
    strength: float | None = None,
    get_timesteps: Callable | None = None,
) -> int:
    """The denoising-loop iterations a pipeline runs for ``steps`` on ``scheduler`` (img2img:
    with ``strength``, through the pipeline class's ``get_timesteps``), or 0 where that schedule
    fails."""
    probe = copy.deepcopy(scheduler)
    try:
        probe.set_timesteps(steps, device="cpu")
        timesteps = probe.timesteps
        if strength is not None and get_timesteps is not None:
            timesteps, count = get_timesteps(
                SimpleNamespace(scheduler=probe), steps, strength, "cpu"
            )
            if count < 1:
                return 0
    except Exception:  # a schedule the scheduler refuses, however it says so
        return 0
    return len(timesteps)


def img2img_strength(pipe: Any, kwargs: Mapping[str, Any]) -> float | None:
    """The call's img2img strength; None for txt2img, and where SDXL's ``denoising_start``
    replaces it (that cut is the pipeline's own business)."""
    parameters = inspect.signature(pipe.__call__).parameters
    if "strength" not in parameters or kwargs.get("denoising_start") is not None:
        return None
    default = parameters["strength"].default
    return kwargs.get("strength", 1.0 if default is inspect.Parameter.empty else default)


def first_pass_steps(pipe: Any, kwargs: Mapping[str, Any], steps: int, wanted: int) -> int:
    """Pass 1's step count for a call of ``pipe`` with ``kwargs`` and ``steps``: ``wanted``, or
    the shortest longer schedule the pipeline can run when ``wanted`` is too short for it;
    ``wanted`` when not even ``steps`` runs, so that pass 1 fails as the plain call would."""
    strength = img2img_strength(pipe, kwargs)
    get_timesteps = getattr(type(pipe), "get_timesteps", None)
    for count in range(min(wanted, steps), steps + 1):
        if loop_iterations(pipe.scheduler, count, strength, get_timesteps):
            return count
    return wanted
