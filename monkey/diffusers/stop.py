"""Ending pass 1 right after its last recorded step, in any diffusers pipeline's loop.

The SD and SDXL pipelines skip the rest of their loop once ``pipe._interrupt`` is set; others
never read it (``LatentConsistencyModelPipeline``, the reference's own pipeline, in diffusers
0.42). For those the UNet's forward and the scheduler's step are frozen for the run: once pass 1
has stopped each returns its last result again and computes nothing, so the remaining
iterations leave the latents (and LCM's ``denoised``) as they were after the last recorded step,
which is what the pipeline then decodes, exactly as after an interrupt.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..hooks import AttrPatch, HookSet


def frozen_once(stopped: Callable[[], bool], original: Callable) -> Callable:
    """``original`` until ``stopped()``; from then on its last result, without calling it."""
    last: list[Any] = []

    # pipelines pick the keyword arguments they pass from the step's signature
    # (``prepare_extra_step_kwargs``: ``generator``, ``eta``), which ``wraps`` keeps
    @functools.wraps(original)
    def frozen(*args: Any, **kwargs: Any) -> Any:
        if stopped() and last:
            return last[0]
        result = original(*args, **kwargs)
        last[:] = [result]
        return result

    return frozen


def freeze_after_stop(pipe: Any, stopped: Callable[[], bool]) -> HookSet:
    """Owned patches of ``pipe.unet.forward`` and ``pipe.scheduler.step`` for one run."""
    return HookSet(
        [
            AttrPatch(pipe.unet, "forward", lambda forward: frozen_once(stopped, forward)),
            AttrPatch(pipe.scheduler, "step", lambda step: frozen_once(stopped, step)),
        ]
    )
