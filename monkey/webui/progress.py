"""The WebUI's progress and interrupt state over MONKEY's two passes."""

from __future__ import annotations

from typing import Any

from ..args import MonkeyArgs
from ..session import Phase
from ..steps import StepPlan

PASS_TEXT = {
    Phase.RECORD: "MONKEY pass 1 of 2: recording the subject mask",
    Phase.APPLY: "MONKEY pass 2 of 2: masked IP-Adapter",
    Phase.IDLE: "MONKEY found nothing to mask: plain generation",
}
"""What the progress line says during each pass."""
REUSED_TEXT = "MONKEY pass 2 (pass 1 reused): masked IP-Adapter"


def show_pass(phase: Phase, reused: bool = False) -> None:
    from modules import shared

    shared.state.textinfo = REUSED_TEXT if reused and phase is Phase.APPLY else PASS_TEXT[phase]


def end_pass_one() -> None:
    from modules import shared

    shared.state.nextjob()


def cancelled() -> bool:
    from modules import shared

    return bool(shared.state.interrupted or shared.state.skipped)


def extend_progress(p: Any, settings: MonkeyArgs, steps: int) -> None:
    """Count pass 1 (``steps`` long, stopped after its last recorded step) as one more job, so
    the progress bar covers both passes."""
    from modules import shared

    state = shared.state
    if state.job_count > 0:
        state.job_count += 1
    tqdm = getattr(shared.total_tqdm, "_tqdm", None)
    if tqdm is not None and tqdm.total:
        plan = StepPlan.for_settings(steps, settings)
        last = plan.last_record
        shared.total_tqdm.updateTotal(tqdm.total + (steps if last is None else last + 1))
