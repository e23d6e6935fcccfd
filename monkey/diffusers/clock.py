"""Which sampler step each UNet call of a diffusers pipeline's denoising loop belongs to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def loop_steps(timesteps: Sequence[float], order: int, runge_kutta: int = 0) -> list[int]:
    """The sampler step of each iteration of a pipeline's denoising loop over ``timesteps``.

    Second-order schedulers (``order == 2``: Heun, DPM2, DPM2 a, DPM-SDE) take two iterations a
    step, their last step excepted: ``2n - 1`` timesteps for ``n`` steps. PNDM without
    ``skip_prk_steps`` starts with ``runge_kutta`` iterations of four evaluations a step. Elsewhere
    a timestep repeated at once is a step evaluated a second time at the next step's timestep
    (PLMS's first step): the first of the two still belongs to the step before.
    """
    levels = [float(t) for t in timesteps]
    if order == 2:
        return [index // 2 for index in range(len(levels))]
    warmup = min(runge_kutta, len(levels))
    steps = [index // 4 for index in range(warmup)]
    step = steps[-1] if steps else -1
    for index in range(warmup, len(levels)):
        level = levels[index]
        repeated = index > warmup and level == levels[index - 1]
        again = index + 1 < len(levels) and levels[index + 1] == level
        if repeated or not (again and index > warmup):
            step += 1
        steps.append(step)
    return steps


def runge_kutta_iterations(scheduler: Any, begin: int) -> int:
    """PNDM's Runge-Kutta warm-up iterations left in a loop that starts at ``begin``."""
    prk = getattr(scheduler, "prk_timesteps", None)
    if prk is None or getattr(scheduler.config, "skip_prk_steps", True):
        return 0
    return max(0, len(prk) - begin)


class LoopClock:
    """Places each UNet call of one pipeline run on its sampler step: the call's timestep is
    matched to the next iteration of the loop that carries it (so calls skipped by an interrupt
    and repeated timesteps are both placed right)."""

    def __init__(self, timesteps: Sequence[float], order: int, runge_kutta: int = 0):
        self.levels = [float(t) for t in timesteps]
        if not self.levels:
            raise ValueError("the pipeline's denoising loop has no timesteps")
        self.steps = loop_steps(self.levels, order, runge_kutta)
        self.total = self.steps[-1] + 1
        self.next = 0

    def step_at(self, level: float) -> int:
        index = next(
            (i for i in range(self.next, len(self.levels)) if _near(self.levels[i], level)),
            min(self.next, len(self.levels) - 1),  # an unknown timestep: count the call
        )
        self.next = index + 1
        return self.steps[index]

    def peek(self) -> int | None:
        """The step of the next iteration, None after the last."""
        return self.steps[self.next] if self.next < len(self.levels) else None


def _near(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(abs(a), abs(b), 1e-8)


def loop_clock(pipe: Any) -> LoopClock:
    """The clock of the loop the pipeline runs now: the scheduler's timesteps from the begin
    index img2img sets, cut to the count the pipeline records (SDXL's ``denoising_end``)."""
    scheduler = pipe.scheduler
    begin = getattr(scheduler, "begin_index", None) or 0
    timesteps = [float(t) for t in scheduler.timesteps[begin:]]
    count = getattr(pipe, "_num_timesteps", None)
    if isinstance(count, int) and count > 0:
        timesteps = timesteps[:count]
    return LoopClock(timesteps, scheduler.order, runge_kutta_iterations(scheduler, begin))
