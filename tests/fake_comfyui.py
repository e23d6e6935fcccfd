"""The thin surface of ComfyUI (v0.3.64) and ComfyUI_IPAdapter_plus that MONKEY touches, in our
own words.

Kept as ComfyUI has it: ``ModelPatcher.clone`` deep-copies ``model_options`` (and names its
``parent``); a collected patcher detaches (``__del__``: ejects its injections if they are in,
moves its patches to the offload device);
``set_model_attn2_replace(patch, block_name, number, transformer_index=None)`` copies the dicts it
writes into; ``comfy.samplers.KSampler(model, steps, device, sampler, scheduler, denoise,
model_options)`` computes its ``sigmas`` (a denoise below 1 keeps the tail of a longer schedule)
and ``sample(noise, positive, negative, cfg, latent_image, start_step, last_step,
force_full_denoise, denoise_mask, sigmas, callback, disable_pbar, seed)`` cuts them at
``last_step`` (its last sigma 0 with ``force_full_denoise``) and samples with the patcher's own
``model_options``; each step runs the UNet in chunks of one prompt for every image, uncond chunk
first (cond only at cfg 1, one call per chunk under low memory), with ``transformer_options``
carrying ``cond_or_uncond``, ``sigmas``, ``sample_sigmas``; the UNet adds ``original_shape``,
``block`` (the middle block is ``("middle", 0)``), ``block_index``, ``transformer_index`` and
calls an attn2 replacement found under ``(block, id, index)`` or ``(block, id)`` with the
projected q, k, v. The progress callback (``latent_preview.prepare_callback``) updates a
``comfy.utils.ProgressBar``, whose hook raises ``InterruptProcessingException`` once an
interrupt was requested, as ComfyUI's server hook does.

IPAdapter_plus: every IPAdapter node clones the MODEL and puts an ``Attn2Replace`` (a callback
and its kwargs per unit) under each cross-attention key, appending to one it finds; SD1.5's
middle block goes under ``("middle", 1)``, which the UNet never asks for.
Everything below the surface (UNet, attention, IP-Adapter projections) is real torch.
"""

from __future__ import annotations

import copy
import math
import types
from typing import ClassVar

import torch
import torch.nn.functional as F
from fake_ldm import CONTEXT_DIM, TinyLdmUNet
from torch import nn

from monkey.layers import SD1

TOKENS = 4
NO_SIGMA = 999999999.9
COND, UNCOND = 0, 1


def optimized_attention(q, k, v, heads):
    """``comfy.ldm.modules.attention.optimized_attention``: [B, L, heads·d] in and out."""
    b, _, inner = q.shape
    q, k, v = (t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, inner)


# -- the UNet -------------------------------------------------------------------------------------


def block_of(path: str) -> tuple:
    """``input_blocks.4.1.transformer_blocks.0.attn2`` -> ``("input", 4)``; the middle block is
    ``("middle", 0)`` (``UNetModel._forward``)."""
    if path.startswith("middle_block"):
        return ("middle", 0)
    name, number = path.split(".")[:2]
    return (name.removesuffix("_blocks"), int(number))


class ComfyAttn2(nn.Module):
    """``BasicTransformerBlock``'s cross-attention step."""

    def __init__(self, inner: nn.Module, path: str, index: int, box: types.SimpleNamespace):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (
            inner.to_q,
            inner.to_k,
            inner.to_v,
            inner.to_out,
        )
        self.heads, self.block, self.index, self.box = inner.heads, block_of(path), index, box

    def forward(self, x, context=None, mask=None):
        options = self.box.options
        replace = options.get("patches_replace", {}).get("attn2", {})
        key = (*self.block, 0)
        if key not in replace:
            key = self.block
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if key not in replace:
            return self.to_out(optimized_attention(q, k, v, self.heads))
        extra = {k_: v_ for k_, v_ in options.items() if k_ not in ("patches", "patches_replace")}
        extra.update(
            n_heads=self.heads,
            dim_head=q.shape[-1] // self.heads,
            block=self.block,
            block_index=0,
            transformer_index=self.index,
        )
        return self.to_out(replace[key](q, k, v, extra))


class TinyComfyUNet(TinyLdmUNet):
    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.box = types.SimpleNamespace(options={})
        paths = [name for name, _ in self.named_modules() if name.endswith("attn2")]
        order = sorted(paths, key=lambda p: ("input", "middle", "output").index(p.split("_")[0]))
        for path in paths:
            parent, _, leaf = path.rpartition(".")
            owner = self.get_submodule(parent)
            setattr(
                owner, leaf, ComfyAttn2(getattr(owner, leaf), path, order.index(path), self.box)
            )

    def forward(self, x, timesteps=None, context=None, transformer_options=None, **kwargs):
        self.box.options = {**(transformer_options or {}), "original_shape": list(x.shape)}
        try:
            return super().forward(x, timesteps, context)
        finally:
            self.box.options = {}


