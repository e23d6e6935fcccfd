"""Build and run a generation in the fake Forge, with or without MONKEY and an IP-Adapter unit."""

from __future__ import annotations

from typing import Any

import torch
from fake_forge import FakeForgeControlNetScript, ForgeImg2Img, ForgeTxt2Img, new_forge_model
from fake_webui import WebUI
from webui_run import monkey_values

from monkey.args import MonkeyArgs


def make_forge_p(
    webui: WebUI,
    settings: MonkeyArgs | None = None,
    *,
    units: list[dict] | None = None,
    controlnet: bool = True,
    monkey: bool = True,
    img2img: bool = False,
    **kwargs: Any,
):
    """A Forge processing object whose runner holds the integrated ControlNet (if any) then
    MONKEY (if installed), as Forge orders built-in extensions first."""
    model = new_forge_model()
    webui.shared.sd_model = model
    scripts = []
    if controlnet:
        scripts.append(FakeForgeControlNetScript(units))
    monkey_script = None
    if monkey:
        monkey_script = webui.script_module.MonkeyScript()
        monkey_script.controls = monkey_script.ui(img2img)
        scripts.append(monkey_script)
    args: list[Any] = []
    for script in scripts:
        script.args_from = len(args)
        if script is monkey_script:
            args.extend(monkey_values(settings or MonkeyArgs(enabled=True)))
        script.args_to = len(args)
    runner = webui.scripts.ScriptRunner(scripts, webui.errors)
    if img2img:
        gen = torch.Generator().manual_seed(5)
        size = (kwargs.get("height", 64) // 8, kwargs.get("width", 64) // 8)
        init = torch.randn(kwargs.get("batch_size", 1), 4, *size, generator=gen)
        p = ForgeImg2Img(
            sd_model=model, scripts=runner, script_args=args, init_latent=init, **kwargs
        )
    else:
        p = ForgeTxt2Img(sd_model=model, scripts=runner, script_args=args, **kwargs)
    p.monkey_script, p.controlnet = monkey_script, (scripts[0] if controlnet else None)
    return p


def attn2_of(unet_patcher) -> dict:
    options = unet_patcher.model_options.get("transformer_options", {})
    return dict(options.get("patches_replace", {}).get("attn2", {}))
