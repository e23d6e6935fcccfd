"""Observe and mask sd-webui-controlnet's IP-Adapter through what it built for this generation.

ControlNet (1.1.4xx) replaces each attn2 ``forward`` of the WebUI's UNet and keeps, per module,
a list ``ipadapter_hacks`` of closures ``f(attn, x, q) -> ip_out·weight`` (or ``0.0`` outside the
unit's start/end), which it adds to the text attention before ``to_out``. MONKEY wraps those list
entries for one batch and puts the originals back afterwards; it imports nothing from ControlNet
and patches no class.

A closure's free variables name its ``PlugableIPAdapter`` (``self``), its layer ``number`` and
its ``transformer_index``; the instance's ``cache`` holds the IP keys it projected for this
generation (``"{2n+1}_to_k_ip"``), which is what recording reads, so pass 1 runs ControlNet's own
arithmetic untouched. A layer whose weight is 0 (InstantStyle weight types zero most layers,
the paper's among them) returns ``0.0`` before projecting anything, so there recording projects
the key itself from the adapter's ``to_kvs``, as ControlNet would; the output stays ``0.0``.

As the WebUI host's IP-Adapter backend (``BACKEND``): ControlNet hooks the UNet in ``process``,
so by the time ``p.sample`` runs these closures are in place for both passes; each batch wraps
them and counts each UNet call's rows from the start of the denoiser call (a forward pre-hook).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import masks
from ..attention import split_heads
from ..fingerprint import Fingerprint
from ..hooks import HookSet, ListItemPatch, TorchHook
from ..rows import RowLayout
from ..session import IPAction, MonkeySession
from .backend import IPBackend, IPBatch, find_script

if TYPE_CHECKING:
    from .run import MonkeyRun

logger = logging.getLogger("monkey")

HACKS_ATTR = "ipadapter_hacks"


@dataclass(frozen=True)
class IPHack:
    layer: str
    """Stable module path of the attn2 layer (``output_blocks.4.1.transformer_blocks.0.attn2``)."""
    items: list
    """ControlNet's ``ipadapter_hacks`` list this entry lives in."""
    fn: Callable
    adapter: Any
    """The live ``PlugableIPAdapter`` behind the closure (None if it cannot be read)."""
    number: int | None
    transformer_index: int | None = None
    """ControlNet's weight group of the layer (``weight`` may be a dict keyed by it)."""


def _unwrapped(fn: Callable) -> Callable:
    """ControlNet wraps its closures in ``@torch.no_grad()``, whose ``functools.wraps`` wrapper
    keeps the closure in ``__wrapped__``."""
    seen = 0
    while getattr(fn, "__wrapped__", None) is not None and seen < 16:
        fn, seen = fn.__wrapped__, seen + 1
    return fn


def closure_vars(fn: Callable) -> dict[str, Any]:
    """Free variables of a closure, looking through decorators."""
    fn = _unwrapped(fn)
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def find_ip_hacks(unet: torch.nn.Module) -> list[IPHack]:
    """Every IP-Adapter entry ControlNet hooked into ``unet``, in module then unit order."""
    found = []
    for name, module in unet.named_modules():
        items = getattr(module, HACKS_ATTR, None)
        if not isinstance(items, list):
            continue
        for fn in items:
            free = closure_vars(fn)
            number, index = free.get("number"), free.get("transformer_index")
            found.append(
                IPHack(
                    name,
                    items,
                    fn,
                    free.get("self"),
                    number if isinstance(number, int) else None,
                    index if isinstance(index, int) else None,
                )
            )
    return found


def units(hacks: list[IPHack]) -> list[Any]:
    """The distinct IP-Adapter instances, in the order ControlNet hooked them (unit order)."""
    seen: list[Any] = []
    for hack in hacks:
        if hack.adapter is not None and not any(hack.adapter is other for other in seen):
            seen.append(hack.adapter)
    return seen


def cached_ip_key(hack: IPHack, query: torch.Tensor) -> torch.Tensor | None:
    """``[R, heads, T, d]`` IP keys this closure used for the current call, from the adapter's cache."""
    cache = getattr(hack.adapter, "cache", None)
    if not isinstance(cache, dict) or hack.number is None:
        return None
    key = cache.get(f"{2 * hack.number + 1}_to_k_ip")
    if not isinstance(key, torch.Tensor) or key.ndim != 3 or key.shape[0] != query.shape[0]:
        return None  # ControlNet caches per generation; a changed row layout leaves it stale
    return split_heads(key.to(query.device), query.shape[1])


