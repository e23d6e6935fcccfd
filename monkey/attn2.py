"""MONKEY around ComfyUI-style IP-Adapter attn2 replacement patches (ComfyUI, Forge, reForge).

ComfyUI's UNet (and Forge's, which is derived from it) looks every cross-attention layer up in
``transformer_options["patches_replace"]["attn2"]`` under ``(block, id, index)`` and then
``(block, id)``, and calls what it finds as ``patch(q, k, v, extra_options)`` with the projected
``[B, L, heads·dim_head]`` tensors; ``extra_options`` says what the rows are
(``cond_or_uncond``: one chunk per entry, 0 cond and 1 uncond, each chunk one row per image of
the batch), the noise level (``sigmas``) and the latent size (``original_shape``). An IP-Adapter
patch returns the text attention plus, for each of its units (one per IP-Adapter applied to the
model) inside that unit's sigma window, the unit's weighted image attention.

``MonkeyAttn2`` wraps one such patch without changing it; a ``PatchUnits`` says how one family of
patch objects keeps its units (Forge's ``CrossAttentionPatch``: parallel lists;
ComfyUI_IPAdapter_plus's ``Attn2Replace``: a callback and its kwargs per unit). Recording reads a
unit's own IP keys for the query of the call; masking multiplies each unit's contribution by its
mask: ``out = text + Σ_u M_u · contribution_u``. With every mask all ones the patch's own output
is returned untouched, so an all-ones mask is plain IP-Adapter bit for bit.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch

from .attention import split_heads
from .session import IPAction, MonkeySession

NO_SIGMA = 999999999.9
"""The sigma the patches assume when ``extra_options`` carries none (every unit acts)."""


def layer_name(key: tuple) -> str | None:
    """The ldm module path of the attn2 layer a ``patches_replace`` key reaches, or None when the
    UNet never asks for that key. ``("output", 4)`` is ``output_blocks.4.1.transformer_blocks.0
    .attn2``, SDXL's ``("input", 7, 3)`` the fourth transformer of ``input_blocks.7.1``. The UNet
    names its middle block ``("middle", 0)``: ComfyUI_IPAdapter_plus registers it as
    ``("middle", 1)``, which is never called, so that layer runs without IP-Adapter."""
    block, number, *rest = key
    index = rest[0] if rest else 0
    if block == "middle":
        if number != 0:
            return None
        prefix = "middle_block.1"
    elif block in ("input", "output"):
        prefix = f"{block}_blocks.{number}.1"
    else:
        raise ValueError(f"unknown attn2 block {key!r}")
    return f"{prefix}.transformer_blocks.{index}.attn2"


def sigma_of(extra_options: dict) -> float:
    """The noise level of the call, as the patches read it."""
    sigmas = extra_options.get("sigmas")
    return float(sigmas[0]) if sigmas is not None else NO_SIGMA


def embedding_rows(embedding: torch.Tensor, chunk: int) -> torch.Tensor:
    """One image embedding per row of a chunk: the patches repeat a single embedding, and with
    ``unfold_batch`` pad (last one repeated) or truncate one per image."""
    if embedding.shape[0] == chunk:
        return embedding
    if embedding.shape[0] == 1:
        return embedding.expand(chunk, *embedding.shape[1:])
    if embedding.shape[0] > chunk:
        return embedding[:chunk]
    pad = embedding[-1:].expand(chunk - embedding.shape[0], *embedding.shape[1:])
    return torch.cat([embedding, pad])


def chunk_keys(
    to_k: Any, cond: torch.Tensor, uncond: torch.Tensor, q: torch.Tensor, extra_options: dict
) -> torch.Tensor:
    """``[R, heads, T, d]`` IP keys for the rows of a call: ``to_k`` of the cond embedding for
    cond chunks and of the uncond one for uncond chunks (``cond_or_uncond``: 0 cond, 1 uncond;
    any other kind is cond, as the patches take it); not scaled by the unit weight."""
    kinds = extra_options["cond_or_uncond"]
    chunk = q.shape[0] // len(kinds)
    with torch.no_grad():
        keys = [to_k(embedding_rows(uncond if kind == 1 else cond, chunk)) for kind in kinds]
    return split_heads(torch.cat(keys).to(q.device), int(extra_options["n_heads"]))


class PatchUnits(Protocol):
    """How one family of IP-Adapter attn2 patch objects keeps its units."""

    def count(self, patch: Any) -> int:
        """How many units the patch holds."""

    def in_window(self, patch: Any, unit: int, extra_options: dict) -> bool:
        """Whether ``unit`` acts at this call's noise level (the patch's own test)."""

    def ip_key(self, patch: Any, unit: int, q: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """``[R, heads, T, d]`` IP keys of ``unit`` for the rows of this call."""

    def text(self, patch: Any, q, k, v, extra_options: dict) -> torch.Tensor:
        """The patch's output with no unit: the text attention."""

    def contribution(
        self, patch: Any, unit: int, q, k, v, extra_options: dict, text: torch.Tensor
    ) -> torch.Tensor:
        """What ``unit`` adds to ``text`` at this call (it is inside its window)."""

    def enter(self, session: MonkeySession, extra_options: dict) -> None:
        """A wrapped patch is called (hosts that clock steps from the call do it here)."""


