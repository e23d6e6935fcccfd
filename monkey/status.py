"""The per-image ``MONKEY status`` text: what was masked, and on which steps of which run."""

from __future__ import annotations

from .masks import MaskStatus
from .maskset import MaskSet, UnitMasks
from .session import MonkeySession, Phase


def status(masks: MaskSet | None, image: int, reason: str | None, tokens: int | None) -> str:
    if masks is None:
        return f"not masked: {reason}"
    status = masks.statuses[image]
    if status is MaskStatus.NO_SIGNAL:
        return "no attention signal, kept plain IP-Adapter"
    if status is MaskStatus.EMPTY:
        return "empty mask, kept plain IP-Adapter"
    coverage = float(masks.binary[image].float().mean())
    threshold, token = masks.thresholds[image], masks.tokens[image]
    text = f"masked {coverage:.0%} of the image"
    if threshold is not None:  # None: a mask given whole, not thresholded from a map
        text += f" at threshold {threshold:.2f}"
    if token is not None:
        text += f", token {token} of {tokens}"
    if status is MaskStatus.OVERLAP:
        return f"{text} (overlapping other units: they attend to all of it more)"
    return text if status is MaskStatus.OK else f"{text} (full mask)"


def unit_status(masks: UnitMasks, image: int) -> str:
    """Mask mode ``per_unit``: each unit's status, ``unit 0: masked 31% ...; unit 1: ...``."""
    return "; ".join(
        f"unit {unit}: {status(unit_masks, image, None, masks.token_counts[unit])}"
        for unit, unit_masks in enumerate(masks.units)
    )


def steps_text(steps: range | tuple[int, ...]) -> str:
    if not steps:
        return "none"
    if isinstance(steps, range) and len(steps) > 2:
        return f"{steps[0]}-{steps[-1]}"
    return ", ".join(str(step) for step in steps)


def schedule_text(session: MonkeySession) -> str:
    """Which steps each sampler run recorded or masked: pass 1, pass 2 and a hires pass, each
    on its own schedule."""
    parts = []
    for phase, plan in session.history:
        if phase is Phase.RECORD and session.reused:  # its plan is the kept pass 1's
            parts.append(
                f"pass 1 reused (recorded steps {steps_text(plan.record)} of {plan.total})"
            )
        elif phase is Phase.RECORD:
            parts.append(f"recorded steps {steps_text(plan.record)} of {plan.total}")
        elif phase is Phase.APPLY:
            where = "hires pass masked" if parts and parts[-1].startswith("masked") else "masked"
            parts.append(f"{where} steps {steps_text(plan.apply)} of {plan.total}")
    return "; " + ", ".join(parts) if parts else ""


def silent_text(layers: set[str]) -> str:
    """Source layers whose IP output ControlNet drops (InstantStyle weight types zero them)."""
    if not layers:
        return ""
    blocks = sorted(name.removesuffix(".transformer_blocks.0.attn2") for name in layers)
    return (
        "; recorded from the unit's own keys where its IP-Adapter weight is 0 "
        f"({', '.join(blocks)})"
    )