def ip_weight(hack: IPHack) -> float | None:
    """The weight ControlNet multiplies this layer's IP output by (None if it cannot be read)."""
    weigh = getattr(hack.adapter, "weight_on_transformer", None)
    if not callable(weigh) or hack.transformer_index is None:
        return None
    try:
        return float(weigh(hack.transformer_index))
    except (TypeError, ValueError, AssertionError):
        return None


def zero_weight_layers(hacks: list[IPHack], adapter: Any) -> set[str]:
    """Layers where ``adapter``'s IP output is dropped by a weight of 0 (fixed per generation)."""
    return {h.layer for h in hacks if h.adapter is adapter and ip_weight(h) == 0.0}


def _current_model(hack: IPHack) -> Any:
    """The UNet the closure reads its step and ``cond_mark`` from: ControlNet's module global."""
    return getattr(_unwrapped(hack.fn), "__globals__", {}).get("current_model")


def in_guidance_window(hack: IPHack) -> bool:
    """ControlNet's own start/end test for this unit at the current step."""
    percent = getattr(_current_model(hack), "current_sampling_percent", 0.5)
    start, end = getattr(hack.adapter, "p_start", None), getattr(hack.adapter, "p_end", None)
    if not isinstance(start, (int, float)) or not isinstance(end, (int, float)):
        return False
    return not (percent < start or percent > end)


def projected_ip_key(hack: IPHack, query: torch.Tensor) -> torch.Tensor | None:
    """``[R, heads, T, d]`` IP keys ControlNet would project at a layer it skipped for weight 0,
    from the adapter's own ``to_kvs`` and image embedding; not cached, so ControlNet's state is
    untouched."""
    model = _current_model(hack)
    model_ip = getattr(hack.adapter, "ipadapter", None)
    to_kvs = getattr(getattr(model_ip, "ip_layers", None), "to_kvs", None)
    image_emb = getattr(hack.adapter, "image_emb", None)
    cond_mark = getattr(model, "cond_mark", None)
    if to_kvs is None or image_emb is None or cond_mark is None or hack.number is None:
        return None
    name = f"{2 * hack.number + 1}_to_k_ip"
    if name not in to_kvs:
        return None
    with torch.no_grad():
        emb = image_emb.eval(cond_mark)
        pad = getattr(getattr(hack.adapter, "pulid_attn_setting", None), "num_zero", 0)
        if getattr(model_ip, "is_pulid", False) and pad:  # PuLID projects zero tokens too
            emb = torch.cat([emb, emb.new_zeros(emb.shape[0], pad, emb.shape[-1])], dim=1)
        key = to_kvs[name](emb).to(query.device)
    if key.ndim != 3 or key.shape[0] != query.shape[0]:
        return None
    return split_heads(key, query.shape[1])


def _record(hack: IPHack, session: MonkeySession, query: torch.Tensor, out: Any, unit: int) -> None:
    if isinstance(out, torch.Tensor):
        key = cached_ip_key(hack, query)
    elif ip_weight(hack) == 0.0 and in_guidance_window(hack):
        key = projected_ip_key(hack, query)
    else:
        return  # the unit is outside its own start/end: its attention does not exist
    if key is None:
        logger.debug("MONKEY: no IP key at %s; step not recorded", hack.layer)
    else:
        session.observe(hack.layer, query, key, unit)


def wrap(hack: IPHack, session: MonkeySession, unit: int) -> Callable:
    """The replacement for one ``ipadapter_hacks`` entry of IP-Adapter unit ``unit``; the session
    decides whether that unit records and which mask it gets."""
    fn = hack.fn

    def monkey_ip_hack(attn, x, q):
        if not session.active:
            return fn(attn, x, q)
        action = session.ip_action()
        if action is IPAction.OFF:
            return 0.0
        out = fn(attn, x, q)
        if session.wants_record(hack.layer, unit):
            _record(hack, session, q, out, unit)
        if action is IPAction.MASKED and isinstance(out, torch.Tensor):
            out = masks.apply(out, session.weights(out.shape[1], out.device, out.dtype, unit))
        return out

    monkey_ip_hack.__wrapped__ = fn
    return monkey_ip_hack


def unit_index(hack: IPHack, adapters: list[Any]) -> int:
    """The unit (position in ``units(...)``) an entry belongs to; ``len(adapters)`` for an entry
    whose adapter cannot be read: it is masked like any unit but never records."""
    return next((i for i, a in enumerate(adapters) if hack.adapter is a), len(adapters))


