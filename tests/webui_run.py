"""Build and run a generation in the fake WebUI (A1111 + sd-webui-controlnet, or Forge with its
integrated ControlNet), with or without MONKEY and an IP-Adapter unit."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from fake_controlnet import FakeControlNetScript
from fake_forge import FakeForgeControlNetScript, ForgeImg2Img, ForgeTxt2Img, new_forge_model
from fake_webui import FakeSDModel, WebUI, new_unet

from monkey import args as A
from monkey.args import MonkeyArgs


class UNetCalls:
    """Counts UNet calls and the latent sizes they ran at, per ``p.sample`` call."""

    def __init__(self, unet: torch.nn.Module):
        self.sizes: list[tuple[int, int]] = []
        self.handle = unet.register_forward_pre_hook(
            lambda _m, args: self.sizes.append(tuple(args[0].shape[-2:]))
        )

    def close(self) -> None:
        self.handle.remove()


def monkey_values(settings: MonkeyArgs) -> list[Any]:
    return [getattr(settings, name) for name in A.names()]


def make_p(
    webui: WebUI,
    settings: MonkeyArgs | dict | None = None,
    *,
    units: list[dict] | None = None,
    controlnet: bool = True,
    monkey: bool = True,
    img2img: bool = False,
    script_args: list | None = None,
    init_seed: int = 5,
    forge: bool = False,
    **kwargs: Any,
):
    """A processing object whose runner holds ControlNet (if any) then MONKEY (if installed), as
    both hosts order them (Forge loads its built-in extensions first)."""
    model = new_forge_model() if forge else FakeSDModel(new_unet())
    webui.shared.sd_model = model
    scripts = []
    if controlnet:
        scripts.append((FakeForgeControlNetScript if forge else FakeControlNetScript)(units))
    monkey_script = None
    if monkey:
        monkey_script = webui.script_module.MonkeyScript()
        monkey_script.is_img2img = img2img
        monkey_script.controls = monkey_script.ui(img2img)
        scripts.append(monkey_script)
    args: list[Any] = []
    for script in scripts:
        script.args_from = len(args)
        if script is monkey_script:
            if script_args is not None:
                args.extend(script_args)
            elif isinstance(settings, dict):
                args.extend([settings, *[c.value for c in monkey_script.controls[1:]]])
            else:
                args.extend(monkey_values(settings or MonkeyArgs(enabled=True)))
        script.args_to = len(args)
    runner = webui.scripts.ScriptRunner(scripts, webui.errors)
    processing = webui.processing
    txt2img, img2img_class = (
        (ForgeTxt2Img, ForgeImg2Img)
        if forge
        else (
            processing.StableDiffusionProcessingTxt2Img,
            processing.StableDiffusionProcessingImg2Img,
        )
    )
    if img2img:
        gen = torch.Generator().manual_seed(init_seed)
        size = (kwargs.get("height", 64) // 8, kwargs.get("width", 64) // 8)
        init = torch.randn(kwargs.get("batch_size", 1), 4, *size, generator=gen)
        p = img2img_class(
            sd_model=model, scripts=runner, script_args=args, init_latent=init, **kwargs
        )
    else:
        p = txt2img(sd_model=model, scripts=runner, script_args=args, **kwargs)
    p.monkey_script, p.controlnet = monkey_script, (scripts[0] if controlnet else None)
    return p


make_forge_p = functools.partial(make_p, forge=True)


def attn2_of(unet_patcher) -> dict:
    """Forge: the attn2 replacement patches of a UNet patcher, by key."""
    options = unet_patcher.model_options.get("transformer_options", {})
    return dict(options.get("patches_replace", {}).get("attn2", {}))


def generate(webui: WebUI, p) -> Any:
    webui.state.reset()
    return webui.processing.process_images(p)


def latents(p) -> torch.Tensor:
    return torch.cat(p.latents)


def with_fields(settings: MonkeyArgs, **changes: Any) -> MonkeyArgs:
    return dataclasses.replace(settings, **changes)
