"""The MONKEY nodes' setting inputs, derived from the one settings model (``monkey.args``).

Each setting becomes a widget of the type its parser admits (a toggle, a bounded number, a
choice, or text for lists and words such as ``default``/``auto``), with the setting's help as its
tooltip; the node hands the values back to ``MonkeyArgs``, so a bad value fails with the same
error, naming the setting, as in the WebUI.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..args import MonkeyArgs, names, spec

WEBUI_ONLY = ("preview", "preview_pass1", "save_masks")
"""WebUI gallery settings: in ComfyUI the nodes output the MASK and the pass-1 LATENT instead."""

NODE_DEFAULTS = {"enabled": True}
"""A MONKEY node is placed to run MONKEY: on by default (the WebUI's accordion starts off)."""

FLOAT_STEP = 0.01


def setting_names() -> tuple[str, ...]:
    return tuple(name for name in names() if name not in WEBUI_ONLY)


def _default(name: str) -> Any:
    return NODE_DEFAULTS.get(name, getattr(MonkeyArgs(), name))


def widget(name: str) -> tuple:
    """The ComfyUI input type of one setting: ``(TYPE or choices, options)``."""
    setting = spec(name)
    parse, default = setting.parse, _default(name)
    options: dict[str, Any] = {"tooltip": f"{setting.help} Accepts {setting.allowed}."}
    bounds = getattr(parse, "bounds", None)
    if isinstance(default, bool):
        return ("BOOLEAN", {"default": default, **options})
    if getattr(parse, "choices", None):
        return (list(parse.choices), {"default": default, **options})
    if bounds is not None and isinstance(default, float):
        lo, hi = bounds
        return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": FLOAT_STEP, **options})
    if bounds is not None and isinstance(default, int):
        lo, hi = bounds
        return ("INT", {"default": default, "min": lo, "max": hi, **options})
    text = MonkeyArgs().to_infotext()[setting.label] if name not in NODE_DEFAULTS else str(default)
    return ("STRING", {"default": text, "multiline": False, **options})


def monkey_inputs() -> dict[str, tuple]:
    """Every node-relevant MONKEY setting, in the settings model's order."""
    return {name: widget(name) for name in setting_names()}


def settings_from(values: Mapping[str, Any]) -> MonkeyArgs:
    """The node's MONKEY inputs (missing ones keep the node defaults) as ``MonkeyArgs``."""
    given = {name: values[name] for name in setting_names() if name in values}
    return MonkeyArgs.from_dict({**NODE_DEFAULTS, **given})
