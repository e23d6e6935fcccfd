"""IP-Adapter image-token attention, computed explicitly.

The reference code recorded ``softmax(q·kᵀ)`` without SDPA's ``1/√d`` (a √d times sharper map,
on which the paper's threshold was tuned); SDPA uses ``softmax(q·kᵀ/√d)``. Both are computed
here with the scale an explicit argument, always in float32: hosts run the UNet under autocast,
which would otherwise run this matmul in half precision.
"""

from __future__ import annotations

import torch

from .args import ATTENTION_SCALES


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, heads*d]`` -> ``[B, heads, L, d]``."""
    if x.ndim != 3 or x.shape[-1] % heads:
        raise ValueError(f"expected [B, L, heads*d] with heads={heads}, got {tuple(x.shape)}")
    b, length, channels = x.shape
    return x.view(b, length, heads, channels // heads).transpose(1, 2)


SCALES = ATTENTION_SCALES


def logit_scale(name: str, head_dim: int) -> float:
    """The factor on ``q·kᵀ``: 1 for ``"reference"`` (the paper's code), ``1/√d`` for ``"sdpa"``."""
    if name == "reference":
        return 1.0
    if name == "sdpa":
        return head_dim**-0.5
    raise ValueError(f"attention scale must be one of {SCALES}, got {name!r}")


def ip_attention_probs(
    query: torch.Tensor, ip_key: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention probabilities of the queries over the IP image tokens.

    query: ``[B, heads, N, d]``; ip_key: ``[B, heads, T, d]`` (any float dtype).
    Returns ``[B, heads, N, T]`` float32, ``softmax(scale·q·kᵀ)`` over T; ``scale`` defaults to
    SDPA's ``1/√d``. Autocast is off inside, so the result is float32 arithmetic throughout.
    """
    if query.ndim != 4 or ip_key.ndim != 4:
        raise ValueError(
            f"expected query [B, heads, N, d] and key [B, heads, T, d], got "
            f"{tuple(query.shape)} and {tuple(ip_key.shape)}"
        )
    if query.shape[:2] != ip_key.shape[:2] or query.shape[-1] != ip_key.shape[-1]:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(ip_key.shape)} disagree on batch, heads or d"
        )
    if scale is None:
        scale = query.shape[-1] ** -0.5
    with torch.autocast(query.device.type, enabled=False):
        logits = torch.matmul(query.float(), ip_key.float().transpose(-1, -2)) * scale
        return logits.softmax(dim=-1)


def token_maps(
    query: torch.Tensor, ip_key: torch.Tensor, token: int | None, scale: float | None = None
) -> torch.Tensor:
    """Head-averaged attention of every query position on one IP token (or on all of them).

    query ``[B, heads, N, d]``, ip_key ``[B, heads, T, d]``. Returns ``[B, N]`` float32 for a
    token index, ``[B, T, N]`` for ``token=None``. Only this reduced map outlives the call.
    """
    probs = ip_attention_probs(query, ip_key, scale)
    tokens = probs.shape[-1]
    if token is None:
        return probs.mean(dim=1).transpose(1, 2).contiguous()
    if not 0 <= token < tokens:
        raise ValueError(
            f"IP token {token} does not exist; this IP-Adapter has tokens 0..{tokens - 1}"
        )
    return probs[..., token].mean(dim=1)
