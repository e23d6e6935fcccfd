"""ComfyUI_IPAdapter_plus's attn2 patches, found on a MODEL and wrapped on a clone of it.

Every IPAdapter node (``IPAdapterAdvanced``, ``IPAdapter``, ``IPAdapterEmbeds`` ...) clones the
MODEL and puts one ``Attn2Replace`` per cross-attention block into its
``model_options["transformer_options"]["patches_replace"]["attn2"]``; a second IPAdapter node on
the same chain appends its callback and kwargs to the ``Attn2Replace`` it finds there. So each
patch's ``callback`` / ``kwargs`` lists hold one entry per IPAdapter node, in the order they were
applied: those are MONKEY's units. The callback returns a unit's weighted image attention, which
``Attn2Replace.__call__`` adds to the text attention while ``sigma_end ≤ sigma ≤ sigma_start``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..attn2 import MonkeyAttn2, chunk_keys, layer_name, sigma_of
from ..patcher import attn2_entries, clone_sharing
from ..session import MonkeySession

UNIT_KWARGS = ("ipadapter", "cond", "uncond", "module_key", "sigma_start", "sigma_end")
"""What every unit's kwargs carry (``ipadapter_execute``'s ``patch_kwargs``)."""


def is_ip_patch(patch: Any) -> bool:
    """An ``Attn2Replace`` of ComfyUI_IPAdapter_plus: callable, a callback and the IPAdapter's
    kwargs per unit."""
    callbacks, kwargs = getattr(patch, "callback", None), getattr(patch, "kwargs", None)
    return (
        callable(patch)
        and isinstance(callbacks, list)
        and isinstance(kwargs, list)
        and len(callbacks) == len(kwargs) > 0
        and all(isinstance(kw, dict) and all(name in kw for name in UNIT_KWARGS) for kw in kwargs)
    )


def attn2_patches(model: Any) -> dict[tuple, Any]:
    """The IPAdapter attn2 patches of a ModelPatcher, by ``patches_replace`` key."""
    return {key: patch for key, (_, patch) in attn2_entries(model, is_ip_patch).items()}


class Attn2ReplaceUnits:
    """``PatchUnits`` of ``Attn2Replace``; one per run, shared by its wrappers, which also clocks
    the session's steps from the noise level of each UNet call."""

    def __init__(self) -> None:
        self._sigmas: Any = None
        self._sigma = 0.0

    def _level(self, extra_options: dict) -> float:
        """The call's sigma, read once per UNet call (every layer of a call gets the same
        tensor; reading it is a device sync)."""
        sigmas = extra_options.get("sigmas")
        if sigmas is not self._sigmas:
            self._sigmas, self._sigma = sigmas, sigma_of(extra_options)
        return self._sigma

    def enter(self, session: MonkeySession, extra_options: dict) -> None:
        sigmas = extra_options.get("sigmas")
        if sigmas is not None and sigmas is not self._sigmas and session.clock is not None:
            session.begin_level(self._level(extra_options))

    @staticmethod
    def _kwargs(patch: Any, unit: int, device: torch.device) -> dict:
        per_device = getattr(patch, "get_multigpu_kwargs", None)
        return (per_device(device) if per_device else patch.kwargs)[unit]

    def count(self, patch: Any) -> int:
        return len(patch.callback)

    def in_window(self, patch: Any, unit: int, extra_options: dict) -> bool:
        kwargs = patch.kwargs[unit]
        return kwargs["sigma_end"] <= self._level(extra_options) <= kwargs["sigma_start"]

    def ip_key(self, patch: Any, unit: int, q: torch.Tensor, extra_options: dict) -> torch.Tensor:
        kwargs = self._kwargs(patch, unit, q.device)
        adapter = kwargs["ipadapter"]
        clone = getattr(adapter, "get_multigpu_clone", None)
        adapter = clone(q.device) if clone else adapter
        to_k = adapter.ip_layers.to_kvs[kwargs["module_key"] + "_to_k_ip"]
        return chunk_keys(to_k, kwargs["cond"], kwargs["uncond"], q, extra_options)

    def text(self, patch: Any, q, k, v, extra_options: dict) -> torch.Tensor:
        """The patch's own arithmetic with no unit (a shallow copy without callbacks)."""
        bare = copy.copy(patch)
        bare.callback, bare.kwargs = [], []
        if isinstance(getattr(patch, "multigpu_kwargs", None), dict):
            bare.multigpu_kwargs = {device: [] for device in patch.multigpu_kwargs}
        return bare(q, k, v, extra_options)

    def contribution(self, patch: Any, unit: int, q, k, v, extra_options, text) -> torch.Tensor:
        """The unit's callback, called as ``Attn2Replace`` calls it (its output is added)."""
        kwargs = self._kwargs(patch, unit, q.device)
        return patch.callback[unit](text, q, k, v, extra_options, **kwargs)


def called_layers(patches: dict[tuple, Any]) -> dict[tuple, str]:
    """Key -> layer for the patches the UNet really calls (not SD1.5's ``("middle", 1)``)."""
    return {key: name for key in patches if (name := layer_name(key)) is not None}


def wrapped_clone(model: Any, session: MonkeySession, units: Attn2ReplaceUnits) -> Any:
    """A clone of ``model`` whose called IPAdapter patches are MONKEY's wrappers around the
    model's own patches, shared with it as its other IPAdapter patches are (not deep-copied with
    the adapter's weights); ``model`` itself is not touched."""
    entries = attn2_entries(model, is_ip_patch)
    layers = called_layers({key: patch for key, (_, patch) in entries.items()})
    replacements = {
        id(entry): MonkeyAttn2(patch, layers[key], session, units) if key in layers else patch
        for key, (entry, patch) in entries.items()
    }
    return clone_sharing(model, replacements)
