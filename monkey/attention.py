"""IP-Adapter image-token attention, computed explicitly.

The reference code recorded ``softmax(q·kᵀ)`` without SDPA's ``1/√d`` and tencent's helper
applied ``.softmax`` before ``@``; both give a different map from the attention the model uses.
These functions compute exactly ``softmax(q·kᵀ/√d)`` over the image tokens, in float32.
"""

from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, heads*d]`` -> ``[B, heads, L, d]``."""
    if x.ndim != 3 or x.shape[-1] % heads:
        raise ValueError(f"expected [B, L, heads*d] with heads={heads}, got {tuple(x.shape)}")
    b, length, channels = x.shape
    return x.view(b, length, heads, channels // heads).transpose(1, 2)


def ip_attention_probs(query: torch.Tensor, ip_key: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the queries over the IP image tokens.

    query: ``[B, heads, N, d]``; ip_key: ``[B, heads, T, d]`` (any float dtype).
    Returns ``[B, heads, N, T]`` float32, ``softmax(q·kᵀ/√d)`` over T, as
    ``F.scaled_dot_product_attention`` uses them.
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
    scale = query.shape[-1] ** -0.5
    logits = torch.matmul(query.float(), ip_key.float().transpose(-1, -2)) * scale
    return logits.softmax(dim=-1)


def token_maps(query: torch.Tensor, ip_key: torch.Tensor, token: int | None) -> torch.Tensor:
    """Head-averaged attention of every query position on one IP token (or on all of them).

    query ``[B, heads, N, d]``, ip_key ``[B, heads, T, d]``. Returns ``[B, N]`` float32 for a
    token index, ``[B, T, N]`` for ``token=None``. Only this reduced map outlives the call.
    """
    probs = ip_attention_probs(query, ip_key)
    tokens = probs.shape[-1]
    if token is None:
        return probs.mean(dim=1).transpose(1, 2).contiguous()
    if not 0 <= token < tokens:
        raise ValueError(
            f"IP token {token} does not exist; this IP-Adapter has tokens 0..{tokens - 1}"
        )
    return probs[..., token].mean(dim=1)
