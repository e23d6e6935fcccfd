"""Where a WebUI keeps its IP-Adapter units: the interface the two passes (``run``) talk to.

sd-webui-controlnet (``controlnet``) and Forge's integrated ControlNet (``forge``) each implement
it; everything else about a MONKEY generation in the WebUI is shared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..fingerprint import Fingerprint
from ..hooks import HookSet
from ..session import MonkeySession

if TYPE_CHECKING:
    from .run import MonkeyRun


class IPBatch:
    """What an IP-Adapter backend opens for one batch: its session and the hooks that live as
    long as the batch samples (the run adds the step clock and removes them all at the end)."""

    def __init__(self, session: MonkeySession, hooks: HookSet):
        self.session = session
        self.hooks = hooks

    def before_sampling(self, p: Any) -> None:
        """Each ``process_before_every_sampling`` while the batch samples, after the backend's
        own WebUI extension ran its own."""

    def silent_layers(self) -> set[str]:
        """Source layers whose IP output the backend drops (recorded from the unit's keys)."""
        return set()

    def unmasked_reason(self) -> str | None:
        """Why pass 2, though it ran, could not mask (None: it masked)."""
        return None


class IPBackend:
    """Where a WebUI keeps its IP-Adapter units."""

    def unavailable(self, p: Any) -> str | None:
        """Why MONKEY can do nothing in this generation at all (None: it may)."""
        return None

    def open_batch(self, run: MonkeyRun, p: Any, kwargs: dict) -> IPBatch | None:
        """This batch's session and hooks; None after ``run.skip`` said why there is nothing to
        mask. ``kwargs`` are ``p.sample``'s."""
        raise NotImplementedError

    def explain(self, p: Any, reason: str) -> str:
        """``reason`` pass 2 did not run, with what this backend adds to it."""
        return reason

    def fingerprint(self, p: Any, batch: IPBatch, fp: Fingerprint) -> Any:
        """Add what the backend's units make the UNet see in pass 1 (reference embeddings,
        weights, start/end, other control) to ``fp``, and return the UNet module whose weights
        the fingerprint samples; None: this backend cannot tell, so pass 1 is never reused."""
        return None


def find_script(p: Any, title: str) -> Any:
    """The AlwaysOn script of ``p`` with this title (case-insensitive), if it runs."""
    runner = getattr(p, "scripts", None)
    for script in getattr(runner, "alwayson_scripts", []) or []:
        if script.title().lower() == title.lower():
            return script
    return None
