"""The thin ``modules.*`` surface of AUTOMATIC1111 v1.10.1 that MONKEY touches, in our own words.

Names and signatures follow the WebUI's source; behaviour is reduced to what matters here: the
order of script hooks inside ``process_images``, the stateful ``ImageRNG``, ``p.sample`` (with
hires fix), a CFG denoiser that stacks cond rows then uncond rows and fires ``on_cfg_denoiser``,
``launch_sampling`` catching ``InterruptedException``, and infotext built from
``extra_generation_params``. Everything below it (the UNet, ControlNet's IP-Adapter attention)
is real torch.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import re
import sys
import types
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fake_controlnet import FakeControlNetScript
from fake_ldm import CONTEXT_DIM, TinyLdmUNet
from PIL import Image

# -- gradio ---------------------------------------------------------------------------------------


class Component:
    def __init__(self, *args, value=None, label=None, elem_id=None, **kwargs):
        if args and value is None and type(self).takes_value_first:
            value = args[0]
        self.args, self.value, self.label, self.elem_id, self.kwargs = (
            args,
            value,
            label,
            elem_id,
            kwargs,
        )

    takes_value_first = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def change(self, *args, **kwargs):
        self.__dict__.setdefault("changes", []).append((args, kwargs))

    def click(self, *args, **kwargs):
        self.__dict__.setdefault("clicks", []).append((args, kwargs))


class Slider(Component):
    takes_value_first = False

    def __init__(self, minimum=0, maximum=100, value=None, step=None, **kwargs):
        super().__init__(value=value, **kwargs)
        self.minimum, self.maximum, self.step = minimum, maximum, step


class Dropdown(Component):
    takes_value_first = False

    def __init__(self, choices=None, value=None, **kwargs):
        super().__init__(value=value, **kwargs)
        self.choices = choices


class Radio(Dropdown):
    pass


def make_gradio() -> types.ModuleType:
    gr = types.ModuleType("gradio")
    gr.Slider, gr.Dropdown, gr.Radio = Slider, Dropdown, Radio
    for name in (
        "Checkbox",
        "Textbox",
        "Number",
        "HTML",
        "Row",
        "Column",
        "Accordion",
        "Group",
        "Blocks",
        "Image",
        "Button",
    ):
        setattr(gr, name, type(name, (Component,), {}))
    gr.update = lambda **kwargs: {"__type__": "update", **kwargs}
    return gr


# -- shared state ---------------------------------------------------------------------------------


class Options:
    def __init__(self):
        object.__setattr__(self, "data", {"batch_cond_uncond": True})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value


@dataclass
class OptionInfo:
    default: Any = None
    label: str = ""
    component: Any = None
    component_args: Any = None
    onchange: Any = None
    section: Any = None
    refresh: Any = None


class State:
    def __init__(self):
        self.reset()

    def reset(self):
        self.interrupted = self.skipped = self.stopping_generation = False
        self.job_count, self.job_no = -1, 0
        self.sampling_step, self.sampling_steps = 0, 0
        self.textinfo = None
        self.textinfos: list[str] = []

    def __setattr__(self, key, value):
        if key == "textinfo" and value:
            self.__dict__.setdefault("textinfos", []).append(value)
        super().__setattr__(key, value)

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0


class TotalTQDM:
    def __init__(self):
        self._tqdm = None

    def update(self):
        pass

    def updateTotal(self, new_total):  # noqa: N802 - the WebUI's name
        self.totals = [*getattr(self, "totals", []), new_total]


# -- callbacks ------------------------------------------------------------------------------------


@dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = "unnamed"


class CFGDenoiserParams:
    def __init__(
        self,
        x,
        image_cond,
        sigma,
        sampling_step,
        total_sampling_steps,
        text_cond,
        text_uncond,
        denoiser=None,
    ):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


def make_script_callbacks(errors: list) -> types.ModuleType:
    sc = types.ModuleType("modules.script_callbacks")
    categories = ("cfg_denoiser", "ui_settings", "before_ui", "app_started", "script_unloaded")
    sc.callback_map = {f"callbacks_{c}": [] for c in categories}
    sc.CFGDenoiserParams = CFGDenoiserParams

    def adder(category):
        def add(callback, *, name=None):
            sc.callback_map[f"callbacks_{category}"].append(
                ScriptCallback("test", callback, name or "unnamed")
            )

        return add

    for category in categories:
        setattr(sc, f"on_{category}", adder(category))

    def remove_callbacks_for_function(callback_func):
        for callbacks in sc.callback_map.values():
            for entry in [cb for cb in callbacks if cb.callback == callback_func]:
                callbacks.remove(entry)

    def cfg_denoiser_callback(params):
        for c in list(sc.callback_map["callbacks_cfg_denoiser"]):
            try:
                c.callback(params)
            except Exception as error:  # like report_exception: logged, sampling goes on
                errors.append(error)

    def fire(category, *args):
        for c in list(sc.callback_map[f"callbacks_{category}"]):
            c.callback(*args)

    sc.remove_callbacks_for_function = remove_callbacks_for_function
    sc.cfg_denoiser_callback = cfg_denoiser_callback
    sc.fire = fire
    return sc


class InterruptedException(BaseException):
    pass


# -- rng ------------------------------------------------------------------------------------------


class ImageRNG:
    """Stateful: the first ``next()`` gives each seed's noise; later calls give new noise."""

    def __init__(
        self,
        shape,
        seeds,
        subseeds=None,
        subseed_strength=0.0,
        seed_resize_from_h=0,
        seed_resize_from_w=0,
    ):
        self.shape = tuple(shape)
        self.seeds, self.subseeds, self.subseed_strength = seeds, subseeds, subseed_strength
        self.seed_resize_from_h, self.seed_resize_from_w = seed_resize_from_h, seed_resize_from_w
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.is_first = True

    def next(self):
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        if self.is_first and self.subseeds is not None and self.subseed_strength != 0:
            # a variation seed blends its own noise into the first draw only (the real slerps)
            sub = [
                torch.randn(self.shape, generator=torch.Generator().manual_seed(int(s)))
                for s in self.subseeds
            ]
            noise = torch.lerp(noise, torch.stack(sub), self.subseed_strength)
        self.is_first = False
        return noise


