"""Images MONKEY shows after the generated ones: each mask, and optionally pass 1's image."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import masks as M
from ..maskset import PX_PER_LATENT, MaskSet


def mask_image(masks: MaskSet, image: int, size: tuple[int, int]) -> Image.Image:
    """The mask pass 2 applied to ``image`` (dilated and feathered), as a greyscale image of
    ``size`` (width, height): white is subject, where IP-Adapter acts."""
    width, height = size
    latent_hw = (max(1, height // PX_PER_LATENT), max(1, width // PX_PER_LATENT))  # as the WebUI
    latent = masks.latent_masks(latent_hw)[image : image + 1]
    full = M.resize(latent, (height, width))[0]
    return Image.fromarray((full.clamp(0, 1) * 255).round().to(torch.uint8).numpy())


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
