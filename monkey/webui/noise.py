"""Pass 2 draws exactly pass 1's noise: ``p.rng`` rebuilt as the WebUI built it."""

from __future__ import annotations

import copy
from typing import Any


def reset_rng(p: Any) -> None:
    """Rebuild ``p.rng`` with the arguments ``process_images_inner`` uses, so pass 2 draws the
    same initial and per-step noise as pass 1 (ImageRNG is stateful)."""
    from modules import processing, rng, shared

    current = getattr(p, "rng", None)
    inner = current if isinstance(current, rng.ImageRNG) else getattr(current, "rng", None)
    shape = getattr(inner, "shape", None)
    if shape is None:  # the latent shape the WebUI built it with (Forge reads it from its VAE)
        channels = getattr(shared.sd_model, "latent_channels", processing.opt_C)
        shape = (channels, p.height // processing.opt_f, p.width // processing.opt_f)
    fresh = rng.ImageRNG(
        shape,
        p.seeds,
        subseeds=p.subseeds,
        subseed_strength=p.subseed_strength,
        seed_resize_from_h=p.seed_resize_from_h,
        seed_resize_from_w=p.seed_resize_from_w,
    )
    if current is not None and not isinstance(current, rng.ImageRNG) and hasattr(current, "rng"):
        wrapper = copy.copy(current)  # e.g. ControlNet's HackedImageRNG around an ImageRNG
        wrapper.rng = fresh
        fresh = wrapper
    p.rng = fresh
