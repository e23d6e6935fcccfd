"""Which image each row of a UNet call belongs to, and whether it is a cond or an uncond row.

Samplers stack a batch's images into UNet rows in a fixed order per denoiser call, possibly
split over several UNet calls. The WebUI (``CFGDenoiser``) puts cond rows first (image i repeated
once per AND sub-prompt), then uncond rows (plus one more uncond block for edit models), and may
call the UNet once per chunk; diffusers pipelines put the uncond half first. Counting rows from
the start of each denoiser call recovers the mapping for every one of these layouts.

ComfyUI-style samplers (Forge, reForge) say what each call holds instead: a list of chunks, each
one cond or uncond prompt for every image of the batch in image order, uncond usually first,
possibly split over calls; ``RowTracker.chunks`` maps those directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RowLayout:
    cond_images: tuple[int, ...]
    """Image index of each cond row, in order."""
    n_images: int
    cond_first: bool = True
    cfg: bool = True
    """Whether uncond rows follow (or precede) the cond rows."""

    @classmethod
    def webui(cls, repeats: Sequence[int]) -> RowLayout:
        """Cond rows (image i ``repeats[i]`` times, for AND prompts), then uncond rows."""
        if not repeats or min(repeats) < 1:
            raise ValueError(
                f"every image needs at least one cond row, got repeats={list(repeats)}"
            )
        cond = tuple(i for i, n in enumerate(repeats) for _ in range(n))
        return cls(cond, len(repeats), cond_first=True)

    @classmethod
    def diffusers(cls, n_images: int, cfg: bool) -> RowLayout:
        """diffusers pipelines: ``cat([uncond, cond])`` under classifier-free guidance."""
        return cls(tuple(range(n_images)), n_images, cond_first=False, cfg=cfg)

    def row(self, index: int) -> tuple[int, bool]:
        """(image, is_cond) of row ``index`` counted from the start of a denoiser call."""
        n_cond = len(self.cond_images)
        if not self.cfg:
            return self.cond_images[index % n_cond], True
        if self.cond_first:
            if index < n_cond:
                return self.cond_images[index], True
            return (index - n_cond) % self.n_images, False
        if index < self.n_images:
            return index, False
        return self.cond_images[(index - self.n_images) % n_cond], True


@dataclass(frozen=True)
class Rows:
    """The rows of one UNet call (the same object for the same rows at every step, so what is
    derived from it is computed once per pass)."""

    images: torch.Tensor
    """``[R]`` long: image index (within the batch) of each row."""
    cond: torch.Tensor
    """``[R]`` bool: cond rows."""
    latent_hw: tuple[int, int]
    key: tuple = ()
    """Hashable identity of the rows: (image, is_cond) per row and the latent size."""
    _on: dict = field(default_factory=dict, compare=False, repr=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row images, cond row indices, their images) on ``device``; copied there once, since
        a host-to-device copy inside a UNet call waits for the device."""
        key = str(device)
        if key not in self._on:
            cond = self.cond.nonzero().squeeze(1)
            self._on[key] = (
                self.images.to(device),
                cond.to(device),
                self.images.index_select(0, cond).to(device),
            )
        return self._on[key]


class RowTracker:
    """Counts rows across the UNet calls of one denoiser call."""

    def __init__(self, layout: RowLayout):
        self.layout = layout
        self.offset = 0
        self.current: Rows | None = None
        self._seen: dict[tuple, Rows] = {}

    def new_denoiser_call(self) -> None:
        self.offset = 0
        self.current = None

    def unet_call(self, n_rows: int, latent_hw: tuple[int, int]) -> Rows:
        pairs = tuple(self.layout.row(self.offset + i) for i in range(n_rows))
        self.offset += n_rows
        return self._use(pairs, latent_hw)

    def chunks(self, kinds: Sequence[bool], chunk: int, latent_hw: tuple[int, int]) -> Rows:
        """A UNet call made of ``len(kinds)`` chunks of ``chunk`` rows: chunk ``k`` is a cond
        prompt if ``kinds[k]``, and row ``j`` of every chunk is image ``j`` of the batch."""
        if chunk != self.layout.n_images:
            raise ValueError(
                f"a UNet call in chunks of {chunk} rows does not fit a batch of "
                f"{self.layout.n_images} image(s)"
            )
        pairs = tuple((j, bool(kind)) for kind in kinds for j in range(chunk))
        return self._use(pairs, latent_hw)

    def _use(self, pairs: tuple[tuple[int, bool], ...], latent_hw: tuple[int, int]) -> Rows:
        hw = (int(latent_hw[0]), int(latent_hw[1]))
        key = (pairs, hw)
        if key not in self._seen:
            self._seen[key] = Rows(
                images=torch.tensor([image for image, _ in pairs], dtype=torch.long),
                cond=torch.tensor([cond for _, cond in pairs], dtype=torch.bool),
                latent_hw=hw,
                key=key,
            )
        self.current = self._seen[key]
        return self.current
