"""sd-webui-controlnet 1.1.455's IP-Adapter hooking, restated in our own words for tests.

What MONKEY relies on is kept as ControlNet has it: each attn2 ``forward`` is replaced on the
instance by a hacked forward that adds ``sum(f(self, x, q) for f in self.ipadapter_hacks)`` to the
text attention before ``to_out``; each ``f`` is a closure over the adapter (``self``), its
``number`` and ``transformer_index`` (decorated with ``@torch.no_grad()``). The closure reads the
step and ``cond_mark`` from the module-level ``current_model`` (the UNet last hooked) and returns
``0.0`` before projecting anything when the unit is outside its start/end or its weight at that
transformer group is 0 (``weight`` is a float, or a ``{transformer_index: w}`` dict where a
missing group weighs 0, as InstantStyle weight types give). Otherwise it projects the image
embedding through ``ipadapter.ip_layers.to_kvs["{2n+1}_to_{k,v}_ip"]`` via a per-generation
``cache``. ``p.sample`` is replaced by ``process_sample``, which marks cond/uncond prompts; the
UNet forward reads the marks into ``cond_mark``. ``postprocess`` clears every hack.
"""

from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F
from fake_ldm import CONTEXT_DIM

from monkey.layers import SD1

TOKENS = 4
MARK = 1024.0

current_model = None  # ControlNet keeps the hooked UNet in a module global; so do we


def style_transfer_sd1(weight: float = 1.0) -> dict[int, float]:
    """InstantStyle's SD1 "style transfer": only input groups 0-3 and output groups 9-15 weigh,
    so the paper's layer (``output_blocks.4.1``, group 8) gets weight 0."""
    return dict.fromkeys([*range(4), *range(9, 16)], weight)


def attention_with_ip_hacks(attn, x, context=None):
    """The hacked attn2 forward before ``to_out``: text attention plus every IP hack's output."""
    b, _, inner = x.shape
    heads = attn.heads
    context = x if context is None else context
    q, k, v = (
        t.view(b, -1, heads, inner // heads).transpose(1, 2)
        for t in (attn.to_q(x), attn.to_k(context), attn.to_v(context))
    )
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, inner)
    for f in attn.ipadapter_hacks:
        out = out + f(attn, x, q)
    return out


def hacked_attn_forward(self, x, context=None, **kwargs):
    return self.to_out(attention_with_ip_hacks(self, x, context))


def ip_hack(self, number: int, transformer_index: int):
    """``PlugableIPAdapter.patch_forward``: the closure ControlNet puts in ``ipadapter_hacks``.

    ``self`` is the adapter (it says the weight now, 0 outside start/end, and the image
    embedding for the current rows); its free variables are named as ControlNet's are, since
    that is how MONKEY finds the adapter, layer and weight group behind an entry."""

    @torch.no_grad()  # as ControlNet does: the list holds a functools.wraps wrapper
    def forward(attn_blk, x, q):
        b, _, inner = x.shape
        heads = attn_blk.heads
        weight = self.weight_now(transformer_index)
        if weight == 0.0:
            return 0.0  # before any projection: a skipped layer leaves no cache entry
        emb = self.embedding()
        k = self.call_ip(f"{number * 2 + 1}_to_k_ip", emb, q.device)
        v = self.call_ip(f"{number * 2 + 1}_to_v_ip", emb, q.device)
        k, v = (t.view(b, -1, heads, inner // heads).transpose(1, 2).to(q) for t in (k, v))
        ip_out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, inner)
        return ip_out * weight

    return forward


class ImageEmbed:
    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor):
        self.cond, self.uncond = cond, uncond  # [1, T, C]

    def eval(self, cond_mark: torch.Tensor) -> torch.Tensor:
        m = cond_mark[:, :, 0, 0][:, :, None].to(self.cond)  # [B, 1, 1]
        return self.cond * m + self.uncond * (1 - m)


class FakeIPAdapterModel(torch.nn.Module):
    """``IPAdapterModel``: its ``ip_layers.to_kvs`` hold the IP key/value projections."""

    def __init__(self):
        super().__init__()
        self.ip_layers = torch.nn.Module()
        self.ip_layers.to_kvs = torch.nn.ModuleDict()
        self.is_pulid = False


