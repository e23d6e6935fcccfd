"""MONKEY on Forge (lllyasviel/stable-diffusion-webui-forge, A1111 1.10.1 processing on Forge's
own ``backend/``) and reForge: its built-in IP-Adapter, driven by the integrated ControlNet.

Forge rebuilds the UNet's patches on every ``p.sample``: it resets ``p.sd_model.forge_objects``
to a shallow copy of ``forge_objects_after_applying_lora``, then runs every script's
``process_before_every_sampling``, where the integrated ControlNet's IP-Adapter clones the UNet
patcher and registers its attn2 patches. So the two passes are the A1111 host's (``run``),
and at each ``process_before_every_sampling`` of the batch (MONKEY's runs after ControlNet's:
``metadata.ini``) this backend clones the patched UNet again, with a ``MonkeyAttn2`` around each
IP-Adapter patch in place of the deep copy of it that Forge's ``clone`` would make
(``monkey.patcher.clone_sharing``, ``forge_attn``). Nothing cached is touched: not the patcher
ControlNet built nor its patches, not its cached parameters, not
``forge_objects_after_applying_lora``; when the batch ends the current ``forge_objects.unet``
goes back to the unwrapped one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .. import layers as layer_tables
from ..fingerprint import Fingerprint
from ..hooks import HookSet
from ..patcher import attn2_entries as patcher_entries
from ..patcher import attn2_replace, clone_sharing
from ..rows import RowLayout
from ..session import MonkeySession, Phase
from . import forge_attn
from .backend import IPBackend, IPBatch, find_script

if TYPE_CHECKING:
    from .run import MonkeyRun

logger = logging.getLogger("monkey")

IP_PATCHER = "IPAdapterPatcher"
"""The class name of the integrated ControlNet's IP-Adapter model (``sd_forge_ipadapter``)."""


def is_forge(p: Any) -> bool:
    """Forge and reForge keep the UNet patcher on the model as ``forge_objects``."""
    return hasattr(getattr(p, "sd_model", None), "forge_objects")


def ip_units(controlnet: Any) -> list[int] | None:
    """Indices (among the enabled ControlNet units) of the IP-Adapter ones, in unit order, from
    what the integrated ControlNet prepared in ``process``; None if that cannot be read."""
    params = getattr(controlnet, "current_params", None)
    if not isinstance(params, dict):
        return None
    return [
        index
        for index, param in sorted(params.items())
        if type(getattr(param, "model", None)).__name__ == IP_PATCHER
    ]


def attn2_entries(unet: Any) -> dict[tuple, tuple[Any, Any]]:
    """The IP-Adapter attn2 entries of a UNet patcher: the object registered under each key and
    the ``CrossAttentionPatch`` it is."""
    return patcher_entries(unet, forge_attn.is_ip_patch)


class UnetSwap:
    """``forge_objects.unet`` replaced by our wrapped clone; removal puts the unwrapped patcher
    back if ours is still there (Forge drops the object on the next ``p.sample`` anyway)."""

    def __init__(self, objects: Any, original: Any, wrapped: Any):
        self.objects, self.original, self.wrapped = objects, original, wrapped
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            self.objects.unet = self.wrapped
            self.installed = True

    def remove(self) -> None:
        if self.installed:
            self.installed = False
            if self.objects.unet is self.wrapped:
                self.objects.unet = self.original
            # Forge keeps the patcher it last loaded (``current_loaded_models``) until another
            # is loaded: our clone must not keep the batch's session, maps and masks alive
            replace = attn2_replace(self.wrapped)
            for key, entry in list(replace.items()):
                if isinstance(entry, forge_attn.MonkeyAttn2):
                    replace[key] = entry.patch