# -- conditioning, sampler ------------------------------------------------------------------------


class MulticondLearnedConditioning:
    def __init__(self, batch: list[list[torch.Tensor]]):
        self.batch = batch  # per image: one [L, C] tensor per AND sub-prompt
        self.mark = 0.0


class Uncond:
    def __init__(self, rows: list[torch.Tensor]):
        self.rows = rows
        self.mark = 0.0


def _context(rows: list[torch.Tensor], mark: float) -> torch.Tensor:
    tensor = torch.stack(rows)
    if mark:
        tensor = torch.cat([torch.full_like(tensor[:, :1], mark), tensor], dim=1)
    return tensor


class CFGDenoiser:
    """``forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)`` as in the WebUI:
    ``sigma`` is the per-image noise level; rows are cond (per AND sub-prompt) then uncond."""

    def __init__(self, p, sampler):
        self.p, self.sampler = p, sampler
        self.step, self.steps, self.total_steps = 0, None, None

    def on_cfg_denoiser(self, x_in, sigma_in, cond, uncond) -> CFGDenoiserParams:
        """The interrupt check and ``on_cfg_denoiser`` callbacks that open every denoiser call."""
        state = sys.modules["modules.shared"].state
        if state.interrupted or state.skipped:
            raise InterruptedException
        tensor = _context([row for rows in cond.batch for row in rows], cond.mark)
        uncond_t = _context(uncond.rows, uncond.mark)
        params = CFGDenoiserParams(
            x_in, None, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond_t, self
        )
        sys.modules["modules.script_callbacks"].cfg_denoiser_callback(params)
        return params

    def __call__(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        repeats = [len(b) for b in cond.batch]
        x_in = torch.cat([torch.stack([x[i]] * n) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i]] * n) for i, n in enumerate(repeats)] + [sigma])
        params = self.on_cfg_denoiser(x_in, sigma_in, cond, uncond)
        x_in, tensor, uncond_t = params.x, params.text_cond, params.text_uncond
        context = torch.cat([tensor, uncond_t])
        unet = self.p.sd_model.model.diffusion_model
        t = 100.0 * sigma_in
        opts = sys.modules["modules.shared"].opts
        if opts.batch_cond_uncond:
            x_out = unet(x_in, t, context=context)
        else:
            size = len(repeats)
            x_out = torch.cat(
                [
                    unet(x_in[a : a + size], t[a : a + size], context=context[a : a + size])
                    for a in range(0, x_in.shape[0], size)
                ]
            )
        n_cond = sum(repeats)
        cond_out, uncond_out = x_out[:n_cond], x_out[n_cond:]
        starts = np.cumsum([0, *repeats])
        cond_mean = torch.stack(
            [cond_out[starts[i] : starts[i + 1]].mean(0) for i in range(len(repeats))]
        )
        eps = uncond_out + cond_scale * (cond_mean - uncond_out)
        denoised = x - sigma[:, None, None, None] * eps
        self.sampler.last_latent = denoised
        self.step += 1
        return denoised


