"""Attention maps to subject masks, and masks to every layer's resolution. Pure tensor math.

Maps are flattened over a layer's (h, w) grid in row-major order, as attention sequences are.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F

FLAT_EPS = 1e-12
"""A map whose max - min is below this carries no spatial information."""

OTSU_BINS = 256


class MaskStatus(str, Enum):
    OK = "ok"
    FULL = "full"
    """Every pixel passed the threshold: pass 2 is plain IP-Adapter for this image."""
    EMPTY = "empty"
    """No pixel passed the threshold; fallback: a full mask (plain IP-Adapter), never a lost subject."""
    NO_SIGNAL = "no-signal"
    """No recorded step had a finite, non-flat map; fallback: a full mask (plain IP-Adapter)."""
    OVERLAP = "overlap"
    """Mask mode ``per_unit``: every pixel of this unit's mask went to other units attending to
    it more; the unit keeps its own mask, overlapping theirs, rather than lose its subject."""


def layer_size(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a UNet layer with ``n_tokens`` query positions for a latent of ``latent_hw``.

    UNet layers work at the latent size halved k times, rounding up (stride-2 convs with padding
    1); this finds k from the sequence length exactly, also for odd and non-square latents, where
    ``sqrt(n / (h*w))`` scaling misses by one.
    """
    h, w = latent_hw
    if h < 1 or w < 1:
        raise ValueError(f"latent size must be positive, got {latent_hw}")
    while True:
        if h * w == n_tokens:
            return h, w
        if h * w < n_tokens or (h == 1 and w == 1):
            raise ValueError(
                f"{n_tokens} query positions fit no UNet level of a {latent_hw} latent"
            )
        h, w = (h + 1) // 2, (w + 1) // 2


