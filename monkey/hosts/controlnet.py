"""Observe and mask sd-webui-controlnet's IP-Adapter through what it built for this generation.

ControlNet (1.1.4xx) replaces each attn2 ``forward`` of the WebUI's UNet and keeps, per module,
a list ``ipadapter_hacks`` of closures ``f(attn, x, q) -> ip_out·weight`` (or ``0.0`` outside the
unit's start/end), which it adds to the text attention before ``to_out``. MONKEY wraps those list
entries for one batch and puts the originals back afterwards; it imports nothing from ControlNet
and patches no class.

A closure's free variables name its ``PlugableIPAdapter`` (``self``) and its layer ``number``; the
instance's ``cache`` holds the IP keys it projected for this generation (``"{2n+1}_to_k_ip"``),
which is what recording reads, so pass 1 runs ControlNet's own arithmetic untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import masks
from ..attention import split_heads
from ..hooks import ListItemPatch
from ..session import IPAction, MonkeySession

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


def closure_vars(fn: Callable) -> dict[str, Any]:
    """Free variables of a closure, looking through decorators: ControlNet wraps its closures in
    ``@torch.no_grad()``, whose ``functools.wraps`` wrapper keeps the closure in ``__wrapped__``."""
    seen = 0
    while getattr(fn, "__wrapped__", None) is not None and seen < 16:
        fn, seen = fn.__wrapped__, seen + 1
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
            number = free.get("number")
            found.append(
                IPHack(
                    name, items, fn, free.get("self"), number if isinstance(number, int) else None
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


def wrap(hack: IPHack, session: MonkeySession, records: bool) -> Callable:
    """The replacement for one ``ipadapter_hacks`` entry."""
    fn = hack.fn

    def monkey_ip_hack(attn, x, q):
        if not session.active:
            return fn(attn, x, q)
        action = session.ip_action()
        if action is IPAction.OFF:
            return 0.0
        out = fn(attn, x, q)
        if not isinstance(out, torch.Tensor):  # the unit is outside its own start/end
            return out
        if records and session.wants_record(hack.layer):
            key = cached_ip_key(hack, q)
            if key is None:
                logger.debug("MONKEY: no cached IP key at %s; step not recorded", hack.layer)
            else:
                session.observe(hack.layer, q, key)
        if action is IPAction.MASKED:
            out = masks.apply(out, session.weights(out.shape[1], out.device))
        return out

    monkey_ip_hack.__wrapped__ = fn
    return monkey_ip_hack


def patches(hacks: list[IPHack], session: MonkeySession, source_unit: Any) -> list[ListItemPatch]:
    """One owned patch per entry; only the source unit's entries record."""
    return [
        ListItemPatch(
            hack.items,
            hack.fn,
            lambda fn, hack=hack: wrap(hack, session, hack.adapter is source_unit),
        )
        for hack in hacks
    ]
