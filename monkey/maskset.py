"""A batch's subject masks: built once from pass 1's maps, served per layer in pass 2."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import masks as M
from .args import MonkeyArgs
from .recorder import RecordedMaps

PX_PER_LATENT = 8
"""Image pixels per latent cell for the SD VAEs; dilate/feather are given in image pixels."""

_DEFAULTS = MonkeyArgs()
"""The settings model's defaults, the only ones (a mask built without settings uses them)."""


@dataclass
class MaskSet:
    binary: torch.Tensor
    """``[B_img, h, w]`` bool on the recording grid."""
    statuses: list[M.MaskStatus]
    thresholds: list[float | None]
    """Threshold used per image (Otsu's mean for ``auto``), None where there was no signal."""
    tokens: list[int | None]
    dilate_px: int = _DEFAULTS.dilate
    feather_px: int = _DEFAULTS.feather
    outside_weight: float = _DEFAULTS.outside_weight
    latent_hw: tuple[int, int] | None = None
    """Pass 1's latent, of which ``binary``'s grid is a UNet level; None: whichever latent is
    asked for (``binary``'s grid must then be one of its levels)."""
    _latent: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _layer: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.latent_hw is not None:  # a grid mismatch fails here, not inside pass 2's UNet
            self.latent_hw = (int(self.latent_hw[0]), int(self.latent_hw[1]))
            M.level_of(tuple(self.binary.shape[-2:]), self.latent_hw)

    @property
    def n_images(self) -> int:
        return self.binary.shape[0]

    def latent_masks(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """``[B_img, H, W]`` float masks at a latent size, dilated and feathered there.

        On pass 1's latent every latent cell takes its recording-grid cell's value by the UNet's
        index arithmetic (``M.regrid``), so ``weights`` at the recording layer give back the
        recorded mask unchanged. A hires-fix latent is the image resized, no UNet level of pass
        1's, so pass 1's latent mask is resized to it (nearest where it grows: stays binary).
        """
        latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        if latent_hw not in self._latent:
            source = self.latent_hw or latent_hw
            out = M.regrid(self.binary.float(), source)
            if source != latent_hw:
                out = M.resize(out, latent_hw)
            out = M.dilate(out, round(self.dilate_px / PX_PER_LATENT))
            out = M.feather(out, self.feather_px / (2 * PX_PER_LATENT))
            self._latent[latent_hw] = out
        return self._latent[latent_hw]

    def weights(
        self, n_tokens: int, latent_hw: tuple[int, int], device: torch.device
    ) -> torch.Tensor:
        """``[B_img, N]`` IP weights ``M + w_out·(1 − M)`` for a layer of ``n_tokens`` positions.

        Each layer cell is the mean of the latent cells it covers (the UNet's index arithmetic,
        ``M.regrid``). On a layer as fine as the recording layer or finer each such block lies
        in one recorded cell, so the layer holds the recorded mask's values; on a coarser layer
        (SD1's middle block, SDXL's coarsest) a cell averages its 2×2 recorded cells (0.25, 0.5,
        0.75 along the subject's edge). Both are the reference's values: it resizes an
        image-size mask to each layer with diffusers' bicubic mask downsampling, which on these
        grids copies and, one exact 2× step coarser, averages. An all-ones mask is exactly 1 on
        every layer.
        """
        key = (n_tokens, latent_hw, str(device))
        if key not in self._layer:
            hw = M.layer_size(n_tokens, latent_hw)
            layer = M.regrid(self.latent_masks(latent_hw), hw, "mean")
            layer = layer.reshape(self.n_images, -1)
            self._layer[key] = M.ip_weights(layer, self.outside_weight).to(device)
        return self._layer[key]

    def for_unit(self, unit: int | None) -> MaskSet:
        """The mask of IP-Adapter unit ``unit``: a shared mask masks every unit."""
        return self

    @classmethod
    def full(
        cls,
        n_images: int,
        hw: tuple[int, int] = (1, 1),
        status: M.MaskStatus = M.MaskStatus.FULL,
    ) -> MaskSet:
        """Masks that keep IP-Adapter everywhere (pass 2 equals plain IP-Adapter)."""
        return cls(
            binary=torch.ones(n_images, *hw, dtype=torch.bool),
            statuses=[status] * n_images,
            thresholds=[None] * n_images,
            tokens=[None] * n_images,
        )


class _ImageMask(NamedTuple):
    mask: torch.Tensor
    """``[h·w]`` bool."""
    status: M.MaskStatus
    threshold: float | None
    token: int | None
    score: torch.Tensor
    """``[h·w]`` the normalised attention (max over the valid steps) that ranks overlapping units."""


def _image_masks(recorded: RecordedMaps, args: MonkeyArgs, image_offset: int, unit: int | None):
    """Per image: min-max normalise each step's map, pick the token (``auto``), threshold each
    step (the image's and unit's threshold, or Otsu), and take the union over steps."""
    maps = recorded.maps.float()
    n_images, n_steps = maps.shape[:2]
    all_tokens = recorded.token is None
    flat = maps.reshape(n_images, n_steps, *(maps.shape[2:3] if all_tokens else ()), -1)
    out = []
    for image in range(n_images):
        norm, valid = M.minmax_normalize(flat[image])
        token = recorded.token
        if all_tokens:
            token = M.best_token(norm, valid)
            norm, valid = norm[:, token], valid[:, token]
        threshold = args.threshold_for(image_offset + image, unit)
        mask, status, used = M.image_mask(norm, valid, threshold)
        chosen = int(token) if status is not M.MaskStatus.NO_SIGNAL else None
        out.append(_ImageMask(mask, status, used, chosen, norm.amax(dim=0)))
    return out


def _mask_set(rows: list[_ImageMask], hw, args: MonkeyArgs, latent_hw) -> MaskSet:
    return MaskSet(
        binary=torch.stack([row.mask.reshape(hw) for row in rows]),
        statuses=[row.status for row in rows],
        thresholds=[row.threshold for row in rows],
        tokens=[row.token for row in rows],
        dilate_px=args.dilate,
        feather_px=args.feather,
        outside_weight=args.outside_weight,
        latent_hw=latent_hw,
    )


def build(
    recorded: RecordedMaps, args: MonkeyArgs, image_offset: int = 0, unit: int | None = None
) -> MaskSet:
    """One shared mask per image from the maps of the recording unit ``unit``."""
    rows = _image_masks(recorded, args, image_offset, unit)
    return _mask_set(rows, recorded.maps.shape[-2:], args, recorded.latent_hw)


@dataclass
class UnitMasks:
    """Mask mode ``per_unit``: each IP-Adapter unit's own masks, one ``MaskSet`` per unit."""

    units: list[MaskSet]
    token_counts: list[int | None]
    """Each unit's adapter's image-token count (None where the unit recorded nothing)."""
    _full: dict[int, MaskSet] = field(default_factory=dict, repr=False)

    @property
    def n_images(self) -> int:
        return self.units[0].n_images

    def for_unit(self, unit: int | None) -> MaskSet:
        if unit is None:
            raise ValueError(
                "mask mode 'per_unit' needs the IP-Adapter unit of every masked call; this host "
                "passed none"
            )
        if 0 <= unit < len(self.units):
            return self.units[unit]
        # a unit pass 1 never saw: plain IP-Adapter, as for a unit without attention signal
        if self.n_images not in self._full:
            self._full[self.n_images] = MaskSet.full(self.n_images)
        return self._full[self.n_images]


_FALLBACKS = (M.MaskStatus.NO_SIGNAL, M.MaskStatus.EMPTY)


def _resolve_overlaps(
    image_rows: dict[int, _ImageMask], found: dict[int, list[_ImageMask]], image: int
) -> None:
    """Give each pixel of one image to one unit (see ``build_units``); rewrites ``found``."""
    units = sorted(u for u, row in image_rows.items() if row.status not in _FALLBACKS)
    if len(units) < 2:
        return
    masks = torch.stack([image_rows[u].mask for u in units])
    scores = torch.stack([image_rows[u].score for u in units])
    ranked = torch.where(masks, scores, torch.full_like(scores, float("-inf")))
    winner = ranked.argmax(dim=0)  # the first of equal maxima: ties go to the lower unit index
    for index, unit in enumerate(units):
        row = image_rows[unit]
        won = row.mask & (winner == index)
        if not bool(won.any()):
            found[unit][image] = row._replace(status=M.MaskStatus.OVERLAP)
            continue
        status = M.MaskStatus.FULL if bool(won.all()) else M.MaskStatus.OK
        found[unit][image] = row._replace(mask=won, status=status)


def build_units(
    recorded: Mapping[int, RecordedMaps],
    n_units: int,
    n_images: int,
    args: MonkeyArgs,
    image_offset: int = 0,
) -> UnitMasks:
    """Mask mode ``per_unit``: each unit's masks from its own maps, exactly as one unit's
    (``build``), then overlaps resolved per image: a pixel in several units' masks goes to the
    unit whose normalised attention there (its maximum over the recorded steps) is highest,
    ties to the lower unit index. A unit that falls back to plain IP-Adapter (no signal, empty
    mask, or nothing recorded) keeps its full mask and takes no part; a unit that would lose
    every pixel keeps its own mask instead (``OVERLAP``): a subject is never dropped."""
    n_units = max([n_units, *(unit + 1 for unit in recorded)])
    found = {unit: _image_masks(maps, args, image_offset, unit) for unit, maps in recorded.items()}
    sizes = {unit: tuple(maps.maps.shape[-2:]) for unit, maps in recorded.items()}
    hw = max(sizes.values(), key=lambda size: size[0] * size[1]) if sizes else (1, 1)
    latent_hw = next((maps.latent_hw for maps in recorded.values()), None)
    for unit, rows in found.items():  # units recorded at other layers meet on the finest grid
        if sizes[unit] != hw:
            rows[:] = [
                row._replace(
                    mask=M.regrid(row.mask.reshape(sizes[unit]), hw).reshape(-1),
                    score=M.regrid(row.score.reshape(sizes[unit]), hw).reshape(-1),
                )
                for row in rows
            ]
    for image in range(n_images):
        _resolve_overlaps({unit: rows[image] for unit, rows in found.items()}, found, image)
    units = [
        _mask_set(found[unit], hw, args, latent_hw)
        if unit in found
        else MaskSet.full(n_images, status=M.MaskStatus.NO_SIGNAL)
        for unit in range(n_units)
    ]
    counts = [recorded[unit].tokens if unit in recorded else None for unit in range(n_units)]
    return UnitMasks(units, counts)
