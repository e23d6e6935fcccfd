"""The MONKEY nodes: ``MONKEY KSampler`` (both passes) and ``MONKEY Mask`` (pass 1 only).

Their sampling inputs are ComfyUI's own ``KSampler`` inputs, read from the installed ComfyUI (so
they stay a drop-in replacement), followed by MONKEY's settings from the settings model
(``inputs``). The MODEL is the one the IPAdapter nodes patched; it is cloned, never changed.
"""

from __future__ import annotations

from typing import Any

from .inputs import monkey_inputs, settings_from
from .run import MonkeyRun, Sampling

CATEGORY = "MONKEY"


def _sampling_inputs() -> dict:
    import nodes

    return dict(nodes.KSampler.INPUT_TYPES()["required"])


def _latent(latent: dict, samples: Any) -> dict:
    out = latent.copy()
    out["samples"] = samples
    return out


class MonkeyKSampler:
    """KSampler with MONKEY: pass 1 records the IPAdapter's attention, pass 2 masks it."""

    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "MASK", "LATENT", "STRING")
    RETURN_NAMES = ("LATENT", "MASK", "pass 1 LATENT", "status")
    OUTPUT_TOOLTIPS = (
        "The denoised latent of pass 2 (IPAdapter masked to the subject).",
        "The subject mask of each image at image size; in mask mode per_unit one mask per "
        "IPAdapter unit and image, unit by unit.",
        "Pass 1's latent, denoised at its last recorded step.",
        "What MONKEY did for each image (masked share, threshold, token, steps), or why not.",
    )
    DESCRIPTION = (
        "A KSampler for a MODEL patched by IPAdapter nodes: pass 1 records where the IPAdapter "
        "image tokens attend, a subject mask is thresholded from it, and pass 2 applies the "
        "IPAdapter only inside the mask, so the prompt keeps the background (MONKEY)."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - ComfyUI's name
        return {"required": _sampling_inputs(), "optional": monkey_inputs()}

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, denoise=1.0, **settings):  # fmt: skip
        job = Sampling(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                       latent_image, denoise)  # fmt: skip
        outcome = MonkeyRun(job, settings_from(settings)).run()
        return (
            _latent(latent_image, outcome.samples),
            outcome.mask,
            _latent(latent_image, outcome.first),
            outcome.status,
        )


class MonkeyMask:
    """Pass 1 only: the subject mask, for any node that takes a MASK."""

    CATEGORY = CATEGORY
    FUNCTION = "mask"
    RETURN_TYPES = ("MASK", "LATENT", "STRING")
    RETURN_NAMES = ("MASK", "pass 1 LATENT", "status")
    OUTPUT_TOOLTIPS = (
        "The subject mask of each image at image size (per_unit: one per unit and image, unit "
        "by unit); feed it to IPAdapter's attn_mask, inpainting or compositing.",
        "Pass 1's latent, denoised at its last recorded step.",
        "What MONKEY found for each image, or why not.",
    )
    DESCRIPTION = (
        "MONKEY's pass 1 alone: samples the short recording pass with the IPAdapter-patched "
        "MODEL and returns the subject mask thresholded from the IPAdapter's attention."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - ComfyUI's name
        return {"required": _sampling_inputs(), "optional": monkey_inputs()}

    def mask(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
             latent_image, denoise=1.0, **settings):  # fmt: skip
        job = Sampling(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                       latent_image, denoise)  # fmt: skip
        outcome = MonkeyRun(job, settings_from(settings), record_only=True).run()
        return (outcome.mask, _latent(latent_image, outcome.first), outcome.status)


NODE_CLASS_MAPPINGS = {"MonkeyKSampler": MonkeyKSampler, "MonkeyMask": MonkeyMask}
NODE_DISPLAY_NAME_MAPPINGS = {"MonkeyKSampler": "MONKEY KSampler", "MonkeyMask": "MONKEY Mask"}
