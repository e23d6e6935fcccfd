"""Images MONKEY shows after the generated ones: each mask, and optionally pass 1's image."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import masks as M
from ..masks import MaskStatus
from ..maskset import PX_PER_LATENT, MaskSet, UnitMasks

UNIT_COLOURS = (
    (255, 64, 64),
    (64, 200, 255),
    (255, 210, 0),
    (120, 255, 90),
    (230, 90, 255),
    (255, 140, 40),
    (0, 255, 200),
    (255, 255, 255),
)
"""Unit k's colour in the per-unit preview (repeating past eight units)."""
DIM = 0.35
"""Brightness of the generated image under the per-unit colours."""
ALPHA = 0.65


def _pixels(masks: MaskSet, image: int, size: tuple[int, int]) -> torch.Tensor:
    """``[height, width]`` float mask of ``image`` at ``size`` (width, height)."""
    width, height = size
    latent_hw = (max(1, height // PX_PER_LATENT), max(1, width // PX_PER_LATENT))  # as the WebUI
    latent = masks.latent_masks(latent_hw)[image : image + 1]
    return M.resize(latent, (height, width))[0].clamp(0, 1)


def mask_image(masks: MaskSet, image: int, size: tuple[int, int]) -> Image.Image:
    """The mask pass 2 applied to ``image`` (dilated and feathered), as a greyscale image of
    ``size`` (width, height): white is subject, where IP-Adapter acts."""
    full = _pixels(masks, image, size)
    return Image.fromarray((full * 255).round().to(torch.uint8).numpy())


def unit_mask_images(masks: UnitMasks, image: int, size: tuple[int, int]) -> list[Image.Image]:
    """Each unit's plain mask of ``image`` (as ``mask_image``), in unit order."""
    return [mask_image(unit_masks, image, size) for unit_masks in masks.units]


def unit_overlay(generated: Image.Image, masks: UnitMasks, image: int) -> Image.Image:
    """Each unit's region in its own colour (``UNIT_COLOURS``) over a dimmed copy of the
    generated image. A unit that fell back to plain IP-Adapter acts everywhere and is left
    uncoloured (its status says so), so it does not hide the others' regions."""
    rgb = torch.from_numpy(np.asarray(generated.convert("RGB"), dtype=np.float32))
    out = rgb * DIM
    for unit, unit_masks in enumerate(masks.units):
        if unit_masks.statuses[image] in (MaskStatus.NO_SIGNAL, MaskStatus.EMPTY):
            continue
        alpha = ALPHA * _pixels(unit_masks, image, generated.size)[..., None]
        colour = torch.tensor(UNIT_COLOURS[unit % len(UNIT_COLOURS)], dtype=torch.float32)
        out = out * (1 - alpha) + colour * alpha
    return Image.fromarray(out.round().clamp(0, 255).to(torch.uint8).numpy())


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """``[H, W, 3]`` uint8."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))


def samples_to_images(p: Any, samples: torch.Tensor) -> list[Image.Image]:
    """Decode latents with the WebUI's VAE path (pass 1 stops early: this is its x0 estimate)."""
    from modules import devices, processing

    decoded = processing.decode_latent_batch(
        p.sd_model, samples, target_device=devices.cpu, check_for_nans=False
    )
    out = []
    for sample in decoded:
        array = torch.clamp((sample.float() + 1.0) / 2.0, 0.0, 1.0).numpy()
        out.append(Image.fromarray((255.0 * np.moveaxis(array, 0, 2)).astype(np.uint8)))
    return out


def previews_of(
    masks: MaskSet | UnitMasks, image: int, generated: Image.Image, api: bool
) -> tuple[list[Image.Image], dict[str, Image.Image]]:
    """What follows generated image ``image``: the previews to show (the mask; per unit, the
    colour preview, then for the API each unit's plain mask) and the masks to save, by suffix."""
    if isinstance(masks, MaskSet):
        mask = mask_image(masks, image, generated.size)
        return [mask], {"-monkey-mask": mask}
    plain = unit_mask_images(masks, image, generated.size)
    shown = [unit_overlay(generated, masks, image), *(plain if api else [])]
    return shown, {f"-monkey-mask-unit{unit}": mask for unit, mask in enumerate(plain)}
