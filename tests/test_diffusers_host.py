"""MONKEY on a real diffusers UNet2DConditionModel whose IP-Adapter was loaded by diffusers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import CLIP_DIM, TOKENS, Inputs, set_ip_scale, tiny_unet, with_ip_adapter

from monkey.args import MonkeyArgs
from monkey.diffusers import hooks as diffusers_host
from monkey.diffusers.hooks import DiffusersMonkey, MonkeyIPAdapterProcessor, ip_attention_modules
from monkey.masks import MaskStatus
from monkey.maskset import MaskSet
from monkey.rows import RowLayout
from monkey.session import MonkeySession, Phase

SOURCE = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"  # works at latent/2
FIRST = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # first IP layer the input reaches


@pytest.fixture(scope="module")
def unet():
    return with_ip_adapter(tiny_unet())


@pytest.fixture(scope="module")
def inputs(unet):
    return Inputs(unet, images=2)


def session_for(args: MonkeyArgs, images: int = 2, layers=(SOURCE,)) -> MonkeySession:
    return MonkeySession(args, layers, RowLayout.diffusers(images, cfg=True))


def masks_of(binary: torch.Tensor) -> MaskSet:
    n = binary.shape[0]
    return MaskSet(binary.bool(), [MaskStatus.OK] * n, [0.5] * n, [1] * n)


def reference_maps(
    unet, inputs: Inputs, layer: str, token: int, attention_scale: str = "sdpa"
) -> torch.Tensor:
    """Head-mean attention on one IP token, cond rows, via SDPA's own weights (V = identity);
    ``"reference"`` is the paper's code's map: the same softmax without 1/√d."""
    attn = unet.get_submodule(layer)
    seen = {}

    def grab(_module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["ctx"] = kwargs["encoder_hidden_states"]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        inputs(unet)
    finally:
        handle.remove()
    heads = attn.heads
    q = attn.to_q(seen["x"])
    k = attn.processor.to_k_ip[0](seen["ctx"][1][0]).flatten(1, 2)
    b, n, c = q.shape
    q = q.view(b, n, heads, c // heads).transpose(1, 2)
    k = k.view(b, -1, heads, c // heads).transpose(1, 2)
    eye = torch.eye(k.shape[2]).expand(b, heads, -1, -1)
    scale = 1.0 if attention_scale == "reference" else None
    weights = F.scaled_dot_product_attention(q, k, eye, scale=scale)  # softmax(s·q·kᵀ) @ I
    cond = weights[b // 2 :]  # diffusers: uncond rows first
    return cond[..., token].mean(dim=1)


def test_wraps_every_ip_layer_and_nothing_else(unet):
    names = set(ip_attention_modules(unet))
    assert len(names) == 7
    assert all(name.endswith("attn2") for name in names)
    session = session_for(MonkeyArgs())
    with DiffusersMonkey(unet, session).hooks:
        wrapped = {
            n
            for n, m in unet.named_modules()
            if isinstance(getattr(m, "processor", None), MonkeyIPAdapterProcessor)
        }
        assert wrapped == names
    assert not any(isinstance(p, MonkeyIPAdapterProcessor) for p in unet.attn_processors.values())


@pytest.mark.parametrize("scale", ["reference", "sdpa"])
@pytest.mark.parametrize("token", [0, 1, 3], ids=lambda t: f"token{t}")
def test_recorded_maps_equal_independent_reference(unet, inputs, token, scale):
    session = session_for(MonkeyArgs(token=token, attention_scale=scale))
    session.begin(Phase.RECORD)
    session.begin_step(1, 4)
    with DiffusersMonkey(unet, session).hooks:
        inputs(unet)
    recorded = session.recorder.result()
    expected = reference_maps(unet, inputs, SOURCE, token, scale)
    assert recorded.maps.shape == (2, 1, 8, 8)
    torch.testing.assert_close(recorded.maps[:, 0].reshape(2, -1), expected, rtol=0, atol=1e-6)


def test_recording_outside_window_records_nothing(unet, inputs):
    session = session_for(MonkeyArgs())
    session.begin(Phase.RECORD)
    session.begin_step(0, 4)
    with DiffusersMonkey(unet, session).hooks:
        inputs(unet)
    assert not session.recorder.has_data


def test_recording_leaves_the_output_bit_identical(unet, inputs):
    plain = inputs(unet)
    session = session_for(MonkeyArgs())
    session.begin(Phase.RECORD)
    session.begin_step(1, 4)
    with DiffusersMonkey(unet, session).hooks:
        recorded = inputs(unet)
    assert session.recorder.has_data
    assert torch.equal(plain, recorded)


@pytest.mark.parametrize("mode", ["shared", "per_unit"])
def test_a_source_layer_at_scale_0_records_from_the_adapters_own_keys(unet, inputs, mode):
    """InstantStyle-style scales zero the source layer, where diffusers then projects no key:
    MONKEY projects the adapter's own, as the WebUI hosts do, and leaves the output alone."""
    processor = unet.get_submodule(SOURCE).processor
    processor.scale = [0.0]
    try:
        plain = inputs(unet)
        session = session_for(MonkeyArgs(mask_mode=mode))
        session.begin(Phase.RECORD)
        session.begin_step(1, 4)
        monkey = DiffusersMonkey(unet, session)
        with monkey.hooks:
            recorded = inputs(unet)
        expected = reference_maps(unet, inputs, SOURCE, 1, "reference")
    finally:
        processor.scale = [1.0]
    assert torch.equal(plain, recorded)  # the layer still adds no image attention
    assert monkey.zero_weight_layers() == {SOURCE}
    maps = session.recorder.result().maps[:, 0].reshape(2, -1)
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-6)