# -- samplers: k-diffusion's loops, reduced to how often and at which sigma they call the model --


_HIJACK: dict[str, Any] = {"p": None}
"""``k_diffusion.sampling.torch = TorchHijack(p)``: ancestral noise comes from ``p.rng``."""


def _ancestral(x, denoised, sigma, sigma_next):
    sigma_up = min(sigma_next, (sigma_next**2 * 0.25) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    x = x + (x - denoised) / sigma * (sigma_down - sigma)
    if sigma_next > 0:
        x = x + _HIJACK["p"].rng.next() * sigma_up  # TorchHijack: randn_like -> p.rng.next()
    return x


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma * s_in, **extra_args)
        callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        x = _ancestral(x, denoised, sigma, sigma_next)
    return x


def _second_order(model, x, sigmas, extra_args, callback, second, combine):
    """k-diffusion's two-evaluation steps: the step's callback comes after the first evaluation;
    the second runs at ``second(sigma, sigma_next)``; the last step (to sigma 0) is Euler's."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - model(x, sigma * s_in, **extra_args)) / sigma
        callback({"x": x, "i": i, "sigma": sigmas[i]})
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
            continue
        at = second(sigma, sigma_next)
        x_2 = x + d * (at - sigma)
        d_2 = (x_2 - model(x_2, at * s_in, **extra_args)) / at
        x = x + combine(d, d_2) * (sigma_next - sigma)
    return x


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Second evaluation at the *next* step's sigma."""
    return _second_order(
        model, x, sigmas, extra_args, callback, lambda _s, nxt: nxt, lambda d, d2: (d + d2) / 2
    )


