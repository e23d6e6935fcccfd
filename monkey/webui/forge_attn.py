"""MONKEY's stand-in for one of Forge's IP-Adapter attn2 patches.

Forge's IP-Adapter (``sd_forge_ipadapter``, a port of ComfyUI_IPAdapter_plus) registers one
``CrossAttentionPatch`` per attn2 layer in ``model_options["transformer_options"]
["patches_replace"]["attn2"]``; the UNet calls it as ``patch(q, k, v, extra_options)`` with the
projected ``[B, L, heads·dim_head]`` tensors and the patch returns the text attention plus, for
each unit in its sigma window, that unit's weighted IP attention. Several units share one patch
object: its lists (``weights``, ``ipadapters``, ``conds``, ``unconds``, ``sigma_start``,
``sigma_end``, ``masks`` ...) hold one entry per unit, in the order the units were applied.

``MonkeyAttn2`` wraps such a patch without changing it. Recording recomputes a unit's IP keys
(``ip_layers.to_kvs[k_key]``, as the patch does on every call) for the query of that call, for
each unit the session records (the source unit in mask mode ``shared``, every unit in
``per_unit``), each only inside its own sigma window;
masking calls *views* of the patch: shallow copies whose per-unit lists keep only some units, so
the patch's own arithmetic gives the text attention (no unit) and each unit's contribution
(``view(unit) − text``), and the mask multiplies that contribution per unit:
``out = text + Σ_u M_u · (view(u) − text)``. With every mask all ones the patch's own output is
returned untouched, so an all-ones mask is plain IP-Adapter bit for bit. The same class serves
reForge, whose ``CrossAttentionPatch`` has the same lists (it applies the unit weight twice,
which MONKEY leaves to it).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..attention import split_heads
from ..session import IPAction, MonkeySession

logger = logging.getLogger("monkey")

UNIT_LISTS_ANCHOR = "weights"
"""The per-unit list whose length is the patch's unit count."""

NO_SIGMA = 999999999.9
"""The sigma Forge's patch assumes when ``extra_options`` carries none (every unit active)."""


def layer_name(key: tuple) -> str:
    """The ldm module path of the attn2 layer a ``patches_replace`` key names: ``("output", 4)``
    is ``output_blocks.4.1.transformer_blocks.0.attn2``, SDXL's ``("input", 7, 3)`` the fourth
    transformer of ``input_blocks.7.1``, ``("middle", 0[, i])`` the middle block's."""
    block, number, *rest = key
    index = rest[0] if rest else 0
    if block == "middle":
        prefix = "middle_block.1"
    elif block in ("input", "output"):
        prefix = f"{block}_blocks.{number}.1"
    else:
        raise ValueError(f"unknown attn2 block {key!r}")
    return f"{prefix}.transformer_blocks.{index}.attn2"


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
    sigmas = extra_options.get("sigmas")
    sigma = float(sigmas[0]) if sigmas is not None else NO_SIGMA
    return not (sigma > patch.sigma_start[unit] or sigma < patch.sigma_end[unit])


def _embedding_rows(embedding: torch.Tensor, chunk: int) -> torch.Tensor:
    """One image embedding per row of a chunk: the patch repeats a single embedding, and with
    ``unfold_batch`` pads (last one repeated) or truncates one per image."""
    if embedding.shape[0] == chunk:
        return embedding
    if embedding.shape[0] == 1:
        return embedding.expand(chunk, *embedding.shape[1:])
    if embedding.shape[0] > chunk:
        return embedding[:chunk]
    pad = embedding[-1:].expand(chunk - embedding.shape[0], *embedding.shape[1:])
    return torch.cat([embedding, pad])


