"""The accordion's live mask preview: the last generation's attention map and the mask that the
sliders' current settings cut from it, drawn from the kept maps without generating.

Per image of the last kept batch, two panels side by side: the recorded attention (min-max
normalised per step, averaged over the recorded steps) as a heatmap over a dimmed copy of the
image, and the mask the current threshold, dilate, feather and outside weight make from it
(``KeptMaps.masks``, the very masks pass 2 would apply) over the same copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import masks as M
from ..args import MonkeyArgs, MonkeyArgsError
from ..kept import STORE, KeptMaps
from ..maskset import MaskSet, UnitMasks
from .images import mask_image

DIM = 0.35
"""Brightness of the image under the heatmap and the mask."""
HEAT = 0.7
"""Opacity of the heatmap."""
PREVIEW_FIELDS = ("threshold", "thresholds", "dilate", "feather", "outside_weight")
"""The accordion's components whose changes redraw the preview, in this order."""


def _colour(heat: torch.Tensor) -> torch.Tensor:
    """``[h, w]`` in [0, 1] -> ``[h, w, 3]`` in [0, 255]: blue (cold) through green to red."""
    x = heat.clamp(0, 1)[..., None]
    centres = torch.tensor([0.75, 0.5, 0.25])  # red, green, blue peak at these values
    return (1.5 - (4 * (x - centres)).abs()).clamp(0, 1) * 255


def attention_map(kept: KeptMaps, image: int, unit: int, token: int | None) -> torch.Tensor:
    """``[h, w]`` the recorded attention of ``image`` (the token chosen, for all-token maps)."""
    maps = kept.recorded[unit].maps[image].float()  # [S, h, w] or [S, T, h, w]
    if maps.ndim == 4:
        maps = maps[:, token or 0]
    norm, valid = M.minmax_normalize(maps.reshape(maps.shape[0], -1))
    heat = norm[valid].mean(dim=0) if bool(valid.any()) else torch.zeros(norm.shape[-1])
    return heat.reshape(maps.shape[-2:])


def _panels(kept: KeptMaps, masks: MaskSet, unit: int, image: int) -> list[np.ndarray]:
    base = kept.images[image].float() if image < len(kept.images) else None
    size = kept.size or (256, 256)
    if base is None:
        base = torch.zeros(size[1], size[0], 3)
    height, width = base.shape[:2]
    heat = attention_map(kept, image, unit, masks.tokens[image])
    heat = F.interpolate(heat[None, None], size=(height, width), mode="bilinear")[0, 0]
    heat_rgb = base * DIM * (1 - HEAT) + _colour(heat) * HEAT
    mask = torch.from_numpy(np.asarray(mask_image(masks, image, (width, height)), np.float32))
    masked = base * DIM + (base * (1 - DIM)) * (mask[..., None] / 255)
    return [t.round().clamp(0, 255).to(torch.uint8).numpy() for t in (heat_rgb, masked)]


def preview(kept: KeptMaps, args: MonkeyArgs) -> Image.Image:
    """Every image's (heatmap, mask) pair in a row (per unit in ``per_unit`` mode, one row each)."""
    masks = kept.masks(args)
    rows = []
    if isinstance(masks, UnitMasks):
        units = [(unit, m) for unit, m in enumerate(masks.units) if unit in kept.recorded]
    else:
        units = [(kept.source_unit, masks)]
    for unit, unit_masks in units:
        row = [p for image in range(kept.n_images) for p in _panels(kept, unit_masks, unit, image)]
        rows.append(np.concatenate(row, axis=1))
    return Image.fromarray(np.concatenate(rows, axis=0))


def on_change(*values: Any) -> Any:
    """The sliders moved: redraw from the last kept batch (None while nothing is kept or a
    value does not parse yet, e.g. half-typed thresholds)."""
    kept = STORE.latest()
    if kept is None:
        return None
    try:
        args = MonkeyArgs.from_dict(dict(zip(PREVIEW_FIELDS, values)), kept.settings)
        return preview(kept, args)
    except MonkeyArgsError:
        return None


def build(components: dict[str, Any], elem_id: str) -> Any:
    """The preview image and its wiring to the mask sliders (inside the accordion)."""
    import gradio as gr

    image = gr.Image(
        label="Mask preview (last generation: attention | mask); moves with the sliders",
        interactive=False,
        elem_id=elem_id,
    )
    inputs = [components[name] for name in PREVIEW_FIELDS]
    for name in PREVIEW_FIELDS:
        components[name].change(on_change, inputs=inputs, outputs=[image], show_progress="hidden")
    refresh = gr.Button("Show the last generation's map", elem_id=f"{elem_id}_refresh")
    refresh.click(on_change, inputs=inputs, outputs=[image], show_progress="hidden")
    return image
