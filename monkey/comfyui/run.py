"""MONKEY's two passes inside a ComfyUI sampler node.

What ``nodes.common_ksampler`` does (noise from the seed and the latent's ``batch_index``, the
latent's ``noise_mask``, ``comfy.samplers.KSampler`` on the node's inputs), done twice on a
clone of the MODEL whose IPAdapter patches are wrapped (``patches``): pass 1 on its own shorter
schedule (``pass1_steps``) from the same noise, cut right after its last recorded step, then
pass 2 on the node's schedule with the masks. Each pass's sigmas are the step clock; ComfyUI's
progress bar counts both passes; an interrupt (raised from the progress callback) ends either
pass with the wrappers inert and the user's MODEL as it was (it is never changed).

ComfyUI modules are imported inside the functions: importing this module needs only torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import layers as layer_tables
from .. import status as status_text
from ..args import MonkeyArgs, MonkeyArgsError
from ..hooks import HookSet
from ..maskset import PX_PER_LATENT, MaskSet, UnitMasks
from ..rows import RowLayout
from ..session import MonkeySession, Phase
from ..steps import StepClock, StepPlan, pass1_length
from ..twopass import run_two_pass
from .patches import Attn2ReplaceUnits, attn2_patches, called_layers, wrapped_clone

logger = logging.getLogger("monkey")

END_EVALS = {"heun": 1 << 30, "heunpp2": 1 << 30}
"""ComfyUI samplers that evaluate each step again at the next step's sigma (see ``StepClock``)."""


@dataclass
class Sampling:
    """One sampler node's inputs, as ``common_ksampler`` takes them."""

    model: Any
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    positive: Any
    negative: Any
    latent: dict
    denoise: float = 1.0


@dataclass
class Outcome:
    samples: torch.Tensor
    """The final latent (pass 2, or the plain generation)."""
    first: torch.Tensor
    """Pass 1's latent, denoised at its last step (the final latent when pass 1 did not run)."""
    mask: torch.Tensor
    """``[N, H, W]`` float at image size: one per image, or per unit and image (unit-major)."""
    status: str


def plain(job: Sampling) -> torch.Tensor:
    """``KSampler`` as ComfyUI runs it (MONKEY off, or nothing to mask)."""
    import nodes

    out = nodes.common_ksampler(
        job.model, job.seed, job.steps, job.cfg, job.sampler_name, job.scheduler,
        job.positive, job.negative, job.latent, denoise=job.denoise,
    )  # fmt: skip
    return out[0]["samples"]


def _layers(settings: MonkeyArgs, called: list[str]) -> tuple[layer_tables.ModelFamily, tuple]:
    """The model family of the called layers, and the mask-source layers among them."""
    family = next((f for f in layer_tables.FAMILIES if set(called) <= set(f.names())), None)
    wanted = settings.layers or (family.default_source if family else ())
    if not wanted:
        raise MonkeyArgsError(
            "layers", "default", "this UNet is neither SD1.x nor SDXL; name the mask layer(s)"
        )
    resolved = []
    for name in wanted:
        ldm = name
        if family is not None and name not in called:
            try:
                ldm = family.layer(name).ldm
            except KeyError:
                ldm = name
        if ldm not in called:
            raise MonkeyArgsError(
                "layers",
                ", ".join(settings.layers) or "default",
                f"layers whose IPAdapter patch ComfyUI calls; {name!r} is not one "
                "(ComfyUI never calls IPAdapter_plus's SD1.5 middle-block patch)",
            )
        resolved.append(ldm)
    return family, tuple(resolved)


class MonkeyRun:
    """One MONKEY sampler node execution."""

    def __init__(self, job: Sampling, settings: MonkeyArgs, *, record_only: bool = False):
        self.job, self.settings, self.record_only = job, settings, record_only

    # -- the node's entry ----------------------------------------------------------------------

    def run(self) -> Outcome:
        job, settings = self.job, self.settings
        if not settings.enabled:
            return self._untouched("off")
        patches = attn2_patches(job.model)
        called = called_layers(patches)
        if not called:
            reason = (
                "skipped: no IPAdapter patch on the MODEL (connect the MODEL output of an "
                "IPAdapter node)"
            )
            logger.warning("MONKEY: %s", reason)
            return self._untouched(reason)
        _, source = _layers(settings, sorted(called.values()))
        units = max(len(patches[key].callback) for key in called)
        return self._monkey(source, units)

    def _untouched(self, reason: str) -> Outcome:
        samples = plain(self.job) if not self.record_only else self.job.latent["samples"]
        latent = self.job.latent["samples"]
        mask = torch.ones(latent.shape[0], *_image_hw(latent))
        return Outcome(samples, samples, mask, reason)

    # -- the passes ---------------------------------------------------------------------------

    def _monkey(self, source: tuple[str, ...], n_units: int) -> Outcome:
        import comfy.sample
        import comfy.utils

        job, settings = self.job, self.settings
        latent_image = comfy.sample.fix_empty_latent_channels(job.model, job.latent["samples"])
        noise = comfy.sample.prepare_noise(latent_image, job.seed, job.latent.get("batch_index"))
        self.latent_image, self.noise = latent_image, noise
        self.noise_mask = job.latent.get("noise_mask")
        n_images = latent_image.shape[0]
        session = MonkeySession(settings, source, RowLayout.webui([1] * n_images), units=n_units)
        for note in session.notes:
            logger.warning("MONKEY: %s", note)
        self.session = session
        self.work = wrapped_clone(job.model, session, Attn2ReplaceUnits())
        self.pass1 = pass1_length(job.steps, settings.pass1_steps)
        last = StepPlan.for_settings(self.pass1, settings).last_record
        self.pass1_run = self.pass1 if last is None else last + 1
        total = self.pass1_run + (0 if self.record_only else job.steps)
        self.progress = _Progress(job.model, total, comfy.utils.PROGRESS_BAR_ENABLED)
        hooks = HookSet()
        try:
            if self.record_only:
                return self._record_only(hooks)
            result = run_two_pass(
                session,
                self._sample,
                reset_noise=lambda: None,  # every pass samples from a copy of the same noise
                hooks=hooks,
                first_is_final=False,  # pass 1 is cut after recording: never the plain image
            )
        finally:
            session.end()
            self.work = None  # the wrapped clone lives only for this run
        first = self._first_latent(result.first)
        masks = result.masks
        mask = self._image_masks(masks, n_images)
        return Outcome(result.samples, first, mask, self._status(masks, result.skipped_reason))

    def _record_only(self, hooks: HookSet) -> Outcome:
        session = self.session
        with hooks:
            try:
                session.begin(Phase.RECORD)
                first = self._sample(Phase.RECORD)
            finally:
                session.end()
        n_images = self.latent_image.shape[0]
        reason = None if session.has_data else "no IP-Adapter attention was recorded"
        masks = session.build_masks() if session.has_data else None
        return Outcome(
            first,
            self._first_latent(first),
            self._image_masks(masks, n_images),
            self._status(masks, reason),
        )

    def _sample(self, phase: Phase) -> torch.Tensor:
        """One sampler run on the wrapped clone: pass 1 on its own schedule, cut after its last
        recorded step (and denoised there), or the node's own run."""
        import comfy.model_management
        import comfy.samplers

        job, work = self.job, self.work
        steps = self.pass1 if phase is Phase.RECORD else job.steps
        sampler = comfy.samplers.KSampler(
            work, steps=steps, device=work.load_device, sampler=job.sampler_name,
            scheduler=job.scheduler, denoise=job.denoise, model_options=work.model_options,
        )  # fmt: skip
        sigmas = sampler.sigmas
        if len(sigmas) > 1:
            self.session.use_schedule(
                StepClock(sigmas[:-1].tolist(), END_EVALS.get(job.sampler_name, 0))
            )
        cut = {}
        offset = 0
        if phase is Phase.RECORD:
            cut = {"last_step": self.pass1_run, "force_full_denoise": True}
        else:
            offset = self.pass1_run
        samples = sampler.sample(
            self.noise.clone(), job.positive, job.negative, cfg=job.cfg,
            latent_image=self.latent_image, denoise_mask=self.noise_mask,
            callback=self.progress.callback(offset), disable_pbar=self.progress.disabled,
            seed=job.seed, **cut,
        )  # fmt: skip
        return samples.to(comfy.model_management.intermediate_device())

    # -- outputs ------------------------------------------------------------------------------

    def _first_latent(self, first: torch.Tensor | None) -> torch.Tensor:
        return first if first is not None else self.latent_image

    def _image_masks(self, masks: MaskSet | UnitMasks | None, n_images: int) -> torch.Tensor:
        """The subject masks at image size (dilated and feathered as pass 2 applied them):
        ``[images, H, W]``, or ``[units·images, H, W]`` unit by unit in mask mode per_unit."""
        latent_hw = tuple(self.latent_image.shape[-2:])
        image_hw = _image_hw(self.latent_image)
        if masks is None:
            return torch.ones(n_images, *image_hw)
        sets = masks.units if isinstance(masks, UnitMasks) else [masks]
        latent = torch.cat([mask_set.latent_masks(latent_hw) for mask_set in sets])
        return torch.nn.functional.interpolate(latent[:, None], size=image_hw, mode="nearest")[
            :, 0
        ].float()

    def _status(self, masks: MaskSet | UnitMasks | None, reason: str | None) -> str:
        session = self.session
        schedule = status_text.schedule_text(session) if masks is not None else ""
        lines = []
        for image in range(session.layout.n_images):
            if isinstance(masks, UnitMasks):
                text = status_text.unit_status(masks, image)
            else:
                text = status_text.status(masks, image, reason, session.recorder.token_count)
            lines.append(f"image {image}: {text}{schedule}")
        return "\n".join([*session.notes, *lines])


def _image_hw(latent: torch.Tensor) -> tuple[int, int]:
    return latent.shape[-2] * PX_PER_LATENT, latent.shape[-1] * PX_PER_LATENT


class _Progress:
    """One ComfyUI progress bar (with latent previews) over both passes."""

    def __init__(self, model: Any, total: int, enabled: bool):
        import latent_preview

        self.total = total
        self.disabled = not enabled
        self._step = latent_preview.prepare_callback(model, total)

    def callback(self, offset: int) -> Callable:
        def step(index: int, x0: Any, x: Any, _total: int) -> None:
            self._step(offset + index, x0, x, self.total)

        return step
