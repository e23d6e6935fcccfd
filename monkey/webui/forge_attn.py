"""MONKEY's stand-in for one of Forge's IP-Adapter attn2 patches.

Forge's IP-Adapter (``sd_forge_ipadapter``, a port of ComfyUI_IPAdapter_plus) registers one
``CrossAttentionPatch`` per attn2 layer in ``model_options["transformer_options"]
["patches_replace"]["attn2"]``; the UNet calls it as ``patch(q, k, v, extra_options)`` with the
projected ``[B, L, heads·dim_head]`` tensors and the patch returns the text attention plus, for
each unit in its sigma window, that unit's weighted IP attention. Several units share one patch
object: its lists (``weights``, ``ipadapters``, ``conds``, ``unconds``, ``sigma_start``,
``sigma_end``, ``masks`` ...) hold one entry per unit, in the order the units were applied.

The wrapper is the core's (``monkey.attn2``, shared with ComfyUI); ``CrossAttentionPatchUnits``
says how this patch keeps its units. Recording recomputes a unit's IP keys
(``ip_layers.to_kvs[k_key]``, as the patch does on every call) for the query of that call, for
each unit the session records (the source unit in mask mode ``shared``, every unit in
``per_unit``), each only inside its own sigma window;
masking calls *views* of the patch: shallow copies whose per-unit lists keep only some units, so
the patch's own arithmetic gives the text attention (no unit) and each unit's contribution
(``view(unit) − text``). The same class serves reForge, whose ``CrossAttentionPatch`` has the
same lists (it applies the unit weight twice, which MONKEY leaves to it).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from .. import attn2
from ..attn2 import chunk_keys, layer_name, sigma_of
from ..session import MonkeySession

__all__ = ["MonkeyAttn2", "in_window", "is_ip_patch", "layer_name", "unit_count", "view"]

UNIT_LISTS_ANCHOR = "weights"
"""The per-unit list whose length is the patch's unit count."""


def is_ip_patch(patch: Any) -> bool:
    """A CrossAttentionPatch (Forge, reForge): callable, with per-unit adapters and embeddings."""
    return callable(patch) and all(
        isinstance(getattr(patch, name, None), list)
        for name in (
            UNIT_LISTS_ANCHOR,
            "ipadapters",
            "conds",
            "unconds",
            "sigma_start",
            "sigma_end",
        )
    )


def unit_count(patch: Any) -> int:
    return len(getattr(patch, UNIT_LISTS_ANCHOR))


def view(patch: Any, units: Sequence[int]) -> Any:
    """A shallow copy of ``patch`` whose per-unit lists keep only ``units`` (none: text only)."""
    n = unit_count(patch)
    part = copy.copy(patch)
    for name, value in vars(patch).items():
        if isinstance(value, list) and len(value) == n:
            setattr(part, name, [value[u] for u in units])
    return part


def in_window(patch: Any, unit: int, extra_options: dict) -> bool:
    """The patch's own test: a unit acts while ``sigma_end <= sigma <= sigma_start``."""
    sigma = sigma_of(extra_options)
    return not (sigma > patch.sigma_start[unit] or sigma < patch.sigma_end[unit])


class CrossAttentionPatchUnits:
    """``attn2.PatchUnits`` of Forge's ``CrossAttentionPatch`` (steps come from the A1111
    host's denoiser callback, not from the call)."""

    def enter(self, session: MonkeySession, extra_options: dict) -> None:
        pass

    def count(self, patch: Any) -> int:
        return unit_count(patch)

    def in_window(self, patch: Any, unit: int, extra_options: dict) -> bool:
        return in_window(patch, unit, extra_options)

    def ip_key(self, patch: Any, unit: int, q: torch.Tensor, extra_options: dict) -> torch.Tensor:
        to_k = patch.ipadapters[unit].ip_layers.to_kvs[patch.k_key]
        return chunk_keys(to_k, patch.conds[unit], patch.unconds[unit], q, extra_options)

    def text(self, patch: Any, q, k, v, extra_options: dict) -> torch.Tensor:
        return view(patch, ())(q, k, v, extra_options)

    def contribution(self, patch: Any, unit: int, q, k, v, extra_options, text) -> torch.Tensor:
        alone = patch if unit_count(patch) == 1 else view(patch, (unit,))
        return alone(q, k, v, extra_options) - text


UNITS = CrossAttentionPatchUnits()


class MonkeyAttn2(attn2.MonkeyAttn2):
    """The core wrapper around a Forge patch: the session says which units record (each under
    its own index) and which mask applies to each."""

    def __init__(self, patch: Any, layer: str, session: MonkeySession, units: Any = UNITS):
        super().__init__(patch, layer, session, units)

    def rewrap(self, patch: Any) -> MonkeyAttn2:
        return MonkeyAttn2(patch, self.layer, self.session)
