"""MONKEY's two passes on a diffusers Stable Diffusion (XL) pipeline, txt2img or img2img.

The pipeline is called twice exactly as the user would call it, with the UNet host
(``hooks.py``) hooked for the call: pass 1 on its own shorter schedule, stopped right after
its last recorded step (``stop.py``); pass 2 from the same
noise (every generator is put back to the state it had before pass 1). Steps are the pipeline's
sampler steps, read off the scheduler's timesteps, so second-order schedulers (Heun, DPM2,
DPM-SDE) and PLMS place each UNet evaluation in its step. The user's ``callback_on_step_end``
runs in both passes and its ``pipe._interrupt`` is honoured; every hook is gone, and the
pipeline's interrupt flag as MONKEY found it, however the call ends.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .. import masks as M
from ..args import MonkeyArgs
from ..hooks import HookSet, TorchHook
from ..kept import KeptMaps
from ..layers import source_layers
from ..maskset import MaskSet
from ..rows import RowLayout
from ..session import MonkeySession, Phase
from ..status import schedule_text, silent_text, status
from ..steps import pass1_length
from ..twopass import run_two_pass
from .clock import LoopClock, loop_clock, loop_steps, runge_kutta_iterations
from .fingerprint import pass_one
from .hooks import DiffusersMonkey, ip_attention_modules
from .schedule import first_pass_steps
from .stop import freeze_after_stop

logger = logging.getLogger("monkey")

__all__ = ["LoopClock", "loop_steps", "monkey_generate", "runge_kutta_iterations"]

Progress = Callable[[str, int, int], None]
"""``progress(pass_name, iterations_done, iterations_in_this_run)`` after every loop iteration."""


@dataclass
class MonkeyPipelineOutput:
    images: Any
    """Pass 2's images (the plain pipeline's when MONKEY is off or could not mask), in the
    call's ``output_type``."""
    masks: list[Image.Image] | None
    """Per image, the mask pass 2 applied at the image size (white: subject, where IP-Adapter
    acts); None when MONKEY is off."""
    first_images: Any
    """Pass 1's images (its state where it stopped, right after its last recorded step)."""
    statuses: list[str] = field(default_factory=list)
    """Per image, what MONKEY did (the WebUI's ``MONKEY status`` text)."""
    mask_set: MaskSet | None = None
    skipped_reason: str | None = None
    """Why pass 2 did not run or did not mask, if so."""
    output: Any = None
    kept: KeptMaps | None = None
    """Pass 1's maps under its fingerprint: pass ``reuse=`` this output (or this) to a call that
    changes only mask settings, and it skips pass 1."""
    reused: bool = False
    """Pass 1 was not run: the kept maps handed in as ``reuse`` were."""
    """The pipeline's own output object of the final run (``nsfw_content_detected`` ...)."""
    settings: MonkeyArgs | None = None


def resolve_settings(settings: MonkeyArgs | Mapping[str, Any] | None) -> MonkeyArgs:
    """None: MONKEY on at the defaults; a dict of named settings over those; or MonkeyArgs as is
    (its ``enabled`` is honoured: off runs the plain pipeline)."""
    if isinstance(settings, MonkeyArgs):
        return settings
    return MonkeyArgs.from_dict(dict(settings or {}), MonkeyArgs(enabled=True))


def _call_default(pipe: Any, name: str, fallback: Any) -> Any:
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default


def images_in_call(pipe: Any, kwargs: Mapping[str, Any]) -> int:
    """How many images one call makes: prompts (or prompt embeddings) × images per prompt."""
    prompt = kwargs.get("prompt")
    if isinstance(prompt, str):
        batch = 1
    elif isinstance(prompt, (list, tuple)):
        batch = len(prompt)
    elif kwargs.get("prompt_embeds") is not None:
        batch = kwargs["prompt_embeds"].shape[0]
    else:
        raise ValueError("MONKEY needs `prompt` or `prompt_embeds` to count the images")
    per_prompt = kwargs.get("num_images_per_prompt") or _call_default(
        pipe, "num_images_per_prompt", 1
    )
    return batch * int(per_prompt)


def uses_cfg(pipe: Any, kwargs: Mapping[str, Any]) -> bool:
    """The SD/SDXL pipelines' own rule: guidance above 1 and no guidance-embedding UNet."""
    scale = kwargs.get("guidance_scale", _call_default(pipe, "guidance_scale", 7.5))
    return scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


def _generators(generator: Any) -> list[torch.Generator]:
    if generator is None:
        return []
    return list(generator) if isinstance(generator, (list, tuple)) else [generator]


def mask_images(masks: MaskSet, latent_hw: tuple[int, int], size: tuple[int, int]) -> list:
    """Each image's mask as applied (dilated, feathered) at ``size`` (width, height), greyscale."""
    width, height = size
    full = M.resize(masks.latent_masks(latent_hw), (height, width)).clamp(0, 1)
    pixels = (full * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(mask) for mask in pixels]


def _image_size(images: Any) -> tuple[int, int]:
    """(width, height) of a pipeline's images: PIL, numpy ``[B, H, W, C]`` or torch ``[B, C, H, W]``."""
    first = images[0]
    if isinstance(first, Image.Image):
        return first.size
    if isinstance(images, torch.Tensor):
        return int(images.shape[-1]), int(images.shape[-2])
    return int(first.shape[1]), int(first.shape[0])


class PipelineRun:
    """One ``monkey_generate`` call: the session, its hooks and the state of each pipeline run."""

    def __init__(
        self,
        pipe: Any,
        args: MonkeyArgs,
        kwargs: dict[str, Any],
        progress: Progress | None,
        reuse: KeptMaps | None = None,
    ):
        self.pipe, self.args, self.progress, self.offered = pipe, args, progress, reuse
        modules = ip_attention_modules(pipe.unet)
        self.ip_scales = [list(m.processor.scale) for m in modules.values()]
        if not modules:
            raise ValueError(
                "MONKEY needs an IP-Adapter: load one with pipe.load_ip_adapter(...) first"
            )
        if kwargs.get("ip_adapter_image") is None and kwargs.get("ip_adapter_image_embeds") is None:
            raise ValueError("MONKEY needs `ip_adapter_image` or `ip_adapter_image_embeds`")
        adapters = len(next(iter(modules.values())).processor.scale)
        self.source = args.source_unit if args.source_unit < adapters else 0
        self.notes: list[str] = []
        if self.source != args.source_unit:
            self.notes.append(
                f"mask from IP-Adapter 0: source unit {args.source_unit} is not loaded "
                f"({adapters} loaded)"
            )
        try:
            layers = source_layers(args.layers, list(modules))
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        self.n_images = images_in_call(pipe, kwargs)
        self.cfg = uses_cfg(pipe, kwargs)
        self.session = MonkeySession(args, layers, RowLayout.diffusers(self.n_images, self.cfg))
        self.steps = int(
            kwargs.get("num_inference_steps") or _call_default(pipe, "num_inference_steps", 50)
        )
        custom = kwargs.get("timesteps") is not None or kwargs.get("sigmas") is not None
        # a schedule given as timesteps/sigmas cannot be shortened: pass 1 runs it whole; else
        # pass 1's own shorter schedule, lengthened where the scheduler or img2img needs more
        self.first_steps = (
            self.steps
            if custom
            else first_pass_steps(
                pipe, kwargs, self.steps, pass1_length(self.steps, args.pass1_steps)
            )
        )
        self.kwargs = dict(kwargs)
        self.kwargs.pop("return_dict", None)
        if not _generators(self.kwargs.get("generator")):
            # both passes must draw the same noise: an unseeded call gets a generator seeded
            # from torch's global RNG (so torch.manual_seed still makes it reproducible)
            seed = int(torch.randint(0, 2**62, (1,)).item())
            self.kwargs["generator"] = torch.Generator().manual_seed(seed)
        self.generators = _generators(self.kwargs["generator"])
        self.states = [gen.get_state() for gen in self.generators]
        self.user_callback = self.kwargs.pop("callback_on_step_end", None)
        tensor_inputs = getattr(self.user_callback, "tensor_inputs", None)
        if tensor_inputs is not None:  # diffusers' PipelineCallback objects name their inputs
            self.kwargs["callback_on_step_end_tensor_inputs"] = list(tensor_inputs)
        self.monkey = DiffusersMonkey(pipe.unet, self.session, self.source)
        # the clock's pre-hook runs before the UNet host's, so each call's step is set first
        self.hooks = HookSet(
            [
                TorchHook(
                    lambda: pipe.unet.register_forward_pre_hook(
                        self._on_unet_call, with_kwargs=True
                    )
                ),
                self.monkey.hooks,
            ]
        )
        self.clock: LoopClock | None = None
        self.phase = Phase.IDLE
        self.stopped = False
        self.interrupted = False

    # -- the hooks ------------------------------------------------------------------------------

    def _on_unet_call(self, _module, args, kwargs) -> None:
        if not self.session.active or self.stopped:
            return
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        if self.clock is None:
            rows = (2 if self.cfg else 1) * self.n_images
            if sample.shape[0] != rows:
                raise RuntimeError(
                    f"MONKEY expected {rows} UNet rows ({self.n_images} images"
                    f"{', with classifier-free guidance' if self.cfg else ''}), got "
                    f"{sample.shape[0]}"
                )
            self.clock = loop_clock(self.pipe)
        level = timestep.flatten()[0] if isinstance(timestep, torch.Tensor) else timestep
        self.session.begin_step(self.clock.step_at(float(level)), self.clock.total)
        if self.phase is Phase.RECORD and self.session.pass_id is None:
            self._identify(args, kwargs)

    def _identify(self, args: tuple, kwargs: dict) -> None:
        """Pass 1's first UNet call, before it runs: fingerprint it; reusing the offered kept
        maps ends the pipeline call right here."""
        pass_id = pass_one(
            self.pipe,
            self.session,
            args,
            kwargs,
            call=self.kwargs,
            generator_states=self.states,
            ip_scales=self.ip_scales,
        )
        offered = self.offered
        if self.session.identify(pass_id, offered=offered, reuse=offered is not None):
            raise _PassOneReused
        if self.session.missed:
            self.notes.append(f"pass 1 ran: its {', '.join(self.session.missed)} changed")

    def _on_step_end(self, pipe: Any, index: int, timestep: Any, tensors: dict) -> dict:
        if self.stopped:  # a loop that ignores the interrupt: its skipped iterations, unseen
            return {}
        out = {}
        if self.user_callback is not None:
            out = self.user_callback(pipe, index, timestep, tensors) or {}
        if getattr(pipe, "_interrupt", False) and not self.stopped:
            self.interrupted = True
        if self.progress is not None:
            self.progress(self.phase.value, index + 1, len(self.clock.levels) if self.clock else 0)
        session = self.session
        upcoming = self.clock.peek() if self.clock is not None else None
        last = session.plan.last_record
        if (
            self.phase is Phase.RECORD
            and session.recorder.has_data
            and last is not None
            and upcoming is not None
            and upcoming > last
        ):
            pipe._interrupt = True  # pass 1 has what the mask needs: the loop skips the rest
            self.stopped = True
        return out

    # -- the runs -------------------------------------------------------------------------------

    def reset_noise(self) -> None:
        for gen, state in zip(self.generators, self.states):
            gen.set_state(state)

    def sample(self, phase: Phase) -> Any:
        """One pipeline run. Pass 1 ends after its last recorded step through the pipeline's
        own ``interrupt``, and where its loop ignores that, through ``stop.freeze_after_stop``."""
        self.phase, self.clock, self.stopped = phase, None, False
        self.reset_noise()
        kwargs = dict(self.kwargs, callback_on_step_end=self._on_step_end, return_dict=True)
        scoped = HookSet()
        if phase is Phase.RECORD:
            kwargs["num_inference_steps"] = self.first_steps
            scoped.add(freeze_after_stop(self.pipe, lambda: self.stopped))
        if isinstance(kwargs.get("latents"), torch.Tensor):
            kwargs["latents"] = kwargs["latents"].clone()
        try:
            with scoped:
                return self.pipe(**kwargs)
        except _PassOneReused:
            return None  # pass 1 ended before its first UNet call: kept maps replace it
        finally:
            if self.stopped:
                self.pipe._interrupt = False

    def run(self) -> MonkeyPipelineOutput:
        try:
            result = run_two_pass(
                self.session,
                self.sample,
                reset_noise=self.reset_noise,
                hooks=self.hooks,
                cancelled=lambda: self.interrupted,
                first_is_final=self.first_steps == self.steps,
            )
        finally:
            self.hooks.close()  # its callbacks hold this run: no cycle outlives the call
        kept = result.kept
        final, first = result.samples, result.first
        size = _image_size(final.images)
        masks = result.masks
        reason = result.skipped_reason
        if masks is None:
            masks = MaskSet.full(self.n_images)
        scale = getattr(self.pipe, "vae_scale_factor", 8)
        latent_hw = masks.latent_hw or (size[1] // scale, size[0] // scale)
        tokens = self.session.token_count if self.session.has_data else None
        schedule = schedule_text(self.session)
        notes = silent_text(self.monkey.zero_weight_layers())
        notes += "".join(f"; {note}" for note in self.notes)
        statuses = [
            status(result.masks, image, reason, tokens) + schedule + notes
            for image in range(self.n_images)
        ]
        return MonkeyPipelineOutput(
            images=final.images,
            masks=mask_images(masks, latent_hw, size),
            first_images=first.images if first is not None else None,
            statuses=statuses,
            mask_set=result.masks,
            skipped_reason=reason,
            output=final,
            settings=self.args,
            kept=kept,
            reused=result.reused,
        )


class _PassOneReused(Exception):  # noqa: N818 - a signal out of the pipeline call, never escapes
    """Raised in pass 1's first UNet pre-hook when kept maps replace pass 1."""


def _kept(reuse: Any) -> KeptMaps | None:
    if reuse is None or isinstance(reuse, KeptMaps):
        return reuse
    kept = getattr(reuse, "kept", None)
    if isinstance(reuse, MonkeyPipelineOutput):
        return kept
    raise TypeError(
        f"reuse= takes a previous monkey_generate result (or its .kept), got {type(reuse).__name__}"
    )


def monkey_generate(
    pipe: Any,
    settings: MonkeyArgs | Mapping[str, Any] | None = None,
    *,
    progress: Progress | None = None,
    reuse: MonkeyPipelineOutput | KeptMaps | None = None,
    **kwargs: Any,
) -> MonkeyPipelineOutput:
    """Run MONKEY on ``pipe`` (a Stable Diffusion or SDXL pipeline, txt2img or img2img, with an
    IP-Adapter loaded by ``pipe.load_ip_adapter``); ``kwargs`` are the pipeline call's own
    arguments (``prompt``, ``ip_adapter_image``, ``generator``, ``num_inference_steps`` ...).

    ``settings``: MONKEY's settings (``monkey.args.MonkeyArgs`` or a dict of its named fields);
    None is MONKEY on at the WebUI's defaults. Pass a seeded ``generator`` for reproducible
    images: both passes start from its state at the call.

    ``reuse``: a previous result (or its ``kept``). When this call's pass 1 would be exactly that
    one's (same noise, prompt and IP-Adapter embeddings, IP scales, schedule, weights and LoRA
    scales, call arguments, record settings: its fingerprint), pass 1 is skipped and the masks
    come from its kept maps with this call's mask settings; the images equal a call without
    ``reuse``. Otherwise pass 1 runs and the status says which of them changed.
    """
    args = resolve_settings(settings)
    if not args.enabled:
        kwargs.pop("return_dict", None)
        out = pipe(**kwargs, return_dict=True)
        return MonkeyPipelineOutput(
            images=out.images,
            masks=None,
            first_images=None,
            statuses=[],
            skipped_reason="MONKEY is off",
            output=out,
            settings=args,
        )
    return PipelineRun(pipe, args, kwargs, progress, _kept(reuse)).run()
