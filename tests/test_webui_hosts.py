"""What MONKEY guarantees on every WebUI host, checked on each: A1111 + sd-webui-controlnet and
Forge with its integrated ControlNet, both over the same fake processing and real attention."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from test_a1111 import assert_clean as assert_clean_a1111
from test_forge import assert_clean as assert_clean_forge
from webui_run import generate, latents, make_forge_p, make_p

from monkey.args import MonkeyArgs
from monkey.webui import run

ON = MonkeyArgs(enabled=True)
SIZE = {"width": 128, "height": 128}  # 16×16 latent: the paper's layer works at 4×4
# threshold 0 keeps every pixel; IP kept outside the window: pass 2 must equal plain IP-Adapter
FULL = MonkeyArgs(enabled=True, threshold=0.0, ip_off_outside=False)


@dataclass(frozen=True)
class Host:
    make_p: Callable[..., Any]
    ip_applied: Callable[[Any], int]
    """How often the host's ControlNet applied its IP-Adapter (once per ``p.sample`` pass)."""
    assert_clean: Callable[[Any, Any], None]


HOSTS = {
    "a1111": Host(make_p, lambda p: p.controlnet.process_sample_calls, assert_clean_a1111),
    "forge": Host(make_forge_p, lambda p: p.controlnet.applied, assert_clean_forge),
}


@pytest.fixture(params=list(HOSTS), ids=list(HOSTS))
def host(request) -> Host:
    return HOSTS[request.param]


def test_off_is_bit_identical_to_not_installed(webui, host):
    without = host.make_p(webui, monkey=False, **SIZE)
    processed_without = generate(webui, without)
    off = host.make_p(webui, MonkeyArgs(enabled=False), **SIZE)
    processed_off = generate(webui, off)
    assert torch.equal(latents(off), latents(without))
    assert processed_off.infotexts == processed_without.infotexts
    assert len(processed_off.images) == len(processed_without.images)
    assert host.ip_applied(off) == 1
    assert not webui.errors
    host.assert_clean(webui, off)


@pytest.mark.parametrize("batch_size", [1, 2], ids=["one-image", "batch-of-two"])
def test_all_ones_mask_is_plain_ip_adapter_exactly(webui, host, batch_size):
    plain = host.make_p(webui, monkey=False, batch_size=batch_size, **SIZE)
    generate(webui, plain)
    p = host.make_p(webui, FULL, batch_size=batch_size, **SIZE)
    processed = generate(webui, p)
    assert "(full mask)" in processed.infotexts[0]
    assert torch.equal(latents(p), latents(plain))


def test_without_rebuilding_the_rng_pass_two_would_differ(webui, host, monkeypatch):
    plain = host.make_p(webui, monkey=False, **SIZE)
    generate(webui, plain)
    monkeypatch.setattr(run, "reset_rng", lambda p: None)
    p = host.make_p(webui, FULL, **SIZE)
    generate(webui, p)
    assert not torch.allclose(latents(p), latents(plain), atol=1e-3)


def test_masked_result_differs_from_plain_and_from_no_ip(webui, host):
    plain = host.make_p(webui, monkey=False, **SIZE)
    generate(webui, plain)
    no_ip = host.make_p(webui, monkey=False, units=[], **SIZE)
    generate(webui, no_ip)
    p = host.make_p(webui, ON, **SIZE)
    generate(webui, p)
    assert not torch.allclose(latents(p), latents(plain), atol=1e-3)
    kept = host.make_p(webui, MonkeyArgs(enabled=True, ip_off_outside=False), **SIZE)
    processed = generate(webui, kept)
    assert "(full mask)" not in processed.infotexts[0]
    assert not torch.allclose(latents(kept), latents(plain), atol=1e-4)
    assert not torch.allclose(latents(kept), latents(no_ip), atol=1e-4)


@pytest.mark.parametrize("hires", [False, True], ids=["img2img", "hires"])
def test_full_mask_is_plain_exactly_in_img2img_and_hires(webui, host, hires):
    kind = {"enable_hr": True} if hires else {"img2img": True}
    plain = host.make_p(webui, monkey=False, **kind, **SIZE)
    generate(webui, plain)
    p = host.make_p(webui, FULL, **kind, **SIZE)
    generate(webui, p)
    assert torch.equal(latents(p), latents(plain))


def test_batch_count_and_size_give_every_image_its_own_mask_and_threshold(webui, host):
    settings = MonkeyArgs(enabled=True, thresholds=(0.0, 1.0, "auto"))
    p = host.make_p(webui, settings, batch_size=2, n_iter=2, **SIZE)
    processed = generate(webui, p)
    statuses = [text.split("MONKEY status: ")[1] for text in processed.infotexts[:4]]
    assert "threshold 0.00" in statuses[0] and "(full mask)" in statuses[0]
    assert "threshold 1.00" in statuses[1] and "(full mask)" not in statuses[1]
    assert statuses[2].startswith('"masked')  # Otsu's threshold for this image's own map
    assert "threshold 0.50" in statuses[3]  # past the list: the global threshold
    assert len(processed.images) == 4 + 4  # four images, four masks
    assert host.ip_applied(p) == 4  # both passes of both batches
    host.assert_clean(webui, p)
