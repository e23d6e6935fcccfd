"""IP-Adapter attention with MONKEY's mask, in the arithmetic of diffusers' ``IPAdapterAttnProcessor2_0``.

diffusers' own mask path resamples every mask on every call of every layer (bicubic, then a
repeat over the channels) and attends each reference image of an adapter on its own. MONKEY's
weights are already on the layer's grid, so this path multiplies ``Attn(Q, K_ip, V_ip)`` — over
all of an adapter's image tokens at once, as the unmasked processor attends them — by the
``[R, N, 1]`` weights. Every other operation is the processor's, in its order, so an all-ones
mask gives the plain IP-Adapter output bit for bit, for any number of images per adapter.
"""

from __future__ import annotations

from numbers import Real

import torch
import torch.nn.functional as F


def supports(processor, exact_type: type | None, encoder_hidden_states) -> bool:
    """This path reproduces ``processor``'s unmasked arithmetic for this call: the processor is
    exactly ``IPAdapterAttnProcessor2_0`` (a subclass may compute otherwise), the image states
    come as diffusers passes them, and every adapter has one scale (per-image scales exist
    only on diffusers' own mask path)."""
    return (
        exact_type is not None
        and type(processor) is exact_type
        and isinstance(encoder_hidden_states, tuple)
        and all(isinstance(scale, Real) for scale in processor.scale)
    )


def _heads(x: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    return x.view(batch, -1, heads, head_dim).transpose(1, 2)


def _merge(x: torch.Tensor, batch: int, heads: int, head_dim: int, dtype) -> torch.Tensor:
    return x.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(dtype)


def masked_ip_attention(
    processor,
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states: tuple[torch.Tensor, list[torch.Tensor]],
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
    weights: torch.Tensor | list[torch.Tensor],
) -> torch.Tensor:
    """The processor's output with each adapter's image attention times ``weights`` ``[R, N, 1]``
    (one tensor for every adapter, or a list with one per adapter)."""
    if isinstance(weights, torch.Tensor):
        weights = [weights] * len(encoder_hidden_states[1])
    residual = hidden_states
    text_states, ip_states = encoder_hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch, sequence_length, _ = text_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if attn.norm_cross:
        text_states = attn.norm_encoder_hidden_states(text_states)
    key = attn.to_k(text_states)
    value = attn.to_v(text_states)
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    query = _heads(query, batch, heads, head_dim)
    out = F.scaled_dot_product_attention(
        query,
        _heads(key, batch, heads, head_dim),
        _heads(value, batch, heads, head_dim),
        attn_mask=attention_mask,
        dropout_p=0.0,
        is_causal=False,
    )
    out = _merge(out, batch, heads, head_dim, query.dtype)

    for state, scale, to_k_ip, to_v_ip, adapter_weights in zip(
        ip_states, processor.scale, processor.to_k_ip, processor.to_v_ip, weights
    ):
        if scale == 0:  # as the processor: a zero scale skips the adapter
            continue
        ip = F.scaled_dot_product_attention(
            query,
            _heads(to_k_ip(state), batch, heads, head_dim),
            _heads(to_v_ip(state), batch, heads, head_dim),
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
        )
        out = out + scale * (_merge(ip, batch, heads, head_dim, query.dtype) * adapter_weights)

    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor
