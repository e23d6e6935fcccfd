"""Random-weight SD1.5- and SDXL-shaped UNets with IP-Adapter, reached through either hook path.

* ``diffusers``: IP-Adapter weights loaded by diffusers' own loader; MONKEY wraps diffusers'
  ``IPAdapterAttnProcessor2_0`` (``monkey.diffusers.hooks``).
* ``controlnet``: the same UNet with sd-webui-controlnet's shape of IP-Adapter, the closures and
  hacked attention of the tests' ``fake_controlnet`` (one restatement of ControlNet for both):
  every attn2 adds ``sum(f(attn, x, q) for f in attn.ipadapter_hacks)`` to its text attention,
  each ``f`` projecting and caching the IP keys once per generation; MONKEY wraps those entries
  (``monkey.webui.controlnet``).
* ``forge``: the same UNet with Forge's shape of IP-Adapter, the tests' ``fake_forge`` patcher and
  ``CrossAttentionPatch``: each attn2 calls its ``patches_replace`` entry with the projected
  q, k, v (the patch projects the IP keys on every call); the integrated ControlNet clones the
  patcher and builds new patches for every sampler run, and MONKEY clones and wraps them
  (``monkey.webui.forge``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_controlnet import attention_with_ip_hacks, ip_hack  # noqa: E402
from fake_forge import CrossAttentionPatch, UnetPatcher, attention_function  # noqa: E402
from tiny import ip_adapter_state_dict  # noqa: E402

from monkey.layers import family_for  # noqa: E402

TOKENS = 4


def unet_config(model: str, full_size: bool) -> dict:
    if model == "sd15":
        width = 320 if full_size else 32
        return {
            "sample_size": 64,
            "block_out_channels": (width, 2 * width, 4 * width, 4 * width),
            "layers_per_block": 2,
            "cross_attention_dim": 768 if full_size else 64,
            "attention_head_dim": 8,
            "norm_num_groups": 32 if full_size else 8,
        }
    width = 320 if full_size else 32
    return {
        "sample_size": 128,
        "block_out_channels": (width, 2 * width, 4 * width),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20) if full_size else (1, 2, 4),
        "cross_attention_dim": 2048 if full_size else 64,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256 if full_size else 8,
        "projection_class_embeddings_input_dim": (2816 if full_size else 64 + 6 * 8),
        "norm_num_groups": 32 if full_size else 8,
    }


@dataclass
class Model:
    unet: UNet2DConditionModel
    text: torch.Tensor
    """``[2B, L, C]`` uncond rows then cond rows (diffusers); the WebUI path flips them."""
    added: dict
    image_embeds: torch.Tensor | None
    path: str


def build(model: str, path: str, full_size: bool, images: int, device, dtype) -> Model:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(model, full_size)).eval()
    state = ip_adapter_state_dict(unet, seed=1, tokens=TOKENS)
    gen = torch.Generator().manual_seed(2)
    cross = unet.config.cross_attention_dim
    rows = 2 * images
    text = torch.randn(rows, 77, cross, generator=gen)
    added = {}
    if model == "sdxl":
        pooled = (
            unet.config.projection_class_embeddings_input_dim
            - 6 * unet.config.addition_time_embed_dim
        )
        added = {
            "text_embeds": torch.randn(rows, pooled, generator=gen),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * rows),
        }
    image_embeds = None
    if path == "diffusers":
        unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
        clip = state["image_proj"]["proj.weight"].shape[1]
        image_embeds = torch.randn(rows, 1, clip, generator=gen)
    elif path == "forge":
        ForgeShapedIP(unet, state["ip_adapter"], gen).hook()
    else:
        ControlNetShapedIP(unet, state["ip_adapter"], gen).hook()
    unet = unet.to(device=device, dtype=dtype)
    cast = {"device": device, "dtype": dtype}
    return Model(
        unet,
        text.to(**cast),
        {k: v.to(**cast) for k, v in added.items()},
        None if image_embeds is None else image_embeds.to(**cast),
        path,
    )


class ControlNetShapedIP(torch.nn.Module):
    """The parts of ControlNet's ``PlugableIPAdapter`` its closures use (one unit, weight 1)."""

    def __init__(self, unet: UNet2DConditionModel, ip_weights: dict, gen: torch.Generator):
        super().__init__()
        object.__setattr__(self, "unet", unet)  # not a submodule: the UNet owns this adapter
        cross = unet.config.cross_attention_dim
        self.to_kvs = torch.nn.ModuleDict()
        for name, weight in ip_weights.items():
            index, kind = name.removesuffix(".weight").split(".")
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight.data = weight
            self.to_kvs[f"{index}_{kind}"] = linear
        self.cond_emb = torch.nn.Parameter(torch.randn(1, TOKENS, cross, generator=gen))
        self.uncond_emb = torch.nn.Parameter(torch.zeros(1, TOKENS, cross))
        self.weight = 1.0
        self.cache: dict = {}

    def call_ip(self, key: str, feat: torch.Tensor, device) -> torch.Tensor:
        if key not in self.cache:
            self.cache[key] = self.to_kvs[key](feat)
        return self.cache[key]

    def weight_now(self, transformer_index: int) -> float:
        return self.weight

    def embedding(self) -> torch.Tensor:
        mark = self.unet.cond_mark[:, :, 0, 0][:, :, None].to(self.cond_emb.dtype)  # [B, 1, 1]
        return self.cond_emb * mark + self.uncond_emb * (1 - mark)

    def hook(self) -> None:
        self.unet.add_module("controlnet_ip", self)
        names = [n for n in self.unet.attn_processors if n.endswith("attn2.processor")]
        for number, name in enumerate(names):
            attn = self.unet.get_submodule(name.removesuffix(".processor"))
            attn.ipadapter_hacks = [ip_hack(self, number, 0)]
            attn.set_processor(HackedAttention())

    def new_generation(self, cond_mark: torch.Tensor) -> None:
        self.cache = {}
        self.unet.cond_mark = cond_mark


