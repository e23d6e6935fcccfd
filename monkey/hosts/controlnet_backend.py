"""sd-webui-controlnet as the A1111 host's IP-Adapter backend: finds its units, opens a batch.

ControlNet hooks the UNet in ``process``, so by the time ``p.sample`` runs its per-layer
IP-Adapter closures are in place for both passes; the batch wraps them (``controlnet.patches``)
and counts each UNet call's rows from the start of the denoiser call (a forward pre-hook).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..hooks import HookSet, TorchHook
from ..rows import RowLayout
from ..session import MonkeySession
from . import controlnet
from .a1111 import IPBackend, IPBatch, MonkeyRun, find_script


class ControlNetBatch(IPBatch):
    def __init__(self, session: MonkeySession, hooks: HookSet, hacks: list, adapters: list):
        super().__init__(session, hooks)
        self.hacks, self.adapters = hacks, adapters

    def silent_layers(self) -> set[str]:
        session = self.session
        recording = self.adapters if session.per_unit else [self.adapters[session.source_unit]]
        return set().union(*(controlnet.zero_weight_layers(self.hacks, a) for a in recording))


class ControlNetBackend(IPBackend):
    def unavailable(self, p: Any) -> str | None:
        if find_script(p, "controlnet") is None:
            return (
                "sd-webui-controlnet is not installed or not enabled; install it to use IP-Adapter"
            )
        return None

    def open_batch(self, run: MonkeyRun, p: Any, kwargs: dict) -> IPBatch | None:
        unet = p.sd_model.model.diffusion_model
        hacks = controlnet.find_ip_hacks(unet)
        if not hacks:
            run.skip(
                p, "no active IP-Adapter unit (enable a ControlNet unit with an ip-adapter model)"
            )
            return None
        adapters = controlnet.units(hacks)
        if not adapters:
            run.skip(p, "cannot read sd-webui-controlnet's IP-Adapter hooks (unsupported version?)")
            return None
        source = adapters[run.source_index(len(adapters))]
        available = sorted({hack.layer for hack in hacks if hack.adapter is source})
        batch = getattr(kwargs.get("conditioning"), "batch", None)
        repeats = [len(conds) for conds in batch] if batch else [1] * len(p.seeds)
        session = run.new_session(p, available, RowLayout.webui(repeats), units=len(adapters))
        hooks = HookSet(controlnet.patches(hacks, session, adapters))
        hooks.add(TorchHook(lambda: unet.register_forward_pre_hook(_unet_call(session))))
        return ControlNetBatch(session, hooks, hacks, adapters)

    def explain(self, p: Any, reason: str) -> str:
        if getattr(p, "sampler_name", None) == "DPM adaptive":
            return (
                f"{reason}; with DPM adaptive, sd-webui-controlnet switches IP-Adapter off once "
                "the sampler's adaptive steps pass the nominal step count"
            )
        return reason


def _unet_call(session: MonkeySession) -> Callable:
    def pre_hook(_module, args):
        if args and isinstance(args[0], torch.Tensor):
            session.begin_unet_call(args[0].shape[0], tuple(args[0].shape[-2:]))

    return pre_hook


BACKEND = ControlNetBackend()