def level_size(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """The (h, w) of UNet level ``level`` of a latent: ``ceil(H / 2**level) × ceil(W / 2**level)``."""
    h, w = latent_hw
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def level_of(hw: tuple[int, int], latent_hw: tuple[int, int]) -> int:
    """The UNet level whose grid is ``hw`` for a latent (or any finer grid) of ``latent_hw``.

    The fewest round-up halvings of ``latent_hw`` that give ``hw`` on both axes (a 1×1 grid is
    every level past the last halving; the fewest is taken). Raises ValueError, naming the levels
    there are, when no level has that grid.
    """
    hw, latent_hw = (int(hw[0]), int(hw[1])), (int(latent_hw[0]), int(latent_hw[1]))
    if min(hw) < 1 or min(latent_hw) < 1:
        raise ValueError(f"grid sizes must be positive, got {hw} and {latent_hw}")
    levels = [latent_hw]
    while levels[-1] != hw and levels[-1] != (1, 1):
        levels.append(level_size(levels[-1], 1))
    if levels[-1] != hw:
        named = ", ".join(f"{h}×{w}" for h, w in levels)
        raise ValueError(
            f"a {hw[0]}×{hw[1]} grid is no UNet level of a {latent_hw[0]}×{latent_hw[1]} grid "
            f"(its levels, halving with round-up: {named})"
        )
    return len(levels) - 1


REDUCTIONS = ("max", "mean")


def regrid(maps: torch.Tensor, size: tuple[int, int], reduce: str = "mean") -> torch.Tensor:
    """Move ``[..., h, w]`` maps to the ``size`` grid by the UNet's own index arithmetic.

    Both grids must be levels of one latent: the coarser is the finer halved ``d`` times with
    round-up, so coarse cell ``(y, x)`` is fine cells ``[y·2^d, (y+1)·2^d) × [x·2^d, (x+1)·2^d)``
    clipped to the fine grid (a stride-2 conv's output ``y`` is centred on input ``2y``; nearest
    ×2 upsampling maps fine ``i`` to coarse ``i // 2``). Returns ``[..., *size]``.

    To a finer grid every fine cell takes its coarse cell's value (a gather, ``i >> d`` on each
    axis; dtype kept). To a coarser grid every coarse cell reduces its block: ``"max"`` (a binary
    mask stays binary: a cell is subject if any of its cells is) or ``"mean"`` over the block's
    cells inside the fine grid (soft maps; float). Gathering up then reducing gives the map back
    unchanged with either reduction. Raises ValueError when the sizes are not so related.
    """
    if maps.ndim < 2:
        raise ValueError(f"expected maps [..., h, w], got {tuple(maps.shape)}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    h, w = maps.shape[-2:]
    size = (int(size[0]), int(size[1]))
    if size == (h, w):
        return maps
    if size[0] >= h and size[1] >= w:
        d = level_of((h, w), size)
        rows = torch.arange(size[0], device=maps.device) >> d
        cols = torch.arange(size[1], device=maps.device) >> d
        return maps.index_select(-2, rows).index_select(-1, cols)
    d = level_of(size, (h, w))
    s = 1 << d
    out_h, out_w = size
    pad = (0, out_w * s - w, 0, out_h * s - h)
    lead = maps.shape[:-2]
    x = maps if maps.is_floating_point() else maps.float()
    if reduce == "max":
        x = F.pad(x, pad, value=float("-inf"))
        return x.reshape(*lead, out_h, s, out_w, s).amax(dim=(-3, -1)).to(maps.dtype)
    sums = F.pad(x, pad).reshape(*lead, out_h, s, out_w, s).sum(dim=(-3, -1))
    # edge blocks of an odd grid hold fewer cells; dividing by s*s would shrink them
    rows = (h - s * torch.arange(out_h, device=maps.device)).clamp(max=s)
    cols = (w - s * torch.arange(out_w, device=maps.device)).clamp(max=s)
    return sums / (rows[:, None] * cols[None, :]).to(sums.dtype)


def minmax_normalize(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-map min-max normalisation over the last dimension.

    maps ``[..., N]`` -> (normalised ``[..., N]`` float32 in [0, 1], valid ``[...]`` bool).
    A map with a NaN/inf or with max - min below ``FLAT_EPS`` is invalid and comes back as zeros.
    """
    maps = maps.float()
    finite = torch.isfinite(maps).all(dim=-1)
    safe = torch.where(torch.isfinite(maps), maps, torch.zeros_like(maps))
    lo = safe.amin(dim=-1, keepdim=True)
    hi = safe.amax(dim=-1, keepdim=True)
    span = hi - lo
    valid = finite & (span.squeeze(-1) > FLAT_EPS)
    norm = (safe - lo) / span.clamp_min(FLAT_EPS)
    norm = torch.where(valid.unsqueeze(-1), norm.clamp(0.0, 1.0), torch.zeros_like(norm))
    return norm, valid


def otsu(values: torch.Tensor, bins: int = OTSU_BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """Otsu's threshold of maps in [0, 1].

    values ``[..., N]`` -> (threshold ``[...]``, between-class variance ``[...]``). The threshold
    is the lower edge of the first foreground bin, so ``values >= threshold`` is Otsu's split.
    """
    flat = values.float().reshape(-1, values.shape[-1])
    index = (flat.clamp(0.0, 1.0) * bins).long().clamp_max(bins - 1)
    hist = torch.zeros(flat.shape[0], bins, dtype=torch.float64, device=flat.device)
    hist.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))
    prob = hist / flat.shape[-1]
    centres = (torch.arange(bins, dtype=torch.float64, device=flat.device) + 0.5) / bins
    w0 = prob.cumsum(dim=1)[:, :-1]  # background = bins [0, k]
    mu0_sum = (prob * centres).cumsum(dim=1)[:, :-1]
    mu_total = (prob * centres).sum(dim=1, keepdim=True)
    w1 = 1.0 - w0
    between = (mu_total * w0 - mu0_sum) ** 2 / (w0 * w1).clamp_min(1e-18)
    between = torch.where((w0 > 0) & (w1 > 0), between, torch.zeros_like(between))
    best = between.argmax(dim=1)
    threshold = (best + 1).double() / bins
    shape = values.shape[:-1]
    return threshold.float().reshape(shape), between.gather(1, best[:, None]).float().reshape(shape)


def union_of_steps(
    norm: torch.Tensor, valid: torch.Tensor, threshold: float | torch.Tensor
) -> torch.Tensor:
    """The paper's mask: pixels at or above the threshold in any valid recorded step.

    norm ``[S, N]`` normalised maps, valid ``[S]``, threshold a float or ``[S]``. Returns ``[N]``
    bool. A higher threshold never adds pixels.
    """
    if norm.ndim != 2 or valid.shape != norm.shape[:1]:
        raise ValueError(
            f"expected norm [S, N] and valid [S], got {tuple(norm.shape)}, {tuple(valid.shape)}"
        )
    tau = torch.as_tensor(threshold, dtype=norm.dtype, device=norm.device).reshape(-1, 1)
    passed = (norm >= tau) & valid[:, None]
    return passed.any(dim=0)


def best_token(norm: torch.Tensor, valid: torch.Tensor) -> int:
    """For ``token=auto``: the token whose step-averaged map splits best (largest Otsu variance).

    norm ``[S, T, N]``, valid ``[S, T]``.
    """
    weight = valid.float().unsqueeze(-1)
    mean = (norm * weight).sum(dim=0) / weight.sum(dim=0).clamp_min(1.0)  # [T, N]
    _, separation = otsu(minmax_normalize(mean)[0])
    return int(separation.argmax())


def image_mask(
    norm: torch.Tensor, valid: torch.Tensor, threshold: float | str
) -> tuple[torch.Tensor, MaskStatus, float | None]:
    """One image's binary mask from its normalised step maps ``[S, N]``.

    ``threshold`` is a float or ``"auto"`` (Otsu per step). Returns (mask ``[N]`` bool, status,
    the mean threshold used or None). Never empty: without a usable step or pixel it is full.
    """
    if not bool(valid.any()):
        return (
            torch.ones(norm.shape[-1], dtype=torch.bool, device=norm.device),
            MaskStatus.NO_SIGNAL,
            None,
        )
    if threshold == "auto":
        tau = otsu(norm)[0]
        used = float(tau[valid].mean())
    else:
        tau = float(threshold)
        used = tau
    mask = union_of_steps(norm, valid, tau)
    if not bool(mask.any()):  # a threshold above 1: nothing to keep, so keep everything
        return torch.ones_like(mask), MaskStatus.EMPTY, used
    status = MaskStatus.FULL if bool(mask.all()) else MaskStatus.OK
    return mask, status, used


def resize(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``[B, h, w]`` masks to ``size``: nearest-exact where a side grows, area where it
    shrinks, so a binary mask stays binary when enlarged and zero stays exactly zero.

    For grids that are no UNet levels of one another (image pixels, a hires-fix latent); between
    levels ``regrid`` is exact. Growing by an integer factor ``f`` is the gather ``i // f``.
    """
    if masks.ndim != 3:
        raise ValueError(f"expected masks [B, h, w], got {tuple(masks.shape)}")
    h, w = masks.shape[-2:]
    out = masks.float().unsqueeze(1)
    grown = (max(h, size[0]), max(w, size[1]))
    if grown != (h, w):
        out = F.interpolate(out, size=grown, mode="nearest-exact")
    if grown != tuple(size):
        out = F.adaptive_avg_pool2d(out, size)
    return out.squeeze(1)


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow ``[B, H, W]`` masks by a disk of ``radius`` cells."""
    if radius <= 0:
        return masks
    yy, xx = torch.meshgrid(
        torch.arange(-radius, radius + 1), torch.arange(-radius, radius + 1), indexing="ij"
    )
    disk = ((yy**2 + xx**2) <= radius**2).float().to(masks.device)
    hits = F.conv2d(masks.float().unsqueeze(1), disk[None, None], padding=radius)
    return (hits.squeeze(1) > 0.5).to(masks.dtype)


def feather(masks: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian-soften ``[B, H, W]`` masks (sigma in cells); values stay in [0, 1]."""
    if sigma <= 0:
        return masks.float()
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=masks.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = masks.float().unsqueeze(1)
    out = F.pad(out, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out.squeeze(1).clamp(0.0, 1.0)


def ip_weights(masks: torch.Tensor, outside_weight: float) -> torch.Tensor:
    """Per-position IP weight ``M + w_out·(1 − M)`` for masks in [0, 1]; same shape."""
    masks = masks.float()
    if outside_weight == 0.0:
        return masks
    return masks + outside_weight * (1.0 - masks)


def row_weights(weights: torch.Tensor, row_images: torch.Tensor) -> torch.Tensor:
    """Gather per-image weights ``[B_img, N]`` for the rows of one UNet call -> ``[R, N, 1]``."""
    if weights.ndim != 2:
        raise ValueError(f"expected weights [B_img, N], got {tuple(weights.shape)}")
    if row_images.numel() and int(row_images.max()) >= weights.shape[0]:
        raise IndexError(
            f"row image index {int(row_images.max())} but only {weights.shape[0]} masks"
        )
    return weights.index_select(0, row_images.to(weights.device)).unsqueeze(-1)


def apply(out_ip: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out_ip ← out_ip · W`` with ``out_ip [R, N, C]`` and ``W [R, N, 1]``."""
    if out_ip.ndim != 3 or weights.shape != (*out_ip.shape[:2], 1):
        raise ValueError(
            f"IP output {tuple(out_ip.shape)} and weights {tuple(weights.shape)} do not match"
        )
    return out_ip * weights.to(device=out_ip.device, dtype=out_ip.dtype)
