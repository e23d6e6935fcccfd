"""Which sampler steps MONKEY records and masks, and which step a denoiser call belongs to.

Steps are sampler steps, not denoiser calls: second-order samplers evaluate the model more than
once per step and adaptive ones an unknown number of times, so the step of a call is read off
the noise level it runs at, against the schedule the sampler was given.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .args import ALL, PASS1_MIN_STEPS, MonkeyArgs, Pass1Steps, RecordSteps

_EPS = 1e-9
"""Fractions times step counts land on integers up to rounding (0.3 · 10 = 3.0000000000000004)."""


def window(total: int, start: float, end: float) -> range:
    """Steps ``i`` of ``total`` with ``floor(start·n) ≤ i < ceil(end·n)``.

    For [0.25, 0.75) this is the reference code's ``range(n)[n//4 : -(n//4)]`` at every n ≥ 4
    (below 4 the reference's slice is empty; this window still holds a step); ``end = 1``
    includes the last step.
    """
    return range(
        max(0, math.floor(start * total + _EPS)), min(total, math.ceil(end * total - _EPS))
    )


def spread(steps: range, count: RecordSteps) -> tuple[int, ...]:
    """``count`` steps spread evenly over ``steps``: the steps whose cells hold the window's
    quantiles ``(j + ½)/count``; all of them for ``"all"`` or a count beyond the window."""
    if count == ALL or count >= len(steps):
        return tuple(steps)
    return tuple(sorted({steps[math.floor((j + 0.5) * len(steps) / count)] for j in range(count)}))


def pass1_length(steps: int, setting: Pass1Steps) -> int:
    """Pass 1's own step count for a generation of ``steps`` steps.

    ``setting`` up to 1 is a fraction of ``steps`` (half up), above 1 a step count (see
    ``args.pass1_steps``). Either way pass 1 runs at least ``PASS1_MIN_STEPS``, the reference's
    fixed 4, and at most ``steps``: a 4-step pass 1 (every 4- to 8-step generation at the
    default 0.5) records the reference's steps 1 and 2, and no pass 1 of 4 or more steps
    records the pure-noise step 0. A generation of 1 to 3 steps runs pass 1 on its own schedule.
    """
    wanted = setting if setting > 1 else math.floor(setting * steps + 0.5)
    return min(steps, max(PASS1_MIN_STEPS, int(wanted)))


@dataclass(frozen=True)
class StepPlan:
    """What one pass of ``total`` steps does at each step."""

    total: int
    record: tuple[int, ...]
    apply: range

    @classmethod
    def of(
        cls,
        total: int,
        record_window: tuple[float, float],
        record_steps: RecordSteps,
        apply_window: tuple[float, float],
    ) -> StepPlan:
        return cls(
            total,
            spread(window(total, *record_window), record_steps),
            window(total, *apply_window),
        )

    @classmethod
    def for_settings(cls, total: int, args: MonkeyArgs) -> StepPlan:
        """The plan of a sampler run of ``total`` steps under the user's settings."""
        return cls.of(
            total,
            (args.record_start, args.record_end),
            args.record_steps,
            (args.apply_start, args.apply_end),
        )

    @property
    def last_record(self) -> int | None:
        return self.record[-1] if self.record else None


class StepClock:
    """Maps the noise level of each denoiser call to the sampler step it belongs to.

    ``levels`` are the noise levels (sigmas, or timesteps for DDIM-style samplers) at which the
    steps start, in sampling order (descending). A call at level ``s`` belongs to the step whose
    interval ``(levels[i+1], levels[i]]`` holds it: midpoint evaluations (DPM2, DPM++ 2S a,
    DPM++ SDE) fall inside their step, calls above the first level count as step 0, and calls
    below the last level (past the nominal total) as the last step.

    Heun-like samplers evaluate a step again at the *next* step's level; such a call cannot be
    told from the next step's first call by its level, so the sampler's kind decides:
    ``end_evals`` is how many leading steps do that (Heun, Restart: all; PLMS: its first).
    Their first call at ``levels[i+1]`` then stays in step ``i``.
    """

    def __init__(self, levels: Sequence[float], end_evals: int = 0):
        levels = [float(level) for level in levels]
        if not levels:
            raise ValueError("a step clock needs at least one step")
        if any(a < b for a, b in itertools.pairwise(levels)):
            raise ValueError(f"noise levels must not increase, got {levels}")
        self.levels = levels
        self.end_evals = end_evals
        self._last: tuple[float, int] | None = None

    @property
    def total(self) -> int:
        return len(self.levels)

    def _near(self, a: float, b: float) -> bool:
        return abs(a - b) <= 1e-4 * max(abs(a), abs(b), 1e-8)

    def step_at(self, level: float) -> int:
        step = sum(1 for point in self.levels[1:] if point > level or self._near(point, level))
        last = self._last
        if (
            step >= 1
            and step - 1 < self.end_evals
            and self._near(level, self.levels[step])
            and last is not None
            and last[1] == step - 1
            and not self._near(last[0], level)
        ):
            step -= 1
        self._last = (level, step)
        return step
