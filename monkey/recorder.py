"""Records only what the mask needs: one head-averaged IP-token map per image, layer and step.

Memory is O(H·W) per recorded layer-step and image (O(T·H·W) for ``token=auto``); the
``[B, heads, N, T]`` probabilities live only inside one ``observe`` call, for cond rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .args import AUTO, DEFAULT, PAPER_TOKEN, PAPER_TOKENS, MonkeyArgsError, Token
from .attention import logit_scale, token_maps
from .masks import layer_size, regrid
from .rows import Rows


@dataclass(frozen=True)
class RecordedMaps:
    maps: torch.Tensor
    """``[B_img, S, h, w]`` (or ``[B_img, S, T, h, w]`` for all tokens) float32; NaN where an
    image had no cond row at a step."""
    steps: tuple[int, ...]
    latent_hw: tuple[int, int]
    token: int | None
    """The token recorded, or None when every token was (``auto``: chosen per image later)."""
    tokens: int
    """The adapter's image-token count."""


def resolve_token(token: Token, tokens: int) -> int | None:
    """The token to record for an adapter with ``tokens`` image tokens; None records them all.

    ``default`` is the paper's token 1 on 4-token adapters (ip-adapter_sd15, SDXL base) and
    ``auto`` on any other (Plus 16, full-face 257, FaceID ...), whose token 1 means nothing
    in particular.
    """
    if token == AUTO:
        return None
    if token == DEFAULT:
        return PAPER_TOKEN if tokens == PAPER_TOKENS else None
    if not 0 <= int(token) < tokens:
        raise MonkeyArgsError(
            "token",
            token,
            f"'default', 'auto' or an integer from 0 to {tokens - 1}: this IP-Adapter has "
            f"{tokens} image tokens",
        )
    return int(token)


class MapRecorder:
    """``token`` and ``attention_scale`` are the settings' (``MonkeyArgs``) values, required: a
    component keeps no default of its own that could drift from the settings model's."""

    def __init__(
        self,
        layers: tuple[str, ...],
        token: Token,
        n_images: int,
        attention_scale: str,
    ):
        if not layers:
            raise ValueError("the recorder needs at least one source layer")
        self.layers = frozenset(layers)
        self.token = token
        self.attention_scale = attention_scale
        self.n_images = n_images
        self._resolved: tuple[int, int | None] | None = None
        """(token count, token recorded), fixed by the first observed call."""
        self._sums: dict[tuple[int, str], torch.Tensor] = {}
        self._counts: dict[tuple[int, str], torch.Tensor] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        self._latent_hw: tuple[int, int] | None = None

    @property
    def token_count(self) -> int | None:
        """The source adapter's image-token count, once a call was observed."""
        return self._resolved[0] if self._resolved else None

    @property
    def has_data(self) -> bool:
        return bool(self._sums)

    def steps(self) -> tuple[int, ...]:
        return tuple(sorted({step for step, _ in self._sums}))

    def observe(
        self, step: int, layer: str, query: torch.Tensor, ip_key: torch.Tensor, rows: Rows
    ) -> None:
        """query ``[R, heads, N, d]``, ip_key ``[R, heads, T, d]`` of one UNet call's rows."""
        if layer not in self.layers:
            return
        if query.shape[0] != rows.images.numel():
            raise ValueError(f"query has {query.shape[0]} rows, the row map {rows.images.numel()}")
        if not bool(rows.cond.any()):  # rows live on the CPU: no device sync
            return
        device = query.device
        _, cond_dev, images = rows.on(device)
        tokens = ip_key.shape[2]
        if self._resolved is None:
            self._resolved = (tokens, resolve_token(self.token, tokens))
        elif self._resolved[0] != tokens:
            raise ValueError(
                f"the source unit's IP keys changed from {self._resolved[0]} to {tokens} tokens"
            )
        with torch.no_grad():
            maps = token_maps(
                query.index_select(0, cond_dev),
                ip_key.index_select(0, cond_dev),
                self._resolved[1],
                logit_scale(self.attention_scale, query.shape[-1]),
            )
        self._sizes[layer] = layer_size(query.shape[2], rows.latent_hw)
        self._latent_hw = rows.latent_hw
        key = (step, layer)
        if key not in self._sums:
            self._sums[key] = torch.zeros(
                (self.n_images, *maps.shape[1:]), dtype=torch.float32, device=device
            )
            self._counts[key] = torch.zeros(self.n_images, dtype=torch.float32, device=device)
        self._sums[key].index_add_(0, images, maps)
        self._counts[key].index_add_(0, images, torch.ones_like(images, dtype=torch.float32))

    def result(self) -> RecordedMaps:
        """Maps per image and step, layers averaged on the finest recorded layer grid."""
        if not self.has_data:
            raise RuntimeError("nothing was recorded")
        size = max(self._sizes.values(), key=lambda hw: hw[0] * hw[1])
        per_step = []
        for step in self.steps():
            grids, seen = [], []
            for layer in sorted(self.layers):
                if (step, layer) not in self._sums:
                    continue
                sums, counts = self._sums[(step, layer)].cpu(), self._counts[(step, layer)].cpu()
                per_image = (-1,) + (1,) * (sums.ndim - 1)
                flat = sums / counts.clamp_min(1.0).view(per_image)
                grids.append(regrid(flat.reshape(*flat.shape[:-1], *self._sizes[layer]), size))
                seen.append(
                    (counts > 0)
                    .float()
                    .view((-1,) + (1,) * (grids[-1].ndim - 1))
                    .expand_as(grids[-1])
                )
            weight = torch.stack(seen).sum(dim=0)
            total = (torch.stack(grids) * torch.stack(seen)).sum(dim=0)
            nan = torch.full_like(total, float("nan"))  # an image with no cond row at this step
            per_step.append(torch.where(weight > 0, total / weight.clamp_min(1.0), nan))
        tokens, token = self._resolved
        return RecordedMaps(
            torch.stack(per_step, dim=1), self.steps(), self._latent_hw, token, tokens
        )