def applied(
    unet, inputs, masks: MaskSet, args: MonkeyArgs | None = None, step=(1, 4)
) -> torch.Tensor:
    session = session_for(args or MonkeyArgs())
    session.masks = masks
    session.begin(Phase.APPLY)
    session.begin_step(*step)
    with DiffusersMonkey(unet, session).hooks:
        return inputs(unet)


def without_ip(unet, inputs: Inputs) -> torch.Tensor:
    """The UNet's output with every IP-Adapter scale at 0 (diffusers skips the IP branch)."""
    set_ip_scale(unet, 0.0)
    try:
        return inputs(unet)
    finally:
        set_ip_scale(unet, 1.0)


def test_all_ones_mask_equals_plain_ip_adapter(unet, inputs):
    plain = inputs(unet)
    out = applied(unet, inputs, masks_of(torch.ones(2, 8, 8)))
    assert torch.equal(out, plain)


def test_all_ones_mask_equals_plain_with_several_reference_images(unet):
    # diffusers' own mask path attends each reference image separately; MONKEY's keeps the
    # unmasked attention over all of the adapter's image tokens
    several = Inputs(unet, images=2)
    gen = torch.Generator().manual_seed(5)
    several.image_embeds = [torch.randn(4, 3, CLIP_DIM, generator=gen)]
    assert torch.equal(applied(unet, several, masks_of(torch.ones(2, 8, 8))), several(unet))


def test_masked_steps_never_resample_a_mask(unet, inputs, monkeypatch):
    from diffusers.image_processor import IPAdapterMaskProcessor

    def refuse(*_args, **_kwargs):
        raise AssertionError("mask resampled on a masked step")

    monkeypatch.setattr(IPAdapterMaskProcessor, "downsample", staticmethod(refuse))
    binary = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(4)) > 0.5
    assert not torch.equal(applied(unet, inputs, masks_of(binary)), inputs(unet))


def test_masked_arithmetic_equals_the_processors_own_mask_path(unet, inputs, monkeypatch):
    binary = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(4)) > 0.5
    fast = applied(unet, inputs, masks_of(binary))
    monkeypatch.setattr(diffusers_host, "EXACT_PROCESSOR", None)  # take diffusers' mask path
    slow = applied(unet, inputs, masks_of(binary))
    assert (fast - slow).abs().max() <= 1e-6