def ip_key(patch: Any, unit: int, query: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """``[R, heads, T, d]`` IP keys of ``unit`` for the rows of this call: the cond embedding for
    cond chunks, the uncond one for uncond chunks (``cond_or_uncond``: 0 cond, 1 uncond), projected
    by the adapter's own ``to_kvs`` as the patch does; not scaled by the unit weight."""
    kinds = extra_options["cond_or_uncond"]
    chunk = query.shape[0] // len(kinds)
    to_k = patch.ipadapters[unit].ip_layers.to_kvs[patch.k_key]
    with torch.no_grad():
        keys = [
            to_k(_embedding_rows((patch.conds, patch.unconds)[kind][unit], chunk)) for kind in kinds
        ]
    return split_heads(torch.cat(keys).to(query.device), int(extra_options["n_heads"]))


class MonkeyAttn2:
    """Stands in for one IP-Adapter attn2 patch while a batch samples.

    Inert once its session has ended. Attribute reads and ``set_new_condition`` reach the wrapped
    patch (the IP-Adapter appends a unit to an existing entry); a deep copy (``UnetPatcher.clone``)
    copies the patch and keeps the session, so a clone made after ours records and masks too.
    """

    def __init__(
        self,
        patch: Any,
        layer: str,
        session: MonkeySession,
        records: bool,
    ):
        self.patch = patch
        self.layer = layer
        self.session = session
        self.records = records
        """Whether this is a source layer (the session says which units record, and when)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "patch" not in self.__dict__:
            raise AttributeError(name)
        value = getattr(self.__dict__["patch"], name)
        if name == "to" and callable(value):  # ModelPatcher.model_patches_to: keep us in place

            def to(*args: Any, **kwargs: Any) -> Any:
                moved = value(*args, **kwargs)
                return self if moved is self.patch else self.rewrap(moved)

            return to
        return value

    def rewrap(self, patch: Any) -> MonkeyAttn2:
        return MonkeyAttn2(patch, self.layer, self.session, self.records)

    def __deepcopy__(self, memo: dict) -> MonkeyAttn2:
        return self.rewrap(copy.deepcopy(self.patch, memo))

    def __call__(self, q, k, v, extra_options):
        session, patch = self.session, self.patch
        if not session.active:
            return patch(q, k, v, extra_options)
        kinds = extra_options["cond_or_uncond"]
        latent_hw = tuple(extra_options["original_shape"][-2:])
        # rows say what they are: chunks of one prompt for every image, uncond usually first
        session.begin_unet_chunks(
            [kind == 0 for kind in kinds], q.shape[0] // len(kinds), latent_hw
        )
        action = session.ip_action()
        if action is IPAction.OFF:
            return view(patch, ())(q, k, v, extra_options)
        if self.records and session.wants_record(self.layer):
            self._record(q, extra_options)
        if action is IPAction.PLAIN:
            return patch(q, k, v, extra_options)
        return self._masked(q, k, v, extra_options)

    def _record(self, q: torch.Tensor, extra_options: dict) -> None:
        patch, session = self.patch, self.session
        query = None
        for unit in range(unit_count(patch)):
            if not session.wants_record(self.layer, unit):
                continue
            if not in_window(patch, unit, extra_options):
                continue  # the unit is outside its own start/end: its attention does not exist
            if query is None:
                query = split_heads(q, int(extra_options["n_heads"]))
            session.observe(self.layer, query, ip_key(patch, unit, q, extra_options), unit)

    def _masked(self, q, k, v, extra_options):
        patch, session = self.patch, self.session
        units = range(unit_count(patch))
        # the mask of each unit's contribution: the shared mask, or (``per_unit``) the unit's own
        weights = {unit: session.weights(q.shape[1], q.device, q.dtype, unit) for unit in units}
        if all(session.weights_are_ones(w) for w in weights.values()):
            return patch(q, k, v, extra_options)  # plain IP-Adapter, bit for bit
        text = view(patch, ())(q, k, v, extra_options)
        out = text
        for unit, weight in weights.items():
            if session.weights_are_zeros(weight) or not in_window(patch, unit, extra_options):
                continue
            alone = patch if len(units) == 1 else view(patch, (unit,))
            out = out + weight * (alone(q, k, v, extra_options) - text)
        return out