class ModelSampling:
    """EPS model sampling on a log-linear sigma table."""

    sigma_max, sigma_min = 10.0, 0.1

    def sigma(self, t: float) -> float:  # t in [0, 999]
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return math.exp(lo + (hi - lo) * t / 999.0)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return NO_SIGMA
        if percent >= 1.0:
            return 0.0
        return self.sigma((1.0 - percent) * 999.0)


class LatentFormat:
    latent_channels = 4
    latent_dimensions = 2


class BaseModel:
    def __init__(self, unet: nn.Module):
        self.diffusion_model = unet
        self.model_sampling = ModelSampling()
        self.latent_format = LatentFormat()

    def process_latent_in(self, latent):
        return latent

    def process_latent_out(self, latent):
        return latent


class ModelPatcher:
    def __init__(self, model: BaseModel):
        self.model = model
        self.load_device = self.offload_device = torch.device("cpu")
        self.model_options = {"transformer_options": {}}
        self.injections: dict[str, list] = {}
        self.is_injected = False
        self.parent = None

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.injections = {key: list(value) for key, value in self.injections.items()}
        n.parent = self
        return n

    def eject_model(self):
        if not self.is_injected:
            return
        for injections in self.injections.values():
            for injection in injections:
                injection.eject(self)
        self.is_injected = False

    def model_patches_to(self, device):
        replace = self.model_options["transformer_options"].get("patches_replace", {})
        for patches in replace.values():
            for key in patches:
                if hasattr(patches[key], "to"):
                    patches[key] = patches[key].to(device)

    def detach(self, unpatch_all=True):
        self.eject_model()
        self.model_patches_to(self.offload_device)
        return self.model

    def __del__(self):
        self.detach(unpatch_all=False)

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

    def get_model_object(self, name: str):
        return getattr(self.model, name)


# -- ComfyUI_IPAdapter_plus -----------------------------------------------------------------------


class IPAdapterModel(nn.Module):
    """``IPAdapter``: ``ip_layers.to_kvs["{2n+1}_to_{k,v}_ip"]`` for every SD1 attn2 layer."""

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

    def get_multigpu_clone(self, device):
        return self


class Attn2Replace:
    """The text attention plus, for each unit inside its sigma window, its callback's output."""

    def __init__(self, callback=None, **kwargs):
        self.callback, self.kwargs, self.multigpu_kwargs = [callback], [kwargs], {}
        self.calls = 0

    def get_multigpu_kwargs(self, device):
        return self.multigpu_kwargs.get(device, self.kwargs)

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        self.calls += 1
        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"][0]) if "sigmas" in extra_options else NO_SIGMA
        for callback, kwargs in zip(self.callback, self.get_multigpu_kwargs(q.device)):
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)

    def to(self, device, *args, **kwargs):
        return self


def ipadapter_attention(out, q, k, v, extra_options, module_key="", ipadapter=None, weight=1.0,
                        cond=None, uncond=None, sigma_start=0.0, sigma_end=1.0, **kwargs):  # fmt: skip
    """The image attention of one unit ("V only" scaling, one embedding for every image)."""
    kinds = extra_options["cond_or_uncond"]
    per_chunk = q.shape[0] // len(kinds)
    to_kvs = ipadapter.ip_layers.to_kvs
    k_c, k_u = (to_kvs[module_key + "_to_k_ip"](e).repeat(per_chunk, 1, 1) for e in (cond, uncond))
    v_c, v_u = (to_kvs[module_key + "_to_v_ip"](e).repeat(per_chunk, 1, 1) for e in (cond, uncond))
    ip_k = torch.cat([(k_c, k_u)[kind] for kind in kinds])
    ip_v = torch.cat([(v_c, v_u)[kind] for kind in kinds])
    return (optimized_attention(q, ip_k, ip_v, extra_options["n_heads"]) * weight).to(q.dtype)


SD15_KEYS = (
    [("input", i) for i in (1, 2, 4, 5, 7, 8)]
    + [("output", i) for i in range(3, 12)]
    + [("middle", 1)]  # IPAdapter_plus's key for the middle block: never asked for
)


