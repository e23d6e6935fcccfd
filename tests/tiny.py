"""Random-weight diffusers UNets with IP-Adapter weights in the official file layout.

The weights are random; the loading is diffusers' own (``_load_ip_adapter_weights``), exactly as
``load_ip_adapter`` does after reading ``ip-adapter_sd15.bin``.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

CLIP_DIM = 24
TOKENS = 4


def tiny_unet(
    cross_dim: int = 32,
    block_out_channels: tuple[int, int] = (32, 64),
    time_cond_proj_dim: int | None = None,
) -> UNet2DConditionModel:
    """Two resolutions with cross-attention at both: 7 attn2 layers at latent/1 and latent/2.
    ``time_cond_proj_dim``: a guidance-embedding input, as latent consistency models have."""
    return UNet2DConditionModel(
        time_cond_proj_dim=time_cond_proj_dim,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def sd15_shaped_unet(width: int = 32, cross_dim: int = 64) -> UNet2DConditionModel:
    """SD1.5's block structure (16 attn2 layers, 8 heads) at a fraction of its width."""
    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        layers_per_block=2,
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        norm_num_groups=min(8, width),
    )


def ip_adapter_state_dict(unet: UNet2DConditionModel, seed: int = 0, tokens: int = TOKENS) -> dict:
    """``{"image_proj": ..., "ip_adapter": {"{2n+1}.to_k_ip.weight": ...}}`` as in ip-adapter_sd15.bin."""
    gen = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    ip = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
            ip[f"{index}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=gen) * cross**-0.5
            ip[f"{index}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=gen) * cross**-0.5
    image_proj = {
        "proj.weight": torch.randn(tokens * cross, CLIP_DIM, generator=gen) * CLIP_DIM**-0.5,
        "proj.bias": torch.randn(tokens * cross, generator=gen) * 0.1,
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    return {"image_proj": image_proj, "ip_adapter": ip}


def with_ip_adapter(unet: UNet2DConditionModel, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet._load_ip_adapter_weights([ip_adapter_state_dict(unet, seed)], low_cpu_mem_usage=False)
    return unet.eval()


class Inputs:
    """One UNet call's inputs: ``rows`` = 2·images under CFG (diffusers puts uncond first)."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        images: int = 2,
        hw: tuple[int, int] = (16, 16),
        seed: int = 1,
    ):
        gen = torch.Generator().manual_seed(seed)
        cross = unet.config.cross_attention_dim
        rows = 2 * images
        self.sample = torch.randn(rows, unet.config.in_channels, *hw, generator=gen)
        self.text = torch.randn(rows, 7, cross, generator=gen)
        self.image_embeds = [torch.randn(rows, 1, CLIP_DIM, generator=gen)]
        self.timestep = torch.tensor(500)

    def __call__(
        self, unet: UNet2DConditionModel, sample: torch.Tensor | None = None, t=None
    ) -> torch.Tensor:
        with torch.no_grad():
            return unet(
                self.sample if sample is None else sample,
                self.timestep if t is None else t,
                encoder_hidden_states=self.text,
                added_cond_kwargs={"image_embeds": self.image_embeds},
            ).sample


def set_ip_scale(unet: UNet2DConditionModel, scale: float) -> None:
    for processor in unet.attn_processors.values():
        if hasattr(processor, "to_k_ip"):
            processor.scale = [scale] * len(processor.scale)