class HackedAttention:
    """ControlNet's hacked attn2 forward: text attention plus each IP hack's output."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kwargs,
    ):
        out = attention_with_ip_hacks(attn, hidden_states, encoder_hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


class ForgeShapedIP(torch.nn.Module):
    """One IP-Adapter unit as Forge's integrated ControlNet applies it, and the ``forge_objects``
    whose ``unet`` patcher each attn2 reads its patch from (``sd_model`` is what MONKEY's Forge
    backend reads from ``p``)."""

    def __init__(self, unet: UNet2DConditionModel, ip_weights: dict, gen: torch.Generator):
        super().__init__()
        cross = unet.config.cross_attention_dim
        self.adapter = torch.nn.Module()  # what each patch holds (Forge's clone deep-copied it)
        self.adapter.ip_layers = torch.nn.Module()
        self.adapter.ip_layers.to_kvs = torch.nn.ModuleDict()
        for name, weight in ip_weights.items():
            index, kind = name.removesuffix(".weight").split(".")
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight.data = weight
            self.adapter.ip_layers.to_kvs[f"{index}_{kind}"] = linear
        self.cond_emb = torch.nn.Parameter(torch.randn(1, TOKENS, cross, generator=gen))
        self.uncond_emb = torch.nn.Parameter(torch.zeros(1, TOKENS, cross))
        object.__setattr__(self, "unet", unet)
        self.base = UnetPatcher(model=None)
        self.sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=self.base))
        self.keys: list[tuple] = []
        self.extra: dict = {}

    def hook(self) -> None:
        self.unet.add_module("forge_ip", self)
        names = [n for n in self.unet.attn_processors if n.endswith("attn2.processor")]
        family = family_for(names)
        for name in names:
            key = forge_key(family.layer(name).ldm)
            self.keys.append(key)
            attn = self.unet.get_submodule(name.removesuffix(".processor"))
            attn.set_processor(ForgeAttention(self, key))

    def apply(self) -> None:
        """The integrated ControlNet in ``process_before_every_sampling``: a clone of the cached
        patcher with new patches over the adapter, put in ``forge_objects``."""
        work = self.base.clone()
        attn2 = work.model_options["transformer_options"].setdefault("patches_replace", {})
        attn2 = attn2.setdefault("attn2", {})
        cond, uncond = self.cond_emb.detach(), self.uncond_emb.detach()
        for number, key in enumerate(self.keys):
            attn2[key] = CrossAttentionPatch(
                1.0, self.adapter, number, cond, uncond, sigma_start=1e9, sigma_end=0.0
            )
        self.sd_model.forge_objects.unet = work

    def begin_call(self, rows: int, sigma: float, latent_shape) -> None:
        """The sampler's ``transformer_options`` for one UNet call: uncond chunk first."""
        self.extra = {
            "cond_or_uncond": [1, 0],
            "sigmas": torch.full((rows // 2,), float(sigma)),
            "original_shape": list(latent_shape),
        }


def forge_key(ldm: str) -> tuple:
    """The ``patches_replace`` key Forge's UNet gives an ldm attn2 path:
    ``output_blocks.4.1.transformer_blocks.0.attn2`` -> ``("output", 4, 0)``."""
    parts = ldm.split(".")
    index = int(parts[parts.index("transformer_blocks") + 1])
    if parts[0] == "middle_block":
        return ("middle", 0, index)
    return (parts[0].removesuffix("_blocks"), int(parts[1]), index)


class ForgeAttention:
    """Forge's attn2 with a ``patches_replace`` entry: the patch gets the projected q, k, v."""

    def __init__(self, ip: ForgeShapedIP, key: tuple):
        self.ip, self.key = ip, key

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kwargs,
    ):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        options = self.ip.sd_model.forge_objects.unet.model_options["transformer_options"]
        patch = options.get("patches_replace", {}).get("attn2", {}).get(self.key)
        if patch is None:
            out = attention_function(q, k, v, attn.heads)
        else:
            out = patch(q, k, v, {**self.ip.extra, "n_heads": attn.heads})
        return attn.to_out[1](attn.to_out[0](out))
