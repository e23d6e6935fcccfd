"""Explicit IP attention equals the attention the model runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from monkey.attention import ip_attention_probs, logit_scale, split_heads, token_maps


def sdpa_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """SDPA's own probabilities: attend to one-hot values."""
    eye = torch.eye(k.shape[2], dtype=q.dtype).expand(*k.shape[:2], -1, -1)
    return F.scaled_dot_product_attention(q, k, eye)


@given(
    st.integers(1, 3),
    st.integers(1, 8),
    st.integers(1, 40),
    st.integers(1, 16),
    st.sampled_from([8, 40, 64]),
    st.integers(0, 2**16),
)
def test_probs_equal_sdpa_weights(batch, heads, n, tokens, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=gen) * 3
    k = torch.randn(batch, heads, tokens, d, generator=gen) * 3
    probs = ip_attention_probs(q, k)
    assert probs.shape == (batch, heads, n, tokens) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, sdpa_weights(q, k), rtol=0, atol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(batch, heads, n))


def test_scale_is_applied_unlike_the_reference_recording():
    q = torch.randn(1, 2, 5, 40)
    k = torch.randn(1, 2, 4, 40)
    unscaled = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    assert not torch.allclose(ip_attention_probs(q, k), unscaled, atol=1e-3)


def test_half_precision_inputs_are_computed_in_float32():
    q = torch.randn(1, 2, 6, 8).half()
    k = torch.randn(1, 2, 4, 8).half()
    probs = ip_attention_probs(q, k)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, sdpa_weights(q.float(), k.float()), rtol=0, atol=2e-6)


def test_token_maps_average_heads_and_select_the_token():
    q = torch.randn(2, 4, 9, 8)
    k = torch.randn(2, 4, 4, 8)
    probs = sdpa_weights(q, k)
    torch.testing.assert_close(token_maps(q, k, 1), probs[..., 1].mean(1), rtol=0, atol=2e-6)
    every = token_maps(q, k, None)
    assert every.shape == (2, 4, 9)
    torch.testing.assert_close(every[:, 3], probs[..., 3].mean(1), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match=r"tokens 0\.\.3"):
        token_maps(q, k, 4)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        ip_attention_probs(torch.randn(2, 3), torch.randn(1, 1, 1, 1))
    with pytest.raises(ValueError, match="disagree"):
        ip_attention_probs(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 16))
    with pytest.raises(ValueError, match="heads=3"):
        split_heads(torch.randn(1, 4, 8), 3)
    assert split_heads(torch.randn(2, 5, 12), 3).shape == (2, 3, 5, 4)


def test_maps_are_float32_arithmetic_under_autocast():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 8, 64, 40, generator=gen), torch.randn(2, 8, 4, 40, generator=gen)
    plain = token_maps(q, k, 1, scale=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = token_maps(q, k, 1, scale=1.0)
        assert torch.matmul(q, k.transpose(-1, -2)).dtype == torch.bfloat16  # autocast is on
    assert under.dtype == torch.float32 and torch.equal(under, plain)


def test_reference_scale_is_the_unscaled_softmax_and_sdpa_the_scaled_one():
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, 16, 64, generator=gen), torch.randn(1, 2, 4, 64, generator=gen)
    logits = q @ k.transpose(-1, -2)
    reference = torch.softmax(logits, -1)[..., 1].mean(1)
    sdpa = torch.softmax(logits / 8.0, -1)[..., 1].mean(1)
    torch.testing.assert_close(token_maps(q, k, 1, logit_scale("reference", 64)), reference)
    torch.testing.assert_close(token_maps(q, k, 1, logit_scale("sdpa", 64)), sdpa)
    with pytest.raises(ValueError, match="attention scale"):
        logit_scale("exact", 64)
