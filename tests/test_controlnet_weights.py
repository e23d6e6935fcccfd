"""Recording at a layer whose ControlNet IP-Adapter weight is 0 (InstantStyle weight types)."""

from __future__ import annotations

import types

import fake_controlnet
import pytest
import torch
from fake_controlnet import FakeIPAdapter, style_transfer_sd1
from webui_run import generate, latents, make_p

from monkey.args import MonkeyArgs
from monkey.layers import SD1
from monkey.rows import RowLayout
from monkey.session import MonkeySession, Phase
from monkey.webui import controlnet

ON = MonkeyArgs(enabled=True)
LAYER = "output_blocks.4.1.transformer_blocks.0.attn2"  # the paper's layer, group 8
COND_MARK = [1.0, 0.0]


def query_at(module: torch.nn.Module, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and ControlNet's ``q`` for a 16×16 latent at ``layer``."""
    h, w = SD1.layer(layer).size((16, 16))
    x = torch.randn(len(COND_MARK), h * w, module.to_q.out_features)
    q = module.to_q(x).view(len(COND_MARK), h * w, module.heads, -1).transpose(1, 2)
    return x, q


def recording_at(
    weight, start: float = 0.0, end: float = 1.0, percent: float = 0.25, sources=(LAYER,)
):
    """A real attn2 hooked by one ControlNet-shaped unit, and a session recording one UNet call."""
    from fake_ldm import TinyLdmUNet

    unet = TinyLdmUNet().eval()
    adapter = FakeIPAdapter(unet, seed=3, weight=weight, start=start, end=end)
    adapter.hook(unet)
    unet.cond_mark = torch.tensor(COND_MARK)[:, None, None, None]
    unet.current_sampling_percent = percent
    hacks = controlnet.find_ip_hacks(unet)
    hack = next(h for h in hacks if h.layer == LAYER)
    session = MonkeySession(ON, tuple(sources), RowLayout.webui([1]))
    session.begin(Phase.RECORD)
    session.begin_step(3, 8)  # a recorded step (3 and 5 of 8)
    session.begin_unet_call(len(COND_MARK), (16, 16))
    module = unet.get_submodule(LAYER)
    return adapter, hacks, hack, session, module, *query_at(module, LAYER)


def independent_map(adapter: FakeIPAdapter, q: torch.Tensor, token: int) -> torch.Tensor:
    """Head-mean ``softmax(q·k_ipᵀ)`` of the cond row (the default reference scale, no 1/√d),
    from the raw weights and embedding."""
    w = adapter.ipadapter.ip_layers.to_kvs["15_to_k_ip"].weight  # layer number 7
    emb = adapter.image_emb.cond[0]  # row 0 is the cond row
    k = (emb @ w.T).view(emb.shape[0], q.shape[1], -1).transpose(0, 1)  # [heads, T, d]
    probs = torch.softmax(q[0] @ k.transpose(-1, -2), dim=-1)
    return probs[..., token].mean(0)


def test_style_transfer_zeroes_the_papers_layer_and_its_neighbours():
    adapter, hacks, _, *_ = recording_at(style_transfer_sd1())
    zero = controlnet.zero_weight_layers(hacks, adapter)
    groups = {h.transformer_index for h in hacks if h.layer in zero}
    assert LAYER in zero and groups == {4, 5, 6, 7, 8}
    assert controlnet.zero_weight_layers(hacks, object()) == set()


def test_a_scalar_weight_zeroes_no_layer():
    adapter, hacks, *_ = recording_at(1.0)
    assert controlnet.zero_weight_layers(hacks, adapter) == set()


def test_a_zero_weight_layer_is_recorded_from_the_adapters_own_keys():
    adapter, _, hack, session, module, x, q = recording_at(style_transfer_sd1())
    assert hack.fn(module, x, q) == 0.0 and "15_to_k_ip" not in adapter.cache
    out = controlnet.wrap(hack, session, 0)(module, x, q)
    assert not isinstance(out, torch.Tensor) and out == 0.0  # pass 1's image is unchanged
    assert "15_to_k_ip" not in adapter.cache  # ControlNet's cache is left as it had it
    recorded = session.recorder.result().maps[0, 0].reshape(-1)
    torch.testing.assert_close(recorded, independent_map(adapter, q, token=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "weight", [style_transfer_sd1(), 1.0], ids=["zero-weight-layer", "weighted-layer"]
)
@pytest.mark.parametrize(("start", "end"), [(0.5, 1.0), (0.0, 0.2)], ids=["before", "after"])
def test_outside_the_units_start_end_nothing_is_recorded(weight, start, end):
    _, _, hack, session, module, x, q = recording_at(weight, start, end, percent=0.25)
    assert controlnet.wrap(hack, session, 0)(module, x, q) == 0.0
    assert not session.recorder.has_data


def test_every_layer_records_and_keeps_controlnets_output():
    _, hacks, hack, session, module, *_ = recording_at(style_transfer_sd1(), sources=SD1.names())
    observed = []
    real_observe = session.observe
    session.observe = lambda layer, q, k, unit: (
        observed.append(layer),
        real_observe(layer, q, k, unit),
    )
    unet = fake_controlnet.current_model  # the UNet last hooked, as ControlNet keeps it
    for hack in hacks:
        module = unet.get_submodule(hack.layer)
        x, q = query_at(module, hack.layer)
        plain = hack.fn(module, x, q)
        wrapped = controlnet.wrap(hack, session, 0)(module, x, q)
        assert type(wrapped) is type(plain)
        assert torch.equal(torch.as_tensor(wrapped), torch.as_tensor(plain))
    assert sorted(observed) == sorted(SD1.names())


def test_pulid_keys_get_its_zero_tokens():
    adapter, _, hack, _, _, _, q = recording_at(style_transfer_sd1())
    adapter.ipadapter.is_pulid = True
    adapter.pulid_attn_setting = types.SimpleNamespace(num_zero=8)
    key = controlnet.projected_ip_key(hack, q)
    assert key.shape[2] == 4 + 8
    assert torch.count_nonzero(key[:, :, 4:]) == 0  # bias-free projections of zero tokens


def test_a_style_transfer_unit_still_gets_masked(webui):
    units = [{"seed": 7, "weight": style_transfer_sd1()}]
    size = {"width": 128, "height": 128}
    plain = make_p(webui, monkey=False, units=units, **size)
    generate(webui, plain)
    p = make_p(webui, ON, units=units, **size)
    processed = generate(webui, p)
    assert "no IP-Adapter attention was recorded" not in processed.infotexts[0]
    assert '"masked' in processed.infotexts[0]
    assert "where its IP-Adapter weight is 0 (output_blocks.4.1)" in processed.infotexts[0]
    assert not torch.allclose(latents(p), latents(plain), atol=1e-3)
