"""Mask mode ``per_unit`` on diffusers: several IP-Adapters, several images per adapter."""

from __future__ import annotations

import pytest
import torch
from tiny import CLIP_DIM, ip_adapter_state_dict, set_ip_scale, tiny_unet

from monkey.args import MonkeyArgs
from monkey.diffusers.hooks import DiffusersMonkey
from monkey.maskset import MaskSet, UnitMasks
from monkey.rows import RowLayout
from monkey.session import MonkeySession, Phase

SOURCE = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"  # works at latent/2: 8×8
PER_UNIT = MonkeyArgs(mask_mode="per_unit")
IMAGES = 2  # generated images; rows = 2 · IMAGES under CFG


@pytest.fixture(scope="module")
def unet():
    """Two IP-Adapters, as ``load_ip_adapter`` with two weight files loads them."""
    unet = tiny_unet()
    torch.manual_seed(0)
    states = [ip_adapter_state_dict(unet, seed) for seed in (0, 1)]
    unet._load_ip_adapter_weights(states, low_cpu_mem_usage=False)
    return unet.eval()


def call(unet, references: tuple[int, ...], seed: int = 1):
    """Run the UNet once; ``references[a]`` images for adapter ``a`` (uncond rows first)."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * IMAGES
    sample = torch.randn(rows, 4, 16, 16, generator=gen)
    text = torch.randn(rows, 7, unet.config.cross_attention_dim, generator=gen)
    embeds = [torch.randn(rows, n, CLIP_DIM, generator=gen) for n in references]
    with torch.no_grad():
        return unet(
            sample, torch.tensor(500), encoder_hidden_states=text,
            added_cond_kwargs={"image_embeds": embeds},
        ).sample  # fmt: skip


def session_at(phase: Phase, masks=None, args: MonkeyArgs = PER_UNIT) -> MonkeySession:
    session = MonkeySession(args, (SOURCE,), RowLayout.diffusers(IMAGES, cfg=True))
    session.masks = masks
    session.begin(phase)
    session.begin_step(1, 4)  # recorded and masked at the defaults
    return session


def test_each_image_of_each_adapter_records_from_its_own_keys(unet):
    attn = unet.get_submodule(SOURCE)
    seen = {}

    def grab(_module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["ip"] = kwargs["encoder_hidden_states"][1]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    session = session_at(Phase.RECORD)
    try:
        with DiffusersMonkey(unet, session).hooks:
            call(unet, (1, 2))
    finally:
        handle.remove()
    assert sorted(session.recorders) == [0, 1, 2] and session.units == 3
    q = attn.to_q(seen["x"]).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    units = [(0, 0), (1, 0), (1, 1)]  # (adapter, image): adapter 0's image, adapter 1's two
    for unit, (adapter, image) in enumerate(units):
        k = attn.processor.to_k_ip[adapter](seen["ip"][adapter][:, image])
        k = k.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # the reference scale: no 1/√d
        expected = probs[IMAGES:, :, :, 1].mean(dim=1)  # cond rows, token 1 of 4
        recorded = session.recorders[unit].result().maps[:, 0].reshape(IMAGES, -1)
        torch.testing.assert_close(recorded, expected, rtol=0, atol=1e-6)


def units_of(*binaries: torch.Tensor) -> UnitMasks:
    sets = [MaskSet.full(IMAGES, (8, 8)) for _ in binaries]
    for mask_set, binary in zip(sets, binaries):
        mask_set.binary = binary.bool()
    return UnitMasks(sets, [4] * len(sets))


def masked(unet, masks: UnitMasks, references=(1, 1)) -> torch.Tensor:
    session = session_at(Phase.APPLY, masks)
    with DiffusersMonkey(unet, session).hooks:
        return call(unet, references)


def test_all_ones_for_every_unit_is_plain_ip_adapter_with_both_adapters(unet):
    plain = call(unet, (1, 1))
    out = masked(unet, units_of(torch.ones(IMAGES, 8, 8), torch.ones(IMAGES, 8, 8)))
    assert (out - plain).abs().max() <= 1e-6


def test_each_adapter_is_multiplied_by_its_own_mask(unet):
    set_ip_scale(unet, 0.0)
    for processor in unet.attn_processors.values():
        if hasattr(processor, "to_k_ip"):
            processor.scale = [1.0, 0.0]
    try:
        first_alone = call(unet, (1, 1))
    finally:
        set_ip_scale(unet, 1.0)
    out = masked(unet, units_of(torch.ones(IMAGES, 8, 8), torch.zeros(IMAGES, 8, 8)))
    assert (out - first_alone).abs().max() <= 1e-5
    assert not torch.allclose(out, call(unet, (1, 1)), atol=1e-4)


def test_per_unit_needs_no_more_from_a_shared_session(unet):
    """Shared mode on the same UNet still records one map: the source adapter's."""
    session = session_at(Phase.RECORD, args=MonkeyArgs())
    with DiffusersMonkey(unet, session, source_adapter=1).hooks:
        call(unet, (1, 2))
    assert list(session.recorders) == [0] and session.recorder.result().tokens == 8
