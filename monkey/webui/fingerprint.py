"""Pass 1's fingerprint in A1111 and Forge, from what the UNet is handed at its first call.

At pass 1's first denoiser callback (``on_cfg_denoiser``, before the UNet runs) the callback's
parameters hold the noised latent (the seeds' noise, and img2img's init latent at its denoising
strength), the noise level and the conditioning tensors of every row; the step clock holds the
sigma schedule. The rest of what decides pass 1 is read where it lives: the sampler and its
options, CFG, the checkpoint, the UNet's weights (a spread sample, ``weights_probe``) and the
extra networks that change them, the IP-Adapter units (the backend's part) and MONKEY's record
settings.
"""

from __future__ import annotations

import sys
from typing import Any

from ..fingerprint import Fingerprint, PassOneId, record_settings
from ..session import MonkeySession

SAMPLING = (
    "sampler_name",
    "scheduler",
    "steps",
    "eta",
    "s_churn",
    "s_tmin",
    "s_tmax",
    "s_noise",
    "cfg_scale",
    "image_cfg_scale",
    "s_min_uncond",
    "seeds",
    "subseed_strength",
    "seed_resize_from_h",
    "seed_resize_from_w",
    "width",
    "height",
    "token_merging_ratio",
)
"""Processing fields that decide pass 1 beyond the tensors (ancestral noise after the first
step comes from the seeds; the sampler's own options)."""
OPTIONS = (
    "eta_noise_seed_delta",
    "randn_source",
    "eta_ancestral",
    "eta_ddim",
    "s_min_uncond",
    "s_churn",
    "s_tmin",
    "s_tmax",
    "s_noise",
    "always_discard_next_to_last_sigma",
    "sgm_noise_multiplier",
    "sd_noise_schedule",
    "uni_pc_variant",
    "uni_pc_skip_type",
    "uni_pc_order",
    "uni_pc_lower_order_final",
    "batch_cond_uncond",
    "pad_cond_uncond",
    "pad_cond_uncond_v0",
    "cross_attention_optimization",
    "upcast_attn",
    "sd_unet",
    "token_merging_ratio",
    "sd_model_checkpoint",
    "sd_vae",
    "CLIP_stop_at_last_layers",
)
"""WebUI options that change what the sampler or the UNet computes."""


def _loaded_networks() -> list[Any]:
    """A1111's Lora extension's applied networks (name and multipliers), where it is loaded."""
    networks = sys.modules.get("networks")
    found = []
    for net in getattr(networks, "loaded_networks", None) or []:
        disk = getattr(net, "network_on_disk", None)
        found.append(
            [
                getattr(net, "name", None),
                getattr(net, "te_multiplier", None),
                getattr(net, "unet_multiplier", None),
                getattr(net, "dyn_dim", None),
                getattr(disk, "filename", None),
                getattr(net, "mtime", None),
            ]
        )
    return found


def model_parts(p: Any, unet: Any, fp: Fingerprint) -> None:
    model = getattr(p, "sd_model", None)
    info = getattr(model, "sd_checkpoint_info", None)
    fp.add(
        "model",
        [
            type(model).__name__,
            getattr(model, "sd_model_hash", None),
            getattr(info, "filename", None),
            getattr(info, "shorthash", None),
        ],
    )
    fp.add("model", unet)  # a module: its weights probe
    fp.add("networks", getattr(p, "extra_network_data", None))
    fp.add("networks", _loaded_networks())


def pass_one(p: Any, params: Any, session: MonkeySession, unet: Any, fp: Fingerprint) -> PassOneId:
    """The fingerprint of the pass 1 about to run, added to ``fp`` (which holds the backend's
    IP-Adapter parts); ``params`` are its first ``on_cfg_denoiser`` parameters."""
    from modules import shared

    fp.add("latent", params.x)
    fp.add("conditioning", [params.text_cond, params.text_uncond])
    fp.add("image conditioning", getattr(params, "image_cond", None))
    fp.add("schedule", [params.sigma, session.clock.levels if session.clock else None])
    fp.add("schedule", [session.total])
    fp.add("sampling", {name: getattr(p, name, None) for name in SAMPLING})
    if getattr(p, "subseed_strength", 0):
        # a variation seed changes the noise only at a strength above 0; at 0 the WebUI still
        # draws one per call (subseed -1), which must not cost reuse
        fp.add("sampling", list(getattr(p, "subseeds", None) or []))
    init = getattr(p, "init_latent", None)
    if init is not None:  # img2img (in txt2img the strength is the hires pass's: pass 2 only)
        fp.add("init", [init, getattr(p, "denoising_strength", None)])
        for name in ("mask", "nmask", "image_conditioning"):
            fp.add("init", getattr(p, name, None))
    data = getattr(shared.opts, "data", {})
    fp.add("options", {name: data.get(name) for name in OPTIONS})
    model_parts(p, unet, fp)
    fp.add("monkey", record_settings(session.args))
    fp.add("monkey", [session.layout.n_images, sorted(session.source_layers)])
    return fp.finish()
