"""The WebUI surfaces built from the settings model: accordion, paste-back, Settings, XYZ, API."""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable
from typing import Any

from ..args import (
    ALL,
    ATTENTION_SCALES,
    AUTO,
    DEFAULT,
    MASK_MODES,
    MonkeyArgs,
    MonkeyArgsError,
    labels,
    names,
    parse_field,
    spec,
)
from ..kept import DEFAULT_CAPACITY
from ..layers import SD1, SDXL
from ..version import __version__
from . import api, options, preview, run

logger = logging.getLogger("monkey")

SECTION = ("monkey", "MONKEY")
LAYER_CHOICES = ["default", *dict.fromkeys([*SD1.names(), *SDXL.names()])]
TOKEN_CHOICES = [DEFAULT, AUTO, *(str(i) for i in range(16))]
RECORD_STEPS_CHOICES = [ALL, *(str(i) for i in range(1, 9))]
PASS1_STEPS_CHOICES = ["0.5", "1.0", "0.25", "0.75", *(str(i) for i in (4, 6, 8, 10, 15, 20))]
"""Fractions are written with a decimal point and step counts without, as infotext writes them;
the value alone tells them apart (see ``args.Pass1Steps``)."""


def ui_value(name: str, value: Any) -> Any:
    """A parsed setting as its component shows it (lists as comma-separated text)."""
    if name == "layers":
        return ", ".join(value) if value else "default"
    if name == "thresholds":
        return ", ".join(str(v) for v in value)
    if name in ("token", "record_steps"):
        return str(value)
    if name == "pass1_steps":  # 0.5 and 1.0 as fractions, 4 as a step count
        return repr(value) if isinstance(value, float) else str(value)
    return value


def _components(script: Any, defaults: MonkeyArgs) -> dict[str, Any]:
    import gradio as gr
    from modules.ui_components import InputAccordion

    def eid(name: str) -> str:
        return script.elem_id(name)

    def slider(name: str, label: str, maximum: float = 1.0, step: float = 0.05) -> Any:
        return gr.Slider(
            0.0, maximum, value=getattr(defaults, name), step=step, label=label, elem_id=eid(name)
        )

    def check(name: str, label: str) -> Any:
        return gr.Checkbox(value=getattr(defaults, name), label=label, elem_id=eid(name))

    def choose(name: str, label: str, choices: list[str]) -> Any:
        """A dropdown that also takes typed values (any layer path, token or step count)."""
        return gr.Dropdown(
            choices,
            value=ui_value(name, getattr(defaults, name)),
            label=label,
            allow_custom_value=True,
            elem_id=eid(name),
        )

    def radio(name: str, label: str, choices: Any) -> Any:
        return gr.Radio(
            list(choices), value=getattr(defaults, name), label=label, elem_id=eid(name)
        )

    c: dict[str, Any] = {}
    with InputAccordion(False, label="MONKEY", elem_id=eid("enabled")) as enabled:
        c["enabled"] = enabled
        with gr.Row():
            c["threshold"] = slider("threshold", "Mask threshold", step=0.01)
            c["thresholds"] = gr.Textbox(
                value="",
                label="Per-image thresholds",
                placeholder="e.g. 0.5, auto, 0.4 or unit1=0.4",
                elem_id=eid("thresholds"),
            )
        with gr.Accordion("Advanced", open=False, elem_id=eid("advanced")):
            with gr.Row():
                c["layers"] = choose("layers", "Mask layer", LAYER_CHOICES)
                c["token"] = choose("token", "IP token", TOKEN_CHOICES)
                c["source_unit"] = gr.Number(
                    value=defaults.source_unit,
                    precision=0,
                    minimum=0,
                    maximum=63,
                    label="Mask from IP-Adapter unit",
                    elem_id=eid("source_unit"),
                )
                c["mask_mode"] = radio(
                    "mask_mode", "Mask mode (per_unit: one subject per unit)", MASK_MODES
                )
            with gr.Row():
                c["pass1_steps"] = choose(
                    "pass1_steps",
                    "Pass 1 steps (fraction, or a step count ≥ 4)",
                    PASS1_STEPS_CHOICES,
                )
                c["record_start"] = slider("record_start", "Record from")
                c["record_end"] = slider("record_end", "Record until")
                c["record_steps"] = choose("record_steps", "Recorded steps", RECORD_STEPS_CHOICES)
            with gr.Row():
                c["apply_start"] = slider("apply_start", "Mask from")
                c["apply_end"] = slider("apply_end", "Mask until")
                c["ip_off_outside"] = check("ip_off_outside", "IP-Adapter off outside")
            with gr.Row():
                c["outside_weight"] = slider(
                    "outside_weight", "IP weight outside the mask", step=0.01
                )
                c["dilate"] = slider("dilate", "Dilate (px)", maximum=256, step=1)
                c["feather"] = slider("feather", "Feather (px)", maximum=256, step=1)
                c["attention_scale"] = radio("attention_scale", "Attention scale", ATTENTION_SCALES)
        with gr.Row():
            c["preview"] = check("preview", "Show masks")
            c["preview_pass1"] = check("preview_pass1", "Show pass 1")
            c["save_masks"] = check("save_masks", "Save masks")
        preview.build(c, eid("mask_preview"))
        hints = {eid(name): spec(name).help for name in names()}
        gr.HTML(
            f'<div class="monkey-hints" style="display:none" data-version="{__version__}" '
            f'data-hints="{html.escape(json.dumps(hints), quote=True)}"></div>'
        )
    return c


