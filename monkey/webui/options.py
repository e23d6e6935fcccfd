"""Which settings a WebUI generation runs MONKEY with: the script's arguments over the defaults
of Settings → MONKEY, with what an XYZ-plot cell forces on top."""

from __future__ import annotations

from typing import Any

from ..args import MonkeyArgs, MonkeyArgsError
from ..kept import DEFAULT_CAPACITY

XYZ_ATTR = "_monkey_xyz"
"""Settings forced per XYZ-plot cell: ``{field: value}`` on the processing object."""


def opts_defaults() -> MonkeyArgs:
    """Defaults from Settings → MONKEY."""
    from modules import shared

    data = shared.opts.data
    return MonkeyArgs(
        threshold=data.get("monkey_threshold", MonkeyArgs.threshold),
        preview=data.get("monkey_preview", MonkeyArgs.preview),
        save_masks=data.get("monkey_save_masks", MonkeyArgs.save_masks),
    )


def opts_keeping() -> tuple[int, bool]:
    """Settings → MONKEY: how many batches' pass-1 maps are kept, and whether a generation
    reuses kept ones in place of its pass 1."""
    from modules import shared

    data = shared.opts.data
    capacity = int(data.get("monkey_kept_maps", DEFAULT_CAPACITY))
    return capacity, bool(data.get("monkey_reuse_pass1", True))


def settings_for(p: Any, script_args: tuple) -> tuple[MonkeyArgs, MonkeyArgsError | None]:
    """The generation's settings; a bad value gives an enabled run that fails with its error."""
    try:
        settings = MonkeyArgs.from_script_args(script_args, opts_defaults())
        forced = getattr(p, XYZ_ATTR, None)
        if forced:
            settings = MonkeyArgs.from_dict(forced, settings)
    except MonkeyArgsError as error:
        return MonkeyArgs(enabled=True), error
    return settings, None