def apply_ipadapter(model: ModelPatcher, seed: int, weight: float = 1.0, start_at: float = 0.0,
                    end_at: float = 1.0) -> ModelPatcher:  # fmt: skip
    """``IPAdapterAdvanced.apply_ipadapter``: a clone with the unit's patch kwargs at every
    key, appended to an ``Attn2Replace`` already there."""
    work = model.clone()
    unet = work.model.diffusion_model
    gen = torch.Generator().manual_seed(seed + 1000)
    sampling = work.get_model_object("model_sampling")
    kwargs = {
        "ipadapter": IPAdapterModel(unet, seed),
        "weight": weight,
        "cond": torch.randn(1, TOKENS, CONTEXT_DIM, generator=gen),
        "uncond": 0.1 * torch.randn(1, TOKENS, CONTEXT_DIM, generator=gen),
        "sigma_start": sampling.percent_to_sigma(start_at),
        "sigma_end": sampling.percent_to_sigma(end_at),
    }
    for number, key in enumerate(SD15_KEYS):
        kwargs["module_key"] = str(2 * number + 1)
        to = work.model_options["transformer_options"].copy()
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        if key in to["patches_replace"]["attn2"]:
            to["patches_replace"]["attn2"][key].add(ipadapter_attention, **kwargs)
        else:
            to["patches_replace"]["attn2"][key] = Attn2Replace(ipadapter_attention, **kwargs)
            work.model_options["transformer_options"] = to
    return work


# -- sampling -------------------------------------------------------------------------------------


class Interrupts:
    """``comfy.model_management``'s interrupt flag."""

    flag = False


class InterruptProcessingException(Exception):  # noqa: N818 - ComfyUI's name
    pass


def throw_exception_if_processing_interrupted():
    if Interrupts.flag:
        Interrupts.flag = False
        raise InterruptProcessingException()


class Progress:
    """What the server's progress hook saw: (value, total) per update."""

    updates: list = []  # noqa: RUF012 - reset per test by the fixture


def progress_hook(value, total, preview, node_id=None):
    throw_exception_if_processing_interrupted()
    Progress.updates.append((value, total))


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current = total, 0

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        progress_hook(self.current, self.total, preview)


def prepare_callback(model, steps, x0_output_dict=None):
    """``latent_preview.prepare_callback`` (no previewer on the CPU)."""
    pbar = ProgressBar(steps)

    def callback(step, x0, x, total_steps):
        pbar.update_absolute(step + 1, total_steps, None)

    return callback


class Options:
    low_memory = False
    """Run the cond and uncond chunks in separate UNet calls."""


class KSampler:
    SAMPLERS: ClassVar = ["euler"]
    SCHEDULERS: ClassVar = ["normal"]

    def __init__(self, model, steps, device, sampler=None, scheduler=None, denoise=None,
                 model_options={}):  # noqa: B006 - ComfyUI's signature  # fmt: skip
        self.model, self.device = model, device
        self.sampler, self.scheduler = sampler, scheduler
        self.set_steps(steps, denoise)
        self.denoise, self.model_options = denoise, model_options

    def calculate_sigmas(self, steps):
        sampling = self.model.get_model_object("model_sampling")
        ts = [999.0 * (1 - i / max(1, steps - 1)) for i in range(steps)] if steps > 1 else [999.0]
        return torch.tensor([sampling.sigma(t) for t in ts] + [0.0])

    def set_steps(self, steps, denoise=None):
        self.steps = steps
        if denoise is None or denoise > 0.9999:
            self.sigmas = self.calculate_sigmas(steps)
        elif denoise <= 0.0:
            self.sigmas = torch.FloatTensor([])
        else:
            self.sigmas = self.calculate_sigmas(int(steps / denoise))[-(steps + 1) :]

    def sample(self, noise, positive, negative, cfg, latent_image=None, start_step=None,
               last_step=None, force_full_denoise=False, denoise_mask=None, sigmas=None,
               callback=None, disable_pbar=False, seed=None):  # fmt: skip
        if sigmas is None:
            sigmas = self.sigmas
        if last_step is not None and last_step < len(sigmas) - 1:
            sigmas = sigmas[: last_step + 1]
            if force_full_denoise:
                sigmas[-1] = 0
        return _sample(self.model, noise, positive, negative, cfg, sigmas, latent_image, callback)


def _sample(patcher, noise, positive, negative, cfg, sigmas, latent_image, callback):
    """Euler over ``sigmas`` with the patcher's own model_options (``CFGGuider``)."""
    model, options = patcher.model, patcher.model_options
    transformer = dict(options.get("transformer_options", {}))
    transformer["sample_sigmas"] = sigmas
    x = latent_image + noise * sigmas[0]
    total = len(sigmas) - 1
    for i in range(total):
        sigma = sigmas[i]
        denoised = _cfg_denoise(model, x, sigma, positive, negative, cfg, transformer)
        if callback is not None:
            callback(i, denoised, x, total)
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
    return model.process_latent_out(x)


