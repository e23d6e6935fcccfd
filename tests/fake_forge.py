"""The thin surface of Forge (f2.0.1v1.10.1, dfdcbab) that MONKEY touches, in our own words.

Kept as Forge has it: ``p.sample`` resets ``p.sd_model.forge_objects`` to a shallow copy of
``forge_objects_after_applying_lora`` and then runs ``process_before_every_sampling`` (twice in
the hires pass, the first time before the reset); the integrated ControlNet's IP-Adapter clones
the UNet patcher (``clone`` deep-copies ``model_options``) and registers one
``CrossAttentionPatch`` per attn2 layer under ``("input"|"output"|"middle", id)``, appending a
unit to an existing entry; ``set_model_attn2_replace`` copies the dicts it writes into; the
sampler runs the UNet in chunks of one prompt for every image, uncond chunk first (the last
runnable chunk is taken first), cond-only when the CFG scale is 1, one call per chunk under low
memory, with ``transformer_options`` carrying ``cond_or_uncond``, ``sigmas``, ``cond_indices``,
``uncond_indices`` and ``original_shape``; attn2 replacements get the projected q, k, v.
Everything below (UNet, attention, IP-Adapter projections) is real torch.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from fake_ldm import CONTEXT_DIM, TinyLdmUNet
from fake_webui import (
    CFGDenoiser,
    FakeSDModel,
    Sampler,
    StableDiffusionProcessingImg2Img,
    StableDiffusionProcessingTxt2Img,
)
from torch import nn

from monkey.layers import SD1

TOKENS = 4
NO_SIGMA = 999999999.9


def attention_function(q, k, v, heads):
    """``backend.attention.attention_function``: [B, L, heads·d] in and out."""
    b, _, inner = q.shape
    q, k, v = (t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, inner)


# -- the UNet -------------------------------------------------------------------------------------


def block_key(path: str) -> tuple:
    """``input_blocks.4.1.transformer_blocks.0.attn2`` -> ``("input", 4)`` (the UNet's ``block``)."""
    if path.startswith("middle_block"):
        return ("middle", 0)
    name, number = path.split(".")[:2]
    return (name.removesuffix("_blocks"), int(number))


class ForgeAttn2(nn.Module):
    """``BasicTransformerBlock``'s attn2 step: a replacement patch for the block (3-tuple key
    first) gets ``to_q/to_k/to_v`` of the input and its result goes through ``to_out``."""

    def __init__(self, inner: nn.Module, path: str, box: types.SimpleNamespace):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (
            inner.to_q,
            inner.to_k,
            inner.to_v,
            inner.to_out,
        )
        self.heads, self.block, self.box = inner.heads, block_key(path), box

    def forward(self, x, context=None, mask=None):
        options = self.box.options
        replace = options.get("patches_replace", {}).get("attn2", {})
        patch = replace.get((*self.block, 0), replace.get(self.block))
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if patch is None:
            return self.to_out(attention_function(q, k, v, self.heads))
        extra = {
            key: value
            for key, value in options.items()
            if key not in ("patches", "patches_replace")
        }
        extra.update(
            n_heads=self.heads, dim_head=q.shape[-1] // self.heads, block=self.block, block_index=0
        )
        return self.to_out(patch(q, k, v, extra))


class TinyForgeUNet(TinyLdmUNet):
    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.box = types.SimpleNamespace(options={})
        for path in [name for name, _ in self.named_modules() if name.endswith("attn2")]:
            parent, _, leaf = path.rpartition(".")
            owner = self.get_submodule(parent)
            setattr(owner, leaf, ForgeAttn2(getattr(owner, leaf), path, self.box))

    def forward(self, x, timesteps=None, context=None, transformer_options=None, **kwargs):
        self.box.options = {**(transformer_options or {}), "original_shape": list(x.shape)}
        try:
            return super().forward(x, timesteps, context)
        finally:
            self.box.options = {}


class Predictor:
    sigma_max, sigma_min = 10.0, 0.2

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return NO_SIGMA
        if percent >= 1.0:
            return 0.0
        return self.sigma_max + (self.sigma_min - self.sigma_max) * percent


class KModel:
    def __init__(self, unet: nn.Module):
        self.diffusion_model, self.predictor = unet, Predictor()


class UnetPatcher:
    def __init__(self, model: KModel):
        self.model = model
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = UnetPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        to = dict(self.model_options["transformer_options"])
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        key = (
            (block_name, number)
            if transformer_index is None
            else (block_name, number, transformer_index)
        )
        to["patches_replace"]["attn2"][key] = patch
        self.model_options["transformer_options"] = to


class ForgeObjects:
    def __init__(self, unet, clip=None, vae=None, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class FakeForgeModel(FakeSDModel):
    is_sdxl = False

    def __init__(self, unet: nn.Module):
        super().__init__(unet)
        self.forge_objects_original = ForgeObjects(UnetPatcher(KModel(unet)))
        self.forge_objects_after_applying_lora = self.forge_objects_original.shallow_copy()
        self.forge_objects = self.forge_objects_original.shallow_copy()


# -- the IP-Adapter -------------------------------------------------------------------------------


class IPAdapterModule(nn.Module):
    """``IPAdapter``: ``ip_layers.to_kvs["{2n+1}_to_{k,v}_ip"]`` for every attn2 layer."""

    def __init__(self, unet: nn.Module, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ip_layers = nn.Module()
        self.ip_layers.to_kvs = nn.ModuleDict()
        for layer in SD1.layers:
            channels = unet.get_submodule(layer.ldm).to_q.out_features
            for kind in ("k", "v"):
                linear = nn.Linear(CONTEXT_DIM, channels, bias=False)
                linear.weight.data = (
                    torch.randn(channels, CONTEXT_DIM, generator=gen) * CONTEXT_DIM**-0.5
                )
                self.ip_layers.to_kvs[f"{2 * layer.number + 1}_to_{kind}_ip"] = linear


class CrossAttentionPatch:
    """The adapter's attn2 replacement: text attention plus, per unit in its sigma window, the
    attention over that unit's projected image tokens times its weight."""

    def __init__(self, weight, ipadapter, number, cond, uncond, weight_type="original", mask=None,
                 sigma_start=0.0, sigma_end=1.0, unfold_batch=False):  # fmt: skip
        self.weights, self.ipadapters, self.conds, self.unconds = (
            [weight],
            [ipadapter],
            [cond],
            [uncond],
        )
        self.weight_type, self.masks = [weight_type], [mask]
        self.sigma_start, self.sigma_end, self.unfold_batch = (
            [sigma_start],
            [sigma_end],
            [unfold_batch],
        )
        self.number = number
        self.k_key, self.v_key = f"{number * 2 + 1}_to_k_ip", f"{number * 2 + 1}_to_v_ip"
        self.calls = 0

    def set_new_condition(self, weight, ipadapter, number, cond, uncond, weight_type="original",
                          mask=None, sigma_start=0.0, sigma_end=1.0, unfold_batch=False):  # fmt: skip
        for name, value in (
            ("weights", weight), ("ipadapters", ipadapter), ("conds", cond), ("unconds", uncond),
            ("weight_type", weight_type), ("masks", mask), ("sigma_start", sigma_start),
            ("sigma_end", sigma_end), ("unfold_batch", unfold_batch),
        ):  # fmt: skip
            getattr(self, name).append(value)

    def __call__(self, q, k, v, extra_options):
        self.calls += 1
        kinds = extra_options["cond_or_uncond"]
        sigma = float(extra_options["sigmas"][0]) if "sigmas" in extra_options else NO_SIGMA
        per_chunk = q.shape[0] // len(kinds)
        heads = extra_options["n_heads"]
        out = attention_function(q, k, v, heads)
        for weight, adapter, cond, uncond, mask, start, end in zip(
            self.weights, self.ipadapters, self.conds, self.unconds, self.masks,
            self.sigma_start, self.sigma_end,
        ):  # fmt: skip
            if sigma > start or sigma < end:
                continue
            if mask is not None:
                raise NotImplementedError("the fake adapter has no effective-region mask")
            to_k, to_v = (adapter.ip_layers.to_kvs[key] for key in (self.k_key, self.v_key))
            k_c, k_u = (to_k(e).repeat(per_chunk, 1, 1) for e in (cond, uncond))
            v_c, v_u = (to_v(e).repeat(per_chunk, 1, 1) for e in (cond, uncond))
            ip_k = torch.cat([(k_c, k_u)[kind] for kind in kinds])
            ip_v = torch.cat([(v_c, v_u)[kind] for kind in kinds])
            out = out + attention_function(q, ip_k.to(q.dtype), ip_v.to(q.dtype), heads) * weight
        return out.to(q.dtype)


def apply_ip_adapter(unet_patcher, kwargs: dict):
    """``IPAdapterApply.apply_ipadapter``: a clone with the patch at every SD1 attn2 block."""
    work = unet_patcher.clone()
    keys = [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)]
    for number, key in enumerate([*keys, ("middle", 0)]):
        to = work.model_options["transformer_options"]
        attn2 = to.setdefault("patches_replace", {}).setdefault("attn2", {})
        if key in attn2:
            attn2[key].set_new_condition(number=number, **kwargs)
        else:
            attn2[key] = CrossAttentionPatch(number=number, **kwargs)
    return work


class IPAdapterPatcher:
    """The integrated ControlNet's IP-Adapter model (the class name is what MONKEY looks for)."""

    def __init__(self, unet: nn.Module, seed: int, blank: bool = False):
        gen = torch.Generator().manual_seed(seed + 1000)
        self.ipadapter = IPAdapterModule(unet, seed)
        self.cond = torch.randn(1, TOKENS, CONTEXT_DIM, generator=gen)
        if blank:  # a reference whose embedding is zero: every token alike, a flat map
            self.cond = torch.zeros_like(self.cond)
        self.uncond = 0.1 * torch.randn(1, TOKENS, CONTEXT_DIM, generator=gen)
        self.strength, self.start_percent, self.end_percent = 1.0, 0.0, 1.0

    def process_before_every_sampling(self, p, cond, mask, *args, **kwargs):
        unet = p.sd_model.forge_objects.unet
        predictor = unet.model.predictor
        p.sd_model.forge_objects.unet = apply_ip_adapter(
            unet,
            {
                "weight": self.strength,
                "ipadapter": self.ipadapter,
                "cond": self.cond,
                "uncond": self.uncond,
                "mask": mask,
                "sigma_start": predictor.percent_to_sigma(self.start_percent),
                "sigma_end": predictor.percent_to_sigma(self.end_percent),
            },
        )


class OtherControlPatcher:
    """A non-IP-Adapter ControlNet unit: patches nothing MONKEY looks at."""

    def process_before_every_sampling(self, p, cond, mask, *args, **kwargs):
        pass


class Params:
    def __init__(self, model):
        self.model, self.control_cond, self.control_mask = model, None, None


class FakeForgeControlNetScript:
    """``ControlNetForForgeOfficial``: units prepared in ``process``, applied in every
    ``process_before_every_sampling``, forgotten in ``postprocess``."""

    def __init__(self, units: list[dict] | None = None):
        self.units = units if units is not None else [{"seed": 7}]
        self.current_params: dict = {}
        self.args_from = self.args_to = 0
        self.filename = "extensions-builtin/sd_forge_controlnet/scripts/controlnet.py"
        self.applied = 0

    def title(self) -> str:
        return "ControlNet"

    def process(self, p, *args):
        unet = p.sd_model.forge_objects.unet.model.diffusion_model
        self.current_params = {}
        for i, unit in enumerate(self.units):
            if unit.get("kind", "ip") == "ip":
                model = IPAdapterPatcher(unet, unit["seed"], unit.get("blank", False))
                model.strength = unit.get("weight", 1.0)
                model.start_percent, model.end_percent = (
                    unit.get("start", 0.0),
                    unit.get("end", 1.0),
                )
            else:
                model = OtherControlPatcher()
            self.current_params[i] = Params(model)

    def process_before_every_sampling(self, p, *args, **kwargs):
        for _, params in sorted(self.current_params.items()):
            params.model.process_before_every_sampling(p, params.control_cond, params.control_mask)
            self.applied += 1

    def postprocess(self, p, processed, *args):
        self.current_params = {}


# -- sampling -------------------------------------------------------------------------------------

COND, UNCOND = 0, 1


class ForgeCFGDenoiser(CFGDenoiser):
    """``CFGDenoiser.forward`` with ``sampling_function``: the denoiser callback, then the UNet in
    chunks (uncond first; cond only at CFG scale 1; one call per chunk under low memory)."""

    def __call__(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        self.on_cfg_denoiser(x, sigma, cond, uncond)
        if getattr(self.p, "forge_cfg_one", False):  # Forge's skip-early-CFG / NGMS: cfg 1
            cond_scale = 1.0
        n_sub = min(len(b) for b in cond.batch)
        to_run = [(torch.stack([b[k] for b in cond.batch]), COND) for k in range(n_sub)]
        if cond_scale != 1.0:
            to_run.append((torch.stack(uncond.rows), UNCOND))
        to_run.reverse()  # Forge batches the last runnable chunk first: uncond leads
        low_memory = getattr(self.p, "forge_low_memory", False)
        calls = [[c] for c in to_run] if low_memory else [to_run]
        patcher = self.p.sd_model.forge_objects.unet
        unet = patcher.model.diffusion_model
        outs = {COND: [], UNCOND: []}
        n = x.shape[0]
        for call in calls:
            kinds = [kind for _, kind in call]
            options = dict(patcher.model_options.get("transformer_options", {}))
            options["cond_or_uncond"] = kinds[:]
            options["sigmas"] = sigma
            options["cond_indices"] = [
                i * n + j for i, k in enumerate(kinds) if k == COND for j in range(n)
            ]
            options["uncond_indices"] = [
                i * n + j for i, k in enumerate(kinds) if k == UNCOND for j in range(n)
            ]
            x_in = torch.cat([x] * len(call))
            t = torch.cat([100.0 * sigma] * len(call))
            context = torch.cat([c for c, _ in call])
            chunks = unet(x_in, t, context=context, transformer_options=options).chunk(len(call))
            for out, kind in zip(chunks, kinds):
                outs[kind].append(out)
        cond_out = torch.stack(outs[COND]).mean(0)
        eps = (
            cond_out
            if not outs[UNCOND]
            else outs[UNCOND][0] + cond_scale * (cond_out - outs[UNCOND][0])
        )
        denoised = x - sigma[:, None, None, None] * eps
        self.sampler.last_latent = denoised
        self.step += 1
        return denoised


class ForgeSampler(Sampler):
    def __init__(self, p, config):
        super().__init__(p, config)
        self.model_wrap_cfg = ForgeCFGDenoiser(p, self)


class ForgeProcessing:
    """Forge's ``p.sample`` and hires pass: its own sampler, and ``forge_objects`` reset to the
    LoRA'd copy before ``process_before_every_sampling`` (the hires pass calls it once more
    before the reset, on the stale objects)."""

    sampler_class = ForgeSampler

    def before_every_sampling(self, hires: bool = False, **kwargs) -> None:
        if hires:
            self.scripts.process_before_every_sampling(self, **kwargs)  # on the stale objects
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        self.scripts.process_before_every_sampling(self, **kwargs)


class ForgeTxt2Img(ForgeProcessing, StableDiffusionProcessingTxt2Img):
    pass


class ForgeImg2Img(ForgeProcessing, StableDiffusionProcessingImg2Img):
    pass


def new_forge_model(seed: int = 0) -> FakeForgeModel:
    return FakeForgeModel(TinyForgeUNet(seed).eval())