class ForgeBatch(IPBatch):
    def __init__(self, session: MonkeySession, hooks: HookSet):
        super().__init__(session, hooks)
        self.wrapped: dict[Phase, int] = {}
        """Patches wrapped per pass: pass 2 without any cannot have masked."""

    def before_sampling(self, p: Any) -> None:
        session = self.session
        if not session.active:  # MONKEY found nothing to mask: the plain generation, untouched
            return
        objects = p.sd_model.forge_objects
        unet = objects.unet
        entries = attn2_entries(unet)
        if not entries:
            logger.warning("MONKEY: no IP-Adapter patch on Forge's UNet for this sampling")
            return
        unknown = session.source_layers - {forge_attn.layer_name(key) for key in entries}
        if unknown:
            raise ValueError(
                f"mask layer(s) {', '.join(sorted(unknown))} carry no IP-Adapter patch on this model"
            )
        wrappers = {}
        for key, (entry, patch) in entries.items():
            layer = forge_attn.layer_name(key)  # the session says which layers and units record
            wrappers[id(entry)] = forge_attn.MonkeyAttn2(patch, layer, session)
        # never the patcher ControlNet handed over: a clone we own, sharing its patches
        work = clone_sharing(unet, wrappers)
        swap = UnetSwap(objects, unet, work)
        self.hooks.add(swap)
        swap.install()
        self.wrapped[session.phase] = self.wrapped.get(session.phase, 0) + len(entries)

    def unmasked_reason(self) -> str | None:
        if not self.wrapped.get(Phase.APPLY):
            return "pass 2 found no IP-Adapter patch on Forge's UNet to mask"
        return None


PATCH_FIELDS = (
    "weights",
    "ipadapters",
    "conds",
    "unconds",
    "weight_type",
    "masks",
    "sigma_start",
    "sigma_end",
    "unfold_batch",
    "embeds_scaling",
)
"""What an IP-Adapter attn2 patch (``CrossAttentionPatch``) adds to its layer, per unit."""


def _lora_strengths(patcher: Any) -> list:
    """The UNet patcher's weight patches (LoRA) by key and strength, not their tensors (hashing
    a large LoRA's every weight per generation would cost more than it guards)."""
    found = []
    for name in ("patches", "lora_patches"):
        patches = getattr(patcher, name, None)
        if isinstance(patches, dict):
            for key in sorted(patches, key=repr):
                entries = patches[key] if isinstance(patches[key], (list, tuple)) else []
                strengths = [e[0] for e in entries if isinstance(e, tuple) and e]
                found.append([name, repr(key), [s for s in strengths if isinstance(s, float)]])
    return found


class ForgeBackend(IPBackend):
    def unavailable(self, p: Any) -> str | None:
        if find_script(p, "controlnet") is None:
            return (
                "Forge's integrated ControlNet is not enabled; its IP-Adapter units are what "
                "MONKEY masks"
            )
        return None

    def open_batch(self, run: MonkeyRun, p: Any, kwargs: dict) -> IPBatch | None:
        units = ip_units(find_script(p, "controlnet"))
        if units == []:
            run.skip(
                p,
                "no active IP-Adapter unit (enable a ControlNet unit with an IPAdapter "
                "preprocessor such as CLIP-ViT-H (IPAdapter))",
            )
            return None
        if units is None:
            logger.warning("MONKEY: cannot read the integrated ControlNet's units; trying anyway")
        # the session picks the recording units (``shared``: the source, ``per_unit``: all)
        source = run.source_index(len(units)) if units else run.settings.source_unit
        family = layer_tables.SDXL if getattr(p.sd_model, "is_sdxl", False) else layer_tables.SD1
        # Forge's UNet calls say which prompt and image each row is (``RowTracker.chunks``);
        # the layout only fixes the batch's image count
        layout = RowLayout.webui([1] * len(p.seeds))
        n_units = len(units) if units else source + 1
        session = run.new_session(p, list(family.names()), layout, units=n_units)
        return ForgeBatch(session, HookSet())

    def fingerprint(self, p: Any, batch: IPBatch, fp: Fingerprint) -> Any:
        controlnet = find_script(p, "controlnet")
        params = getattr(controlnet, "current_params", None)
        if not isinstance(params, dict) or len(params) != len(ip_units(controlnet) or []):
            return None  # other ControlNet units' inputs are not read here: never reuse
        patcher = p.sd_model.forge_objects.unet
        entries = sorted(attn2_entries(patcher).items(), key=lambda item: repr(item[0]))
        for key, (_, patch) in entries:
            fp.add("ip-adapter", [repr(key), {n: getattr(patch, n, None) for n in PATCH_FIELDS}])
        fp.add("networks", _lora_strengths(patcher))
        return patcher.model.diffusion_model


BACKEND = ForgeBackend()