class MonkeyAttn2:
    """Stands in for one IP-Adapter attn2 patch while a batch samples.

    Inert once its session has ended. Attribute reads reach the wrapped patch (an IP-Adapter may
    append a unit to an entry it finds); ``to`` keeps the wrapper around the moved patch; a deep
    copy (``ModelPatcher.clone``) copies the patch and keeps the session, so a clone made after
    ours records and masks too.

    ``source``: the unit that records, for hosts that choose it themselves (the session is then
    told ``unit=None``); None: every unit the session wants recorded records under its index.
    """

    def __init__(
        self,
        patch: Any,
        layer: str,
        session: MonkeySession,
        units: PatchUnits,
        source: int | None = None,
    ):
        self.patch = patch
        self.layer = layer
        self.session = session
        self.units = units
        self.source = source

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

    @property
    def records(self) -> bool:
        """Whether the mask is recorded at this patch's layer (the session says which units)."""
        return self.layer in self.session.source_layers

    def rewrap(self, patch: Any) -> MonkeyAttn2:
        return type(self)(patch, self.layer, self.session, self.units, self.source)

    def __deepcopy__(self, memo: dict) -> MonkeyAttn2:
        return self.rewrap(copy.deepcopy(self.patch, memo))

    def __call__(self, q, k, v, extra_options):
        session, patch = self.session, self.patch
        if not session.active:
            return patch(q, k, v, extra_options)
        self.units.enter(session, extra_options)
        kinds = extra_options["cond_or_uncond"]
        # rows say what they are: chunks of one prompt for every image, uncond usually first
        session.begin_unet_chunks(
            [kind == 0 for kind in kinds],
            q.shape[0] // len(kinds),
            tuple(extra_options["original_shape"][-2:]),
        )
        action = session.ip_action()
        if action is IPAction.OFF:
            return self.units.text(patch, q, k, v, extra_options)
        if session.wants_record(self.layer):
            self._record(q, extra_options)
        if action is IPAction.PLAIN:
            return patch(q, k, v, extra_options)
        return self._masked(q, k, v, extra_options)

    def _record(self, q: torch.Tensor, extra_options: dict) -> None:
        session, patch, units = self.session, self.patch, self.units
        count = units.count(patch)
        if self.source is not None:
            targets = [(self.source, None)]
        else:
            targets = [(u, u) for u in range(count) if session.wants_record(self.layer, u)]
        query = None
        for unit, told in targets:
            if unit >= count or not units.in_window(patch, unit, extra_options):
                continue  # the unit is outside its own start/end: its attention does not exist
            if query is None:
                query = split_heads(q, int(extra_options["n_heads"]))
            unit_arg = () if told is None else (told,)  # None: the session's source unit
            session.observe(
                self.layer, query, units.ip_key(patch, unit, q, extra_options), *unit_arg
            )

    def _masked(self, q, k, v, extra_options):
        session, patch, units = self.session, self.patch, self.units
        count = units.count(patch)
        weights = {
            unit: session.weights(q.shape[1], q.device, q.dtype, unit) for unit in range(count)
        }
        if all(session.weights_are_ones(w) for w in weights.values()):
            return patch(q, k, v, extra_options)  # plain IP-Adapter, bit for bit
        text = units.text(patch, q, k, v, extra_options)
        out = text
        for unit, weight in weights.items():
            if session.weights_are_zeros(weight) or not units.in_window(patch, unit, extra_options):
                continue
            out = out + weight * units.contribution(patch, unit, q, k, v, extra_options, text)
        return out.to(q.dtype)