def patches(
    hacks: list[IPHack], session: MonkeySession, adapters: list[Any]
) -> list[ListItemPatch]:
    """One owned patch per entry, each told its unit index."""
    return [
        ListItemPatch(
            hack.items,
            hack.fn,
            lambda fn, hack=hack: wrap(hack, session, unit_index(hack, adapters)),
        )
        for hack in hacks
    ]


# -- the WebUI host's backend ------------------------------------------------------------------


class ControlNetBatch(IPBatch):
    def __init__(self, session: MonkeySession, hooks: HookSet, hacks: list, adapters: list):
        super().__init__(session, hooks)
        self.hacks, self.adapters = hacks, adapters

    def silent_layers(self) -> set[str]:
        session = self.session
        recording = self.adapters if session.per_unit else [self.adapters[session.source_unit]]
        return set().union(*(zero_weight_layers(self.hacks, a) for a in recording))


class ControlNetBackend(IPBackend):
    def unavailable(self, p: Any) -> str | None:
        if find_script(p, "controlnet") is None:
            return (
                "sd-webui-controlnet is not installed or not enabled; install it to use IP-Adapter"
            )
        return None

    def open_batch(self, run: MonkeyRun, p: Any, kwargs: dict) -> IPBatch | None:
        unet = p.sd_model.model.diffusion_model
        hacks = find_ip_hacks(unet)
        if not hacks:
            run.skip(
                p, "no active IP-Adapter unit (enable a ControlNet unit with an ip-adapter model)"
            )
            return None
        adapters = units(hacks)
        if not adapters:
            run.skip(p, "cannot read sd-webui-controlnet's IP-Adapter hooks (unsupported version?)")
            return None
        source = adapters[run.source_index(len(adapters))]
        available = sorted({hack.layer for hack in hacks if hack.adapter is source})
        batch = getattr(kwargs.get("conditioning"), "batch", None)
        repeats = [len(conds) for conds in batch] if batch else [1] * len(p.seeds)
        session = run.new_session(p, available, RowLayout.webui(repeats), units=len(adapters))
        hooks = HookSet(patches(hacks, session, adapters))
        hooks.add(TorchHook(lambda: unet.register_forward_pre_hook(_unet_call(session))))
        return ControlNetBatch(session, hooks, hacks, adapters)

    def fingerprint(self, p: Any, batch: IPBatch, fp: Fingerprint) -> Any:
        for adapter in getattr(batch, "adapters", []):
            fp.add("ip-adapter", {name: getattr(adapter, name, None) for name in ADAPTER_FIELDS})
        network = getattr(find_script(p, "controlnet"), "latest_network", None)
        for param in getattr(network, "control_params", None) or []:
            fp.add("controlnet", {name: getattr(param, name, None) for name in CONTROL_FIELDS})
        return p.sd_model.model.diffusion_model

    def explain(self, p: Any, reason: str) -> str:
        if getattr(p, "sampler_name", None) == "DPM adaptive":
            return (
                f"{reason}; with DPM adaptive, sd-webui-controlnet switches IP-Adapter off once "
                "the sampler's adaptive steps pass the nominal step count"
            )
        return reason


ADAPTER_FIELDS = (
    "image_emb",
    "weight",
    "p_start",
    "p_end",
    "effective_region_mask",
    "pulid_attn_setting",
    "ipadapter",
)
"""What an IP-Adapter unit (``PlugableIPAdapter``) adds to the UNet's attention in pass 1: the
reference's embeddings, the weight (per layer group), start/end, and the adapter's weights."""
CONTROL_FIELDS = (
    "control_model_type",
    "control_model",
    "hint_cond",
    "weight",
    "start_guidance_percent",
    "stop_guidance_percent",
    "advanced_weighting",
    "soft_injection",
    "cfg_injection",
    "global_average_pooling",
    "effective_region_mask",
    "union_control_types",
    "preprocessor",
)
"""What each ControlNet unit (``ControlParams``) hands the UNet in pass 1 (``hr_hint_cond`` is
the hires pass's, pass 2 only)."""


def _unet_call(session: MonkeySession) -> Callable:
    def pre_hook(_module, args):
        if args and isinstance(args[0], torch.Tensor):
            session.begin_unet_call(args[0].shape[0], tuple(args[0].shape[-2:]))

    return pre_hook


BACKEND = ControlNetBackend()