def paste_reader(name: str) -> Callable[[dict], Any]:
    """Read one setting from pasted infotext (None leaves the component as it is)."""
    label = labels()[name]

    def read(params: dict) -> Any:
        if not any(key in params for key in labels().values()):
            return False if name == "enabled" else None
        if label not in params:
            return None
        try:
            return ui_value(name, parse_field(name, params[label]))
        except MonkeyArgsError as error:
            logger.warning("MONKEY: ignoring pasted %s", error)
            return None

    return read


def build(script: Any, is_img2img: bool) -> list[Any]:
    """``Script.ui``: components in the settings model's order; no side effects beyond the script."""
    from modules.infotext_utils import PasteField

    components = _components(script, options.opts_defaults())
    script.infotext_fields = [
        PasteField(components[name], paste_reader(name), api=name) for name in names()
    ]
    script.paste_field_names = list(labels().values())
    return [components[name] for name in names()]


# -- global registrations (once, at script import) ------------------------------------------------


def on_ui_settings() -> None:
    import gradio as gr
    from modules import shared

    defaults = MonkeyArgs()
    options = {
        "monkey_threshold": shared.OptionInfo(
            defaults.threshold,
            "Default mask threshold",
            gr.Slider,
            {"minimum": 0.0, "maximum": 1.0, "step": 0.01},
            section=SECTION,
        ),
        "monkey_preview": shared.OptionInfo(
            defaults.preview, "Show masks after the images by default", section=SECTION
        ),
        "monkey_save_masks": shared.OptionInfo(
            defaults.save_masks,
            "Save masks next to the images by default (-monkey-mask suffix)",
            section=SECTION,
        ),
        "monkey_kept_maps": shared.OptionInfo(
            DEFAULT_CAPACITY,
            "Kept pass-1 maps: how many batches' maps stay in memory for reuse, the preview and "
            "/monkey/v1/masks (a few kB per image; 0 keeps none)",
            gr.Slider,
            {"minimum": 0, "maximum": 256, "step": 1},
            section=SECTION,
        ),
        "monkey_reuse_pass1": shared.OptionInfo(
            True,
            "Reuse pass 1: a generation whose pass 1 would equal a kept one skips it (only the "
            "mask settings changed)",
            section=SECTION,
        ),
    }
    for key, option in options.items():
        shared.opts.add_option(key, option)


def _xyz_apply(name: str) -> Callable:
    def apply(p: Any, value: Any, _values: Any) -> None:
        forced = dict(getattr(p, options.XYZ_ATTR, None) or {})
        forced[name] = parse_field(name, value)
        setattr(p, options.XYZ_ATTR, forced)  # a new dict: XYZ cells are shallow copies of one p

    return apply


def _xyz_confirm(name: str) -> Callable:
    def confirm(_p: Any, values: list) -> None:
        for value in values:
            parse_field(name, value)

    return confirm


def add_xyz_axes() -> None:
    from modules import scripts

    found = [x for x in scripts.scripts_data if x.script_class.__module__ == "xyz_grid.py"]
    if not found:
        return
    xyz = found[0].module
    if any(getattr(option, "label", "").startswith("[MONKEY]") for option in xyz.axis_options):
        return
    axes = [
        ("Enabled", "enabled", str, xyz.boolean_choice(reverse=True)),
        ("Threshold", "threshold", float, None),
        ("Token", "token", str, lambda: list(TOKEN_CHOICES)),
        ("Layer", "layers", str, lambda: list(LAYER_CHOICES)),
        ("Attention scale", "attention_scale", str, lambda: list(ATTENTION_SCALES)),
        ("Recorded steps", "record_steps", str, lambda: list(RECORD_STEPS_CHOICES)),
        # str, not float: a float axis would show the step count 4 as "4.0"
        ("Pass 1 steps", "pass1_steps", str, lambda: list(PASS1_STEPS_CHOICES)),
        ("Mask mode", "mask_mode", str, lambda: list(MASK_MODES)),
    ]
    xyz.axis_options.extend(
        xyz.AxisOption(
            f"[MONKEY] {label}",
            kind,
            _xyz_apply(name),
            confirm=_xyz_confirm(name),
            **({"choices": choices} if choices else {}),
        )
        for label, name, kind, choices in axes
    )


def settings_schema() -> dict[str, Any]:
    """``GET /monkey/v1/settings``: every setting's name, infotext label, default and range."""
    defaults = MonkeyArgs()
    return {
        "version": __version__,
        "order": list(names()),
        "settings": {
            name: {
                "label": spec(name).label,
                "default": ui_value(name, getattr(defaults, name))
                if name in ("layers", "thresholds")
                else getattr(defaults, name),
                "allowed": spec(name).allowed,
                "help": spec(name).help,
            }
            for name in names()
        },
    }


def on_app_started(_demo: Any, app: Any) -> None:
    app.add_api_route("/monkey/v1/settings", settings_schema, methods=["GET"])
    api.add_routes(app)


def register_callbacks() -> None:
    from modules import script_callbacks

    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_before_ui(add_xyz_axes)
    script_callbacks.on_app_started(on_app_started)
    script_callbacks.on_script_unloaded(run.unload)
