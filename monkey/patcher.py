"""The UNet ``ModelPatcher`` of ComfyUI's lineage (ComfyUI, Forge, reForge), as MONKEY reads and
clones it.

Such a patcher keeps attn2 replacements in ``model_options["transformer_options"]
["patches_replace"]["attn2"]`` by ``(block, id[, index])`` key, and its ``clone`` deep-copies
``model_options``: with them every IP-Adapter patch, its adapter's weights and its image
embeddings (85 MB of fp32 weights for SD1.5's adapter, 1.33 GB for SDXL ViT-H's). MONKEY's
wrappers never change the patch they wrap, so its clone shares the patches instead
(``clone_sharing``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from .attn2 import MonkeyAttn2


def attn2_replace(patcher: Any) -> dict:
    """A patcher's attn2 replacements, by ``patches_replace`` key (the dict itself)."""
    options = getattr(patcher, "model_options", None) or {}
    return options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


def attn2_entries(patcher: Any, is_ip_patch: Callable[[Any], bool]) -> dict[tuple, tuple]:
    """The IP-Adapter attn2 entries of a patcher, by key: the object registered there and the
    IP-Adapter patch it is (a MONKEY wrapper found there, in a clone of a patcher MONKEY wrapped,
    counts as the patch it wraps)."""
    found = {}
    for key, entry in attn2_replace(patcher).items():
        patch = entry
        while isinstance(patch, MonkeyAttn2):
            patch = patch.patch
        if is_ip_patch(patch):
            found[key] = (entry, patch)
    return found


class _Spent:
    """What the stand-in of ``clone_sharing`` becomes once it has cloned: ComfyUI's and
    reForge's ``ModelPatcher.__del__`` detaches (ejects the model's injections if the patcher
    had them in, moves its patches), and must not run on a copy that shares the patcher's
    state (nor fail on its empty ``model_options``)."""


def clone_sharing(patcher: Any, replacements: dict[int, Any]) -> Any:
    """``patcher.clone()`` in which each object whose ``id`` is a key of ``replacements`` is that
    value, not a deep copy of it.

    Everything else is made by the patcher's own ``clone`` (whatever its host and version
    copies), from a shallow stand-in with empty ``model_options``, which are then deep-copied
    here with the replacements in ``deepcopy``'s memo; the stand-in is then inert (``_Spent``).
    The patcher itself is only read; an attribute of the clone that names the stand-in
    (``parent``) is given the patcher.
    """
    stand_in = copy.copy(patcher)
    stand_in.model_options = {}
    work = stand_in.clone()
    stand_in.__class__ = _Spent
    for name, value in list(vars(work).items()):
        if value is stand_in:
            setattr(work, name, patcher)
    work.model_options = copy.deepcopy(patcher.model_options, dict(replacements))
    return work
