"""The two passes, independent of any host.

The host supplies a sampling callable (which it may end early when ``session.should_stop()``),
a way to reset the noise to what pass 1 started from, and its hooks; this module sequences them
and guarantees the hooks are gone and the session idle however a pass ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .hooks import HookSet
from .kept import KeptMaps, MapStore
from .maskset import MaskSet, UnitMasks
from .session import MonkeySession, Phase

T = TypeVar("T")


@dataclass
class TwoPassResult(Generic[T]):
    samples: T
    """Pass 2's samples, or pass 1's when pass 2 did not run."""
    first: T | None
    masks: MaskSet | UnitMasks | None
    """The shared masks, or each unit's (mask mode ``per_unit``); None when pass 2 did not run."""
    skipped_reason: str | None = None
    """Why pass 2 did not run, if it did not."""
    kept: KeptMaps | None = None
    """Pass 1's maps under its fingerprint: the ones reused, or the ones it just recorded."""
    reused: bool = False
    """Pass 1 was not run: its kept maps were (``first`` is then None)."""

    @property
    def masked(self) -> bool:
        return self.skipped_reason is None


def run_two_pass(
    session: MonkeySession,
    sample: Callable[[Phase], T],
    *,
    reset_noise: Callable[[], None],
    hooks: HookSet | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    first_is_final: bool = True,
    store: MapStore | None = None,
) -> TwoPassResult[T]:
    """``first_is_final``: pass 1, when it runs to its end, is what a plain generation gives
    (false when the host changes pass 1, e.g. without hires fix); if nothing was recorded the
    plain generation is then sampled again, with MONKEY idle, so no image is lost or shrunk.

    Kept maps: a host that fingerprints pass 1 (``session.identify``) ends pass 1 at its first
    denoiser call when the session reuses kept maps; what a pass 1 that ran recorded goes to
    ``store`` under its fingerprint."""
    hooks = hooks or HookSet()
    with hooks:
        try:
            session.begin(Phase.RECORD)
            first = sample(Phase.RECORD)
        finally:
            session.end()
        reused = session.reused
        if reused:
            first = None  # pass 1 ended before its first UNet call: nothing of it to show
        if cancelled():
            return TwoPassResult(first, first, None, "interrupted after pass 1")
        if not session.has_data:
            reason = (
                "no IP-Adapter attention was recorded in the record window "
                "(is the unit's start/end excluding it?)"
            )
            if first_is_final:  # pass 1 only stops early after recording: it ran to its end
                return TwoPassResult(first, first, None, reason)
            reset_noise()
            return TwoPassResult(sample(Phase.IDLE), first, None, reason)
        masks = session.build_masks()
        kept = session.kept or session.keep()
        if store is not None and kept is not None and not reused:
            store.put(kept)
        reset_noise()
        try:
            session.begin(Phase.APPLY)
            second = sample(Phase.APPLY)
        finally:
            session.end()
    return TwoPassResult(second, first, masks, kept=kept, reused=reused)
