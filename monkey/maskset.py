"""A batch's subject masks: built once from pass 1's maps, served per layer in pass 2."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import masks as M
from .args import MonkeyArgs
from .recorder import RecordedMaps

PX_PER_LATENT = 8
"""Image pixels per latent cell for the SD VAEs; dilate/feather are given in image pixels."""


@dataclass
class MaskSet:
    binary: torch.Tensor
    """``[B_img, h, w]`` bool on the recording grid."""
    statuses: list[M.MaskStatus]
    thresholds: list[float | None]
    """Threshold used per image (Otsu's mean for ``auto``), None where there was no signal."""
    tokens: list[int | None]
    dilate_px: int = 0
    feather_px: int = 0
    outside_weight: float = 0.0
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
        """``[B_img, N]`` IP weights ``M + w_out·(1 − M)`` for a layer of ``n_tokens`` positions."""
        key = (n_tokens, latent_hw, str(device))
        if key not in self._layer:
            hw = M.layer_size(n_tokens, latent_hw)
            # max: a layer cell is subject if any of its latent cells is, so a binary mask stays
            # binary on every layer; a feathered mask is averaged over the cells instead
            reduce = "max" if self.feather_px <= 0 else "mean"
            layer = M.regrid(self.latent_masks(latent_hw), hw, reduce)
            layer = layer.reshape(self.n_images, -1)
            self._layer[key] = M.ip_weights(layer, self.outside_weight).to(device)
        return self._layer[key]

    @classmethod
    def full(cls, n_images: int, hw: tuple[int, int] = (1, 1)) -> MaskSet:
        """Masks that keep IP-Adapter everywhere (pass 2 equals plain IP-Adapter)."""
        return cls(
            binary=torch.ones(n_images, *hw, dtype=torch.bool),
            statuses=[M.MaskStatus.FULL] * n_images,
            thresholds=[None] * n_images,
            tokens=[None] * n_images,
        )


def build(recorded: RecordedMaps, args: MonkeyArgs, image_offset: int = 0) -> MaskSet:
    """Per image: min-max normalise each step's map, pick the token (``auto``), threshold each
    step (per-image threshold or Otsu), and take the union over steps."""
    maps = recorded.maps.float()
    n_images, n_steps = maps.shape[:2]
    all_tokens = recorded.token is None
    hw = maps.shape[-2:]
    flat = maps.reshape(n_images, n_steps, *(maps.shape[2:3] if all_tokens else ()), -1)
    binary, statuses, thresholds, tokens = [], [], [], []
    for image in range(n_images):
        norm, valid = M.minmax_normalize(flat[image])
        token = recorded.token
        if all_tokens:
            token = M.best_token(norm, valid)
            norm, valid = norm[:, token], valid[:, token]
        mask, status, used = M.image_mask(norm, valid, args.threshold_for(image_offset + image))
        binary.append(mask.reshape(hw))
        statuses.append(status)
        thresholds.append(used)
        tokens.append(int(token) if status is not M.MaskStatus.NO_SIGNAL else None)
    return MaskSet(
        binary=torch.stack(binary),
        statuses=statuses,
        thresholds=thresholds,
        tokens=tokens,
        dilate_px=args.dilate,
        feather_px=args.feather,
        outside_weight=args.outside_weight,
        latent_hw=recorded.latent_hw,
    )