def _cfg_denoise(model, x, sigma, positive, negative, cfg, transformer):
    """``sampling_function``: the UNet in chunks (uncond first), then CFG."""
    n = x.shape[0]
    to_run = [(COND, positive[0][0])]
    if not math.isclose(cfg, 1.0):
        to_run.append((UNCOND, negative[0][0]))
    to_run.reverse()  # ComfyUI batches the last runnable chunk first: uncond leads
    batches = [[c] for c in to_run] if Options.low_memory else [to_run]
    out = {}
    c_in = 1.0 / math.sqrt(float(sigma) ** 2 + 1.0)
    for batch in batches:
        kinds = [kind for kind, _ in batch]
        context = torch.cat([ctx.expand(n, -1, -1) for _, ctx in batch])
        sigmas = torch.full((n * len(kinds),), float(sigma))
        options = {**transformer, "cond_or_uncond": kinds, "sigmas": sigmas}
        eps = model.diffusion_model(
            torch.cat([x] * len(kinds)) * c_in,
            sigmas,
            context=context,
            transformer_options=options,
        ).chunk(len(kinds))
        for kind, e in zip(kinds, eps):
            out[kind] = x - e * sigma
    if UNCOND not in out:
        return out[COND]
    return out[UNCOND] + (out[COND] - out[UNCOND]) * cfg


def prepare_noise(latent_image, seed, noise_inds=None):
    generator = torch.manual_seed(seed)
    return torch.randn(latent_image.size(), generator=generator, dtype=latent_image.dtype)


def sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
           denoise=1.0, disable_noise=False, start_step=None, last_step=None,
           force_full_denoise=False, noise_mask=None, sigmas=None, callback=None,
           disable_pbar=False, seed=None):  # fmt: skip
    """``comfy.sample.sample``."""
    sampler = KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                       scheduler=scheduler, denoise=denoise, model_options=model.model_options)  # fmt: skip
    return sampler.sample(noise, positive, negative, cfg=cfg, latent_image=latent_image,
                          start_step=start_step, last_step=last_step,
                          force_full_denoise=force_full_denoise, denoise_mask=noise_mask,
                          sigmas=sigmas, callback=callback, disable_pbar=disable_pbar, seed=seed)  # fmt: skip


def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                    denoise=1.0, disable_noise=False, start_step=None, last_step=None,
                    force_full_denoise=False):  # fmt: skip
    """``nodes.common_ksampler``: the stock KSampler node's body."""
    latent_image = latent["samples"]
    noise = prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = prepare_callback(model, steps)
    samples = sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                     latent_image, denoise=denoise, noise_mask=latent.get("noise_mask"),
                     callback=callback, seed=seed)  # fmt: skip
    out = latent.copy()
    out["samples"] = samples
    return (out,)


class KSamplerNode:
    """``nodes.KSampler``: only its inputs matter here (their order and tooltips)."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        tip = {"tooltip": "stock"}
        return {
            "required": {
                "model": ("MODEL", tip),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, **tip}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, **tip}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, **tip}),
                "sampler_name": (KSampler.SAMPLERS, tip),
                "scheduler": (KSampler.SCHEDULERS, tip),
                "positive": ("CONDITIONING", tip),
                "negative": ("CONDITIONING", tip),
                "latent_image": ("LATENT", tip),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, **tip}),
            }
        }

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, denoise=1.0):  # fmt: skip
        return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive,
                               negative, latent_image, denoise=denoise)  # fmt: skip


def make_modules() -> dict[str, types.ModuleType]:
    """The ComfyUI modules MONKEY imports, as ``sys.modules`` entries."""

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    comfy = module("comfy")
    mods = {
        "comfy": comfy,
        "comfy.sample": module(
            "comfy.sample",
            prepare_noise=prepare_noise,
            fix_empty_latent_channels=lambda model, latent: latent,
            sample=sample,
        ),
        "comfy.samplers": module("comfy.samplers", KSampler=KSampler),
        "comfy.utils": module("comfy.utils", ProgressBar=ProgressBar, PROGRESS_BAR_ENABLED=True),
        "comfy.model_management": module(
            "comfy.model_management",
            InterruptProcessingException=InterruptProcessingException,
            throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
            intermediate_device=lambda: torch.device("cpu"),
        ),
        "latent_preview": module("latent_preview", prepare_callback=prepare_callback),
        "nodes": module("nodes", KSampler=KSamplerNode, common_ksampler=common_ksampler),
    }
    for name in ("sample", "samplers", "utils", "model_management"):
        setattr(comfy, name, mods[f"comfy.{name}"])
    return mods


def new_model(seed: int = 0) -> ModelPatcher:
    return ModelPatcher(BaseModel(TinyComfyUNet(seed)))


def conditioning(seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 5, CONTEXT_DIM, generator=gen), {}]]


def attn2_of(model: ModelPatcher) -> dict:
    return model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