def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Second evaluation at the geometric midpoint of the step."""
    return _second_order(
        model, x, sigmas, extra_args, callback, lambda s, nxt: (s * nxt) ** 0.5, lambda _d, d2: d2
    )


def sample_dpm_adaptive(
    model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None
):
    """No schedule handed in; calls the model at its own, unevenly spaced sigmas, 25 times, and
    reports an accepted step (ControlNet's guidance clock) every sixth call."""
    s_in = x.new_ones([x.shape[0]])
    levels = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), 25)).tolist()
    for i, (sigma, sigma_next) in enumerate(zip(levels, [*levels[1:], 0.0])):
        denoised = model(x, sigma * s_in, **extra_args)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
        if i % 6 == 5:
            callback({"x": x, "i": i // 6, "sigma": sigma, "denoised": denoised})
    return x


@dataclass
class SamplerData:
    name: str
    funcname: str
    options: dict = field(default_factory=dict)

    def total_steps(self, steps):
        return steps * 2 if self.options.get("second_order") else steps


SAMPLERS = {
    data.name: data
    for data in (
        SamplerData("Euler a", "sample_euler_ancestral"),
        SamplerData("Heun", "sample_heun", {"second_order": True}),
        SamplerData("DPM2", "sample_dpm_2", {"second_order": True}),
        SamplerData("DPM adaptive", "sample_dpm_adaptive"),
    )
}


class Sampler:
    """``KDiffusionSampler``: the schedule is handed to ``self.func`` as keyword arguments."""

    def __init__(self, p, config: SamplerData):
        self.p, self.config = p, config
        self.funcname = config.funcname
        self.func = globals()[config.funcname]
        self.model_wrap_cfg = CFGDenoiser(p, self)
        self.last_latent = None
        self.stop_at = None

    def callback_state(self, d):
        state = sys.modules["modules.shared"].state
        if self.stop_at is not None and d["i"] > self.stop_at:
            raise InterruptedException
        state.sampling_step = d["i"]

    def launch_sampling(self, steps, func):
        state = sys.modules["modules.shared"].state
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        self.model_wrap_cfg.step = 0
        _HIJACK["p"] = self.p
        state.sampling_steps, state.sampling_step = steps, 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def get_sigmas(self, p, steps):
        return torch.cat([torch.linspace(10.0, 0.2, steps), torch.zeros(1)])

    def _launch(self, p, x, sigmas, cond, uncond):
        extra_args = {"cond": cond, "uncond": uncond, "cond_scale": p.cfg_scale}
        kwargs = {"extra_args": extra_args, "disable": False, "callback": self.callback_state}
        parameters = inspect.signature(self.func).parameters
        if "sigmas" in parameters:
            kwargs["sigmas"] = sigmas
        else:
            kwargs["sigma_min"], kwargs["sigma_max"] = float(sigmas[-2]), float(sigmas[0])
        return self.launch_sampling(
            len(sigmas) - 1, lambda: self.func(self.model_wrap_cfg, x, **kwargs)
        )

    def sample(self, p, x, conditioning, unconditional_conditioning, image_conditioning=None):
        sigmas = self.get_sigmas(p, p.steps)
        return self._launch(p, x * sigmas[0], sigmas, conditioning, unconditional_conditioning)

    def sample_img2img(
        self,
        p,
        x,
        noise,
        conditioning,
        unconditional_conditioning,
        image_conditioning=None,
        steps=None,
    ):
        # setup_img2img_steps: steps handed in (the hires pass) run all of them, at the end of a
        # longer schedule; otherwise the denoising strength's share of p.steps runs
        if steps is not None:
            requested, steps = steps, int(steps / min(p.denoising_strength, 0.999))
            t_enc = requested - 1
        else:
            steps = p.steps
            t_enc = int(min(p.denoising_strength, 0.999) * steps)
        sigma_sched = self.get_sigmas(p, steps)[steps - t_enc - 1 :]
        return self._launch(
            p, x + noise * sigma_sched[0], sigma_sched, conditioning, unconditional_conditioning
        )


# -- the model, processing ------------------------------------------------------------------------


class FakeSDModel:
    latent_channels = 4
    cond_stage_key = "txt"

    def __init__(self, unet: torch.nn.Module):
        self.model = types.SimpleNamespace(diffusion_model=unet)

    def decode_first_stage(self, latent: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.interpolate(latent[:, :3], scale_factor=8, mode="nearest"))


def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):
    return list(model.decode_first_stage(batch))


class Processed:
    def __init__(
        self,
        p,
        images_list,
        seed=-1,
        info="",
        subseed=None,
        all_prompts=None,
        all_negative_prompts=None,
        all_seeds=None,
        all_subseeds=None,
        index_of_first_image=0,
        infotexts=None,
        comments="",
    ):
        self.images = images_list
        self.infotexts = infotexts or [info] * len(images_list)
        self.index_of_first_image = index_of_first_image
        self.extra_generation_params = p.extra_generation_params
        self.comments = "".join(f"{comment}\n" for comment in p.comments)

    def js(self):
        return json.dumps(
            {"extra_generation_params": self.extra_generation_params}, default=lambda o: None
        )


def quote(text):
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def create_infotext(
    p,
    all_prompts,
    all_seeds,
    all_subseeds,
    comments=None,
    iteration=0,
    position_in_batch=0,
    use_main_prompt=False,
    index=None,
    all_negative_prompts=None,
):
    if index is None:
        index = position_in_batch + iteration * p.batch_size
    generation_params = {
        "Steps": p.steps,
        "Seed": all_seeds[index],
        "Size": f"{p.width}x{p.height}",
        **p.extra_generation_params,
    }
    for key, value in list(generation_params.items()):
        if isinstance(value, list):
            generation_params[key] = value[index]
        elif callable(value):
            generation_params[key] = value(**locals())
    text = ", ".join(f"{k}: {quote(v)}" for k, v in generation_params.items() if v is not None)
    return f"{all_prompts[index]}\n{text}"


RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_generation_parameters(text: str) -> dict:
    *_, last = text.strip().split("\n")
    result = {}
    for key, value in RE_PARAM.findall(last):
        if value and value[0] == '"' and value[-1] == '"':
            value = json.loads(value)
        result[key] = value
    return result


DEFAULT_PROMPT = "a dog on the beach"


@dataclass
class ExtraNetworkParams:
    items: list


LORA = re.compile(r"<lora:([^:>]+):([0-9.]+)>")


def activate_networks(p) -> None:
    """``extra_networks.activate``: a ``<lora:name:w>`` scales some UNet weights (once per
    model: the Lora extension leaves them applied) and the text encoder's output."""
    unet = p.sd_model.model.diffusion_model
    for params in p.extra_network_data.get("lora", []):
        weight = float(params.items[1])
        p.te_multiplier += weight
        if getattr(unet, "_fake_lora", None) != params.items:
            with torch.no_grad():
                for parameter in list(unet.parameters())[:4]:
                    parameter.mul_(1 + 0.05 * weight)
            unet._fake_lora = list(params.items)


class StableDiffusionProcessingTxt2Img:
    sampler_class = Sampler

    def __init__(
        self,
        *,
        sd_model,
        scripts,
        script_args,
        prompt=DEFAULT_PROMPT,
        negative_prompt="",
        seed=1,
        subseed=-1,
        subseed_strength=0.0,
        batch_size=1,
        n_iter=1,
        steps=8,
        width=64,
        height=64,
        cfg_scale=4.0,
        sampler_name="Euler a",
        enable_hr=False,
        hr_scale=2.0,
        denoising_strength=0.6,
        and_prompts=1,
        outpath_samples="outputs",
    ):
        self.sd_model, self.scripts, self.script_args = sd_model, scripts, script_args
        self.prompt, self.seed, self.batch_size, self.n_iter, self.steps = (
            prompt,
            seed,
            batch_size,
            n_iter,
            steps,
        )
        self.width, self.height, self.cfg_scale = width, height, cfg_scale
        self.sampler_name, self.hr_sampler_name = sampler_name, sampler_name
        self.hr_second_pass_steps = 0
        self.enable_hr, self.hr_scale, self.denoising_strength = (
            enable_hr,
            hr_scale,
            denoising_strength,
        )
        self.and_prompts = and_prompts
        self.negative_prompt = negative_prompt
        self.extra_network_data: dict = {}
        self.te_multiplier = 0.0
        self.extra_generation_params, self.comments = {}, {}
        self.subseed, self.subseed_strength = subseed, subseed_strength
        self.seed_resize_from_h, self.seed_resize_from_w = 0, 0
        self.firstpass_image, self.refiner_checkpoint, self.is_hr_pass = None, None, False
        self.iteration, self.outpath_samples, self.do_not_save_samples = 0, outpath_samples, False
        self.is_api = False  # the API's txt2img/img2img routes set it
        self.sampler = None
        self.latents: list[torch.Tensor] = []

    def comment(self, text):
        self.comments[text] = 1

    def save_samples(self):
        return not self.do_not_save_samples

    def setup_conds(self):
        def encode(prompt):  # each prompt its own tensor; the default one as it always was
            seed = 99 if prompt == DEFAULT_PROMPT else zlib.crc32(prompt.encode())
            text = torch.randn(5, CONTEXT_DIM, generator=torch.Generator().manual_seed(seed))
            return text * (1 + 0.01 * self.te_multiplier)  # a LoRA's text-encoder part

        self.c = MulticondLearnedConditioning(
            [[encode(prompt) + 0.1 * k for k in range(self.and_prompts)] for prompt in self.prompts]
        )
        negative = encode(self.negative_prompt) if self.negative_prompt else None
        self.uc = Uncond(
            [torch.zeros(5, CONTEXT_DIM) if negative is None else negative for _ in self.prompts]
        )
        self.hr_c, self.hr_uc = self.c, self.uc

    def sample(
        self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts
    ):
        self.sampler = self.sampler_class(self, SAMPLERS[self.sampler_name])
        x = self.rng.next()
        self.before_every_sampling(x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning)
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples)

    def sample_hr_pass(self, samples):
        state = sys.modules["modules.shared"].state
        if state.interrupted:
            return samples
        self.is_hr_pass = True
        upscaled = F.interpolate(samples, scale_factor=self.hr_scale, mode="nearest")
        self.sampler = self.sampler_class(self, SAMPLERS[self.hr_sampler_name])
        state.nextjob()
        self.rng = ImageRNG(
            upscaled.shape[1:],
            self.seeds,
            subseeds=self.subseeds,
            subseed_strength=self.subseed_strength,
        )
        noise = self.rng.next()
        self.before_every_sampling(hires=True, x=upscaled, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self.sampler.sample_img2img(
            self,
            upscaled,
            noise,
            self.hr_c,
            self.hr_uc,
            steps=self.hr_second_pass_steps or self.steps,
        )
        self.is_hr_pass = False
        return samples

    def before_every_sampling(self, hires: bool = False, **kwargs) -> None:
        """``scripts.process_before_every_sampling`` where ``sample``/``sample_hr_pass`` call it."""
        self.scripts.process_before_every_sampling(self, **kwargs)


class StableDiffusionProcessingImg2Img(StableDiffusionProcessingTxt2Img):
    def __init__(self, *, init_latent: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.init_latent = init_latent
        del self.enable_hr
        self.sampler = self.sampler_class(
            self, SAMPLERS[self.sampler_name]
        )  # p.init(): one for all

    def sample(
        self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts
    ):
        x = self.rng.next()
        self.before_every_sampling(
            x=self.init_latent, noise=x, c=conditioning, uc=unconditional_conditioning
        )
        return self.sampler.sample_img2img(
            self, self.init_latent, x, conditioning, unconditional_conditioning
        )


def process_images(p) -> Processed:
    """``process_images_inner``: the order of script hooks, per-batch rng, sampling, infotext."""
    state = sys.modules["modules.shared"].state
    images_module = sys.modules["modules.images"]
    total = p.n_iter * p.batch_size
    p.all_seeds = [p.seed + i for i in range(total)]
    # as process_images_inner: subseed -1 (the API's default) draws a new variation seed per
    # call, which changes nothing in the image while subseed_strength is 0
    subseed = random.randrange(2**32) if p.subseed == -1 else p.subseed
    p.all_subseeds = [subseed + i for i in range(total)]
    p.extra_network_data = {
        "lora": [ExtraNetworkParams([name, w]) for name, w in LORA.findall(p.prompt)]
    }
    p.all_prompts = [LORA.sub("", p.prompt).strip()] * total
    p.scripts.process(p)
    if state.job_count == -1:
        state.job_count = p.n_iter * (2 if getattr(p, "enable_hr", False) else 1)
    output_images, infotexts = [], []
    for n in range(p.n_iter):
        p.iteration = n
        if state.skipped:
            state.skipped = False
        if state.interrupted:
            break
        p.prompts = p.all_prompts[n * p.batch_size : (n + 1) * p.batch_size]
        p.seeds = p.all_seeds[n * p.batch_size : (n + 1) * p.batch_size]
        p.subseeds = p.all_subseeds[n * p.batch_size : (n + 1) * p.batch_size]
        p.rng = ImageRNG(
            (4, p.height // 8, p.width // 8),
            p.seeds,
            subseeds=p.subseeds,
            subseed_strength=p.subseed_strength,
            seed_resize_from_h=p.seed_resize_from_h,
            seed_resize_from_w=p.seed_resize_from_w,
        )
        p.scripts.before_process_batch(
            p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds
        )
        p.te_multiplier = 0.0
        activate_networks(p)
        p.scripts.process_batch(
            p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds
        )
        p.setup_conds()
        with torch.no_grad():
            samples = p.sample(
                conditioning=p.c,
                unconditional_conditioning=p.uc,
                seeds=p.seeds,
                subseeds=p.subseeds,
                subseed_strength=p.subseed_strength,
                prompts=p.prompts,
            )
            p.latents.append(samples)
            decoded = decode_latent_batch(p.sd_model, samples)
        for i, x in enumerate(decoded):
            array = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            image = Image.fromarray(array)
            text = create_infotext(p, p.prompts, p.seeds, p.subseeds, index=i)
            if p.save_samples():
                images_module.save_image(
                    image, p.outpath_samples, "", p.seeds[i], p.prompts[i], "png", info=text, p=p
                )
            infotexts.append(text)
            output_images.append(image)
        state.nextjob()
    processed = Processed(p, output_images, infotexts=infotexts)
    p.scripts.postprocess(p, processed)
    return processed


# -- scripts --------------------------------------------------------------------------------------


class Script:
    filename = None
    args_from = args_to = None
    infotext_fields = None
    paste_field_names = None
    is_txt2img = False
    is_img2img = False

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def elem_id(self, item_id):
        tabname = ("img2img" if self.is_img2img else "txt2img") + "_"
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"


AlwaysVisible = object()


class ScriptRunner:
    """Calls each AlwaysOn script's hooks with its slice of ``p.script_args``; errors are logged
    (``errors.report``) and the generation goes on, as in the WebUI."""

    def __init__(self, scripts: list, errors: list):
        self.alwayson_scripts = scripts
        self.errors = errors

    def _run(self, hook: str, p, *args, **kwargs):
        for script in self.alwayson_scripts:
            method = getattr(script, hook, None)
            if method is None:
                continue
            try:
                method(p, *args, *p.script_args[script.args_from : script.args_to], **kwargs)
            except Exception as error:
                self.errors.append(error)

    def process(self, p):
        self._run("process", p)

    def before_process_batch(self, p, **kwargs):
        self._run("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._run("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._run("process_before_every_sampling", p, **kwargs)

    def postprocess(self, p, processed):
        self._run("postprocess", p, processed)


@dataclass
class WebUI:
    """What the ``webui`` fixture hands a test."""

    modules: dict[str, types.ModuleType]
    errors: list = field(default_factory=list)
    saved: list = field(default_factory=list)

    def __getattr__(self, item):
        return self.modules[f"modules.{item}"]

    @property
    def state(self) -> State:
        return self.modules["modules.shared"].state

    @property
    def callbacks(self):
        return self.modules["modules.script_callbacks"].callback_map


def make_modules(errors: list, saved: list) -> dict[str, types.ModuleType]:
    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    gr = make_gradio()

    class InputAccordion(gr.Checkbox):
        def __init__(self, value, **kwargs):
            super().__init__(value, **kwargs)
            self.accordion = gr.Accordion(label=kwargs.get("label"), open=value)

        def extra(self):
            return gr.Column()

    def save_image(
        image,
        path,
        basename,
        seed=None,
        prompt=None,
        extension="png",
        info=None,
        short_filename=False,
        no_prompt=False,
        grid=False,
        pnginfo_section_name="parameters",
        p=None,
        existing_info=None,
        forced_filename=None,
        suffix="",
        save_to_dirs=None,
    ):
        if info is not None and image.mode not in ("RGB", "RGBA"):  # Forge's stealth pnginfo
            raise ValueError(f"not enough values to unpack (a {image.mode} image)")
        saved.append(
            {"image": image, "seed": seed, "extension": extension, "info": info, "suffix": suffix}
        )
        return f"{path}/{seed}{suffix}.{extension}", None

    class PasteField(tuple):
        def __new__(cls, component, target, *, api=None):
            return super().__new__(cls, (component, target))

        def __init__(self, component, target, *, api=None):
            super().__init__()
            self.component, self.api = component, api
            self.label = target if isinstance(target, str) else None
            self.function = target if callable(target) else None

    shared = module(
        "modules.shared",
        opts=Options(),
        state=State(),
        total_tqdm=TotalTQDM(),
        OptionInfo=OptionInfo,
        sd_model=None,
        cmd_opts=types.SimpleNamespace(),
    )
    mods = {
        "gradio": gr,
        "modules": module("modules"),
        "modules.shared": shared,
        "modules.script_callbacks": make_script_callbacks(errors),
        "modules.sd_samplers_common": module(
            "modules.sd_samplers_common", InterruptedException=InterruptedException
        ),
        "modules.rng": module("modules.rng", ImageRNG=ImageRNG),
        "modules.devices": module("modules.devices", cpu=torch.device("cpu")),
        "modules.images": module("modules.images", save_image=save_image),
        "modules.ui_components": module("modules.ui_components", InputAccordion=InputAccordion),
        "modules.infotext_utils": module(
            "modules.infotext_utils",
            PasteField=PasteField,
            quote=quote,
            parse_generation_parameters=parse_generation_parameters,
        ),
        "modules.processing": module(
            "modules.processing",
            opt_C=4,
            opt_f=8,
            decode_latent_batch=decode_latent_batch,
            Processed=Processed,
            create_infotext=create_infotext,
            process_images=process_images,
            StableDiffusionProcessingTxt2Img=StableDiffusionProcessingTxt2Img,
            StableDiffusionProcessingImg2Img=StableDiffusionProcessingImg2Img,
        ),
        "modules.scripts": module(
            "modules.scripts",
            Script=Script,
            AlwaysVisible=AlwaysVisible,
            scripts_data=[],
            ScriptRunner=ScriptRunner,
        ),
    }
    for name, mod in mods.items():
        if name.startswith("modules."):
            setattr(mods["modules"], name.split(".", 1)[1], mod)
    return mods


def new_unet(seed: int = 0) -> TinyLdmUNet:
    return TinyLdmUNet(seed).eval()


__all__ = ["FakeControlNetScript", "WebUI", "make_modules", "new_unet"]