def test_all_zeros_mask_equals_ip_scale_zero(unet, inputs):
    no_ip = without_ip(unet, inputs)
    out = applied(unet, inputs, masks_of(torch.zeros(2, 8, 8)))
    assert torch.equal(out, no_ip)  # out_txt + 0 is out_txt exactly
    assert not torch.equal(out, inputs(unet))


def test_ip_off_outside_apply_window_equals_ip_scale_zero(unet, inputs):
    no_ip = without_ip(unet, inputs)
    out = applied(unet, inputs, masks_of(torch.ones(2, 8, 8)), step=(0, 4))
    assert torch.equal(out, no_ip)
    kept = applied(
        unet, inputs, masks_of(torch.ones(2, 8, 8)), MonkeyArgs(ip_off_outside=False), step=(0, 4)
    )
    assert torch.equal(kept, inputs(unet))


def layer_output(unet, layer: str, run) -> torch.Tensor:
    captured = {}
    handle = unet.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: captured.setdefault("out", out)
    )
    try:
        run()
    finally:
        handle.remove()
    return captured["out"]


def test_ip_contribution_is_exactly_zero_outside_the_mask(unet, inputs):
    gen = torch.Generator().manual_seed(3)
    binary = torch.rand(2, 8, 8, generator=gen) > 0.5
    masks = masks_of(binary)
    text_only = layer_output(unet, FIRST, lambda: without_ip(unet, inputs))
    masked = layer_output(unet, FIRST, lambda: applied(unet, inputs, masks))
    layer_mask = masks.weights(256, (16, 16), torch.device("cpu"))  # [images, N] at 16×16
    rows = torch.tensor([0, 1, 0, 1])  # uncond images 0, 1 then cond images 0, 1
    outside = layer_mask[rows] == 0
    inside = layer_mask[rows] == 1
    assert outside.any() and inside.any()
    assert torch.equal(masked[outside], text_only[outside])
    assert not torch.allclose(masked[inside], text_only[inside])


def test_each_image_gets_its_own_mask_in_cond_and_uncond_rows(unet, inputs):
    plain = inputs(unet)
    no_ip = without_ip(unet, inputs)
    binary = torch.stack([torch.ones(8, 8), torch.zeros(8, 8)])
    out = applied(unet, inputs, masks_of(binary))
    image0, image1 = torch.tensor([0, 2]), torch.tensor([1, 3])
    assert (out[image0] - plain[image0]).abs().max() <= 1e-6
    assert (out[image1] - no_ip[image1]).abs().max() <= 1e-6


def test_removing_the_hooks_restores_the_unet_bit_for_bit(unet, inputs):
    before_out = inputs(unet)
    before_state = {k: v.clone() for k, v in unet.state_dict().items()}
    before_processors = dict(unet.attn_processors)
    session = session_for(MonkeyArgs())
    monkey = DiffusersMonkey(unet, session)
    monkey.hooks.install()
    monkey.hooks.install()  # idempotent
    assert monkey.hooks.installed
    monkey.hooks.remove()
    assert not monkey.hooks.installed
    assert unet.attn_processors == before_processors
    assert all(a is b for a, b in zip(unet.attn_processors.values(), before_processors.values()))
    after_state = unet.state_dict()
    assert list(after_state) == list(before_state)
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    assert not unet._forward_pre_hooks
    assert torch.equal(inputs(unet), before_out)


def test_wrapped_processors_keep_their_weights_reachable(unet):
    session = session_for(MonkeyArgs())
    with DiffusersMonkey(unet, session).hooks:
        names = [k for k in unet.state_dict() if "to_k_ip" in k]
    assert len(names) == 7
    assert all(".processor.inner.to_k_ip" in k for k in names)


def test_tokens_are_ip_adapter_tokens(unet):
    assert TOKENS == 4
    assert all(
        p.num_tokens == [TOKENS] for p in ip_attention_modules(unet).values() for p in [p.processor]
    )
