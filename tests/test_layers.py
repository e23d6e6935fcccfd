"""The SD1.x and SDXL attn2 tables, checked against real diffusers UNets of the same shape."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from tiny import sd15_shaped_unet

from monkey.layers import SD1, SDXL, family_for, source_layers
from monkey.masks import layer_size


def sdxl_shaped_unet(width: int = 16) -> UNet2DConditionModel:
    """SDXL's block structure (transformer depths 2 and 10) at a tiny width, no added embeddings."""
    return UNet2DConditionModel(
        sample_size=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(width, 2 * width, 4 * width),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 8),
        norm_num_groups=8,
    )


def attn2_names(unet: torch.nn.Module) -> list[str]:
    return [
        n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")
    ]


def measured_sizes(unet: UNet2DConditionModel, latent_hw: tuple[int, int]) -> dict[str, int]:
    """Sequence length each attn2 layer actually sees for a latent of ``latent_hw``."""
    seen, handles = {}, []
    for name in attn2_names(unet):
        module = unet.get_submodule(name)
        handles.append(
            module.register_forward_hook(
                lambda _m, i, _o, name=name: seen.setdefault(name, i[0].shape[1])
            )
        )
    try:
        with torch.no_grad():
            unet(
                torch.randn(1, 4, *latent_hw),
                10,
                encoder_hidden_states=torch.randn(1, 3, unet.config.cross_attention_dim),
            )
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_sd1_table_counts_numbers_and_controlnet_groups():
    assert len(SD1.layers) == 16
    assert [layer.number for layer in SD1.layers] == list(range(16))
    assert [layer.ip_key for layer in SD1.layers][:3] == ["1.to_k_ip", "3.to_k_ip", "5.to_k_ip"]
    groups = {layer.ldm.split(".transformer")[0]: layer.transformer_index for layer in SD1.layers}
    assert groups["input_blocks.1.1"] == 0 and groups["input_blocks.8.1"] == 5
    assert groups["middle_block.1"] == 6
    assert groups["output_blocks.3.1"] == 7 and groups["output_blocks.11.1"] == 15
    assert SD1.default_source == ("output_blocks.4.1.transformer_blocks.0.attn2",)
    assert (
        SD1.layer("up_blocks.1.attentions.1.transformer_blocks.0.attn2").ldm
        == SD1.default_source[0]
    )


def test_sd1_resolutions_at_512px():
    sides = {layer.ldm.split(".transformer")[0]: layer.size((64, 64))[0] for layer in SD1.layers}
    expected = {
        "input_blocks.1.1": 64,
        "input_blocks.2.1": 64,
        "input_blocks.4.1": 32,
        "input_blocks.5.1": 32,
        "input_blocks.7.1": 16,
        "input_blocks.8.1": 16,
        "middle_block.1": 8,
        "output_blocks.3.1": 16,
        "output_blocks.4.1": 16,
        "output_blocks.5.1": 16,
        "output_blocks.6.1": 32,
        "output_blocks.7.1": 32,
        "output_blocks.8.1": 32,
        "output_blocks.9.1": 64,
        "output_blocks.10.1": 64,
        "output_blocks.11.1": 64,
    }
    assert sides == expected
    assert SD1.layer(SD1.default_source[0]).size((32, 32)) == (8, 8)  # the paper's 256 px


def test_sdxl_table_counts_order_and_resolutions_at_1024px():
    assert len(SDXL.layers) == 70
    assert [layer.number for layer in SDXL.layers] == list(range(70))
    blocks = [layer.ldm.split(".transformer")[0] for layer in SDXL.layers]
    assert blocks.index("output_blocks.0.1") == 24 and blocks.index("middle_block.1") == 60
    assert SDXL.layers[-1].ip_key == "139.to_k_ip"
    sides = {
        b: SDXL.layer(f"{b}.transformer_blocks.0.attn2").size((128, 128))[0] for b in set(blocks)
    }
    assert sides == {
        "input_blocks.4.1": 64,
        "input_blocks.5.1": 64,
        "input_blocks.7.1": 32,
        "input_blocks.8.1": 32,
        "middle_block.1": 32,
        "output_blocks.0.1": 32,
        "output_blocks.1.1": 32,
        "output_blocks.2.1": 32,
        "output_blocks.3.1": 64,
        "output_blocks.4.1": 64,
        "output_blocks.5.1": 64,
    }
    assert {layer.transformer_index for layer in SDXL.layers} == set(range(11))
    assert len(SDXL.default_source) == 10
    assert all(SDXL.layer(name).transformer_index == 6 for name in SDXL.default_source)


@pytest.mark.parametrize(
    ("family", "build"),
    [(SD1, sd15_shaped_unet), (SDXL, sdxl_shaped_unet)],
    ids=["sd1", "sdxl"],
)
def test_table_matches_diffusers_module_paths_and_weight_order(family, build):
    unet = build()
    # diffusers numbers IP-Adapter weights in attn_processors order; the table must agree
    assert attn2_names(unet) == [layer.diffusers for layer in family.layers]
    assert family_for(attn2_names(unet)) is family
    assert family_for(family.names()) is family


@pytest.mark.parametrize("latent_hw", [(8, 8), (13, 9), (9, 14)], ids=str)
@pytest.mark.parametrize(
    ("family", "build"), [(SD1, sd15_shaped_unet), (SDXL, sdxl_shaped_unet)], ids=["sd1", "sdxl"]
)
def test_table_levels_match_measured_sequence_lengths(family, build, latent_hw):
    unet = build()
    seen = measured_sizes(unet, latent_hw)
    for layer in family.layers:
        h, w = layer.size(latent_hw)
        assert seen[layer.diffusers] == h * w, layer.diffusers
        assert layer_size(seen[layer.diffusers], latent_hw) == (h, w)


def test_source_layers_resolve_in_the_models_own_naming():
    assert source_layers((), list(SD1.names())) == SD1.default_source
    diffusers_names = [layer.diffusers for layer in SD1.layers]
    assert source_layers((), diffusers_names) == (
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    )
    assert source_layers(("output_blocks.5.1.transformer_blocks.0.attn2",), diffusers_names) == (
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
    )
    with pytest.raises(KeyError, match="not an attn2 layer"):
        source_layers(("output_blocks.4.1.transformer_blocks.3.attn2",), list(SD1.names()))
    with pytest.raises(KeyError, match="name the mask layer"):
        source_layers((), ["custom.attn2"])
    assert source_layers(("custom.attn2",), ["custom.attn2"]) == ("custom.attn2",)
