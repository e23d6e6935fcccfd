"""The recorder keeps O(H·W) per image, layer and step, and combines layers on one grid."""

from __future__ import annotations

import pytest
import torch

from monkey.args import MonkeyArgsError
from monkey.attention import token_maps
from monkey.recorder import MapRecorder
from monkey.rows import RowLayout, RowTracker


def rows_for(layout: RowLayout, n_rows: int, latent_hw=(16, 16)):
    tracker = RowTracker(layout)
    return tracker.unet_call(n_rows, latent_hw)


def qk(rows: int, n: int, heads: int = 8, tokens: int = 4, d: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, heads, n, d, generator=gen), torch.randn(
        rows, heads, tokens, d, generator=gen
    )


def test_only_cond_rows_head_mean_maps_are_kept():
    recorder = MapRecorder(("a",), token=1, n_images=2, attention_scale="sdpa")
    rows = rows_for(RowLayout.webui([1, 1]), 4)
    q, k = qk(4, 64)
    for step in range(5):
        recorder.observe(step, "a", q, k, rows)
    retained = sum(t.numel() for t in recorder._sums.values())
    assert retained == 5 * 2 * 64  # steps × images × N: no [B, heads, N, T] survives
    result = recorder.result()
    assert result.maps.shape == (2, 5, 8, 8)
    torch.testing.assert_close(result.maps[:, 0].reshape(2, -1), token_maps(q[:2], k[:2], 1))


def test_and_prompt_rows_of_one_image_are_averaged():
    recorder = MapRecorder(("a",), token=0, n_images=1, attention_scale="sdpa")
    rows = rows_for(RowLayout.webui([2]), 3)  # two cond rows of image 0, one uncond row
    q, k = qk(3, 16)
    recorder.observe(0, "a", q, k, rows)
    expected = token_maps(q[:2], k[:2], 0).mean(0)
    torch.testing.assert_close(recorder.result().maps[0, 0].reshape(-1), expected)


def test_layers_of_different_resolutions_average_on_the_finest_grid():
    recorder = MapRecorder(("fine", "coarse"), token=2, n_images=1, attention_scale="sdpa")
    rows = rows_for(RowLayout.webui([1]), 2)
    qf, kf = qk(2, 64, seed=1)  # 8×8 for a 16×16 latent (level 1)
    qc, kc = qk(2, 16, seed=2)  # 4×4 (level 2)
    recorder.observe(3, "fine", qf, kf, rows)
    recorder.observe(3, "coarse", qc, kc, rows)
    recorder.observe(3, "other", qc, kc, rows)  # not a source layer: ignored
    fine = token_maps(qf[:1], kf[:1], 2).reshape(1, 1, 8, 8)
    # the UNet's own correspondence: fine cell i lies in coarse cell i // 2
    coarse = token_maps(qc[:1], kc[:1], 2).reshape(1, 1, 4, 4)
    coarse = coarse.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    result = recorder.result()
    assert result.maps.shape == (1, 1, 8, 8) and result.steps == (3,)
    torch.testing.assert_close(result.maps[0, 0], ((fine + coarse) / 2)[0, 0])


def test_an_image_without_cond_rows_at_a_step_is_nan():
    recorder = MapRecorder(("a",), token="auto", n_images=2, attention_scale="sdpa")
    tracker = RowTracker(RowLayout.webui([1, 1]))
    q, k = qk(1, 16)
    recorder.observe(0, "a", q, k, tracker.unet_call(1, (8, 8)))  # split call: image 0's row only
    result = recorder.result()
    assert result.maps.shape == (2, 1, 4, 4, 4)  # all tokens kept for token=auto
    assert torch.isnan(result.maps[1]).all() and not torch.isnan(result.maps[0]).any()


def test_default_token_is_1_on_four_token_adapters_and_auto_on_others():
    rows = rows_for(RowLayout.webui([1]), 2)
    four = MapRecorder(("a",), token="default", n_images=1, attention_scale="sdpa")
    four.observe(0, "a", *qk(2, 16, tokens=4), rows)
    assert four.result().token == 1 and four.token_count == 4
    plus = MapRecorder(("a",), token="default", n_images=1, attention_scale="sdpa")
    plus.observe(0, "a", *qk(2, 16, tokens=16), rows)
    result = plus.result()
    assert result.token is None and result.maps.shape == (1, 1, 16, 4, 4)  # every token: auto


def test_an_explicit_token_past_the_adapters_count_names_the_count():
    recorder = MapRecorder(("a",), token=4, n_images=1, attention_scale="sdpa")
    with pytest.raises(MonkeyArgsError, match="this IP-Adapter has 4 image tokens") as caught:
        recorder.observe(0, "a", *qk(2, 16, tokens=4), rows_for(RowLayout.webui([1]), 2))
    assert caught.value.field == "token"