class FakeIPAdapter(torch.nn.Module):
    """The parts of ``PlugableIPAdapter`` that the closures use."""

    def __init__(
        self,
        unet: torch.nn.Module,
        seed: int,
        weight: float | dict[int, float] = 1.0,
        start: float = 0.0,
        end: float = 1.0,
        blank: bool = False,
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ipadapter = FakeIPAdapterModel()
        to_kvs = self.ipadapter.ip_layers.to_kvs
        for layer in SD1.layers:
            channels = unet.get_submodule(layer.ldm).to_q.out_features
            for kind in ("k", "v"):
                linear = torch.nn.Linear(CONTEXT_DIM, channels, bias=False)
                linear.weight.data = (
                    torch.randn(channels, CONTEXT_DIM, generator=gen) * CONTEXT_DIM**-0.5
                )
                to_kvs[f"{2 * layer.number + 1}_to_{kind}_ip"] = linear
        proj = torch.randn(TOKENS * CONTEXT_DIM, 8, generator=gen) * 0.35
        image = torch.randn(8, generator=gen)
        cond = (proj @ image).view(1, TOKENS, CONTEXT_DIM)
        if blank:  # a reference whose embedding is zero: every token alike, a flat map
            cond = torch.zeros_like(cond)
        self.image_emb = ImageEmbed(cond, torch.zeros(1, TOKENS, CONTEXT_DIM))
        self.weight, self.p_start, self.p_end = weight, start, end
        self.cache: dict = {}

    def weight_on_transformer(self, transformer_index: int) -> float:
        if isinstance(self.weight, dict):
            return self.weight.get(transformer_index, 0.0)
        return self.weight

    def call_ip(self, key: str, feat: torch.Tensor, device) -> torch.Tensor:
        if key not in self.cache:
            self.cache[key] = self.ipadapter.ip_layers.to_kvs[key](feat).to(device)
        return self.cache[key]

    def weight_now(self, transformer_index: int) -> float:
        percent = getattr(current_model, "current_sampling_percent", 0.5)
        if percent < self.p_start or percent > self.p_end:
            return 0.0
        return self.weight_on_transformer(transformer_index)

    def embedding(self) -> torch.Tensor:
        return self.image_emb.eval(current_model.cond_mark)

    def hook(self, unet: torch.nn.Module) -> None:
        global current_model
        current_model = unet
        self.cache = {}
        for number, layer in enumerate(itertools.chain(SD1.layers)):
            module = unet.get_submodule(layer.ldm)
            if not getattr(module, "ipadapter_hacks", None):
                module.ipadapter_hacks = []
                module._cn_original_forward = module.forward
                module.forward = hacked_attn_forward.__get__(module)
            module.ipadapter_hacks.append(ip_hack(self, number, layer.transformer_index))


def mark(conds, positive: bool) -> None:
    if conds is not None and hasattr(conds, "mark"):
        conds.mark = MARK if positive else -MARK


class FakeControlNetScript:
    """The ControlNet AlwaysOn script: hooks in ``process``, unhooks in ``postprocess``."""

    def __init__(self, units: list[dict] | None = None):
        self.units = units if units is not None else [{"seed": 7}]
        self.adapters: list[FakeIPAdapter] = []
        self.process_sample_calls = 0
        self.args_from = self.args_to = 0
        self.filename = "sd-webui-controlnet/scripts/controlnet.py"

    def title(self) -> str:
        return "ControlNet"

    def process(self, p, *args):
        unet = p.sd_model.model.diffusion_model
        self.adapters = [FakeIPAdapter(unet, **unit) for unit in self.units]
        for adapter in self.adapters:
            adapter.hook(unet)
        if self.adapters:
            self._hook_unet(unet)
            sys.modules["modules.script_callbacks"].on_cfg_denoiser(self.guidance_schedule_handler)
            if getattr(p, "sample_before_CN_hack", None) is None:
                p.sample_before_CN_hack = p.sample

            def process_sample(*args, **kwargs):
                self.process_sample_calls += 1
                mark(kwargs.get("conditioning"), True)
                mark(kwargs.get("unconditional_conditioning"), False)
                return p.sample_before_CN_hack(*args, **kwargs)

            p.sample = process_sample

    def _hook_unet(self, unet) -> None:
        original = unet.forward

        def forward_webui(x, timesteps=None, context=None, **kwargs):
            first = context[:, 0, :]
            if torch.all(first.abs() == MARK):
                unet.cond_mark = (first[:, 0] > 0).float()[:, None, None, None]
                context = context[:, 1:, :]
            else:  # unmarked prompts: ControlNet's fallback treats every row as cond
                unet.cond_mark = torch.ones(x.shape[0], 1, 1, 1)
            return original(x, timesteps=timesteps, context=context, **kwargs)

        unet._cn_saved_forward = original
        unet.forward = forward_webui

    def guidance_schedule_handler(self, params) -> None:
        unet = params.denoiser.p.sd_model.model.diffusion_model
        unet.current_sampling_percent = params.sampling_step / max(1, params.total_sampling_steps)

    def postprocess(self, p, processed, *args):
        unet = p.sd_model.model.diffusion_model
        for module in unet.modules():
            if hasattr(module, "_cn_original_forward"):
                module.forward = module._cn_original_forward
                del module._cn_original_forward
                module.ipadapter_hacks = []
        if hasattr(unet, "_cn_saved_forward"):
            unet.forward = unet._cn_saved_forward
            del unet._cn_saved_forward
        sys.modules["modules.script_callbacks"].remove_callbacks_for_function(
            self.guidance_schedule_handler
        )
