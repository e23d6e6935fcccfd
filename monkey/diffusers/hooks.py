"""MONKEY on a diffusers ``UNet2DConditionModel`` with IP-Adapter weights loaded by diffusers.

Every IP-Adapter attention processor is wrapped; diffusers' own processor still computes the
attention. Recording reads the query and the IP keys the processor itself produced (forward
hooks on ``attn.to_q`` and ``to_k_ip``). Masking computes ``IPAdapterAttnProcessor2_0``'s own
arithmetic with the image attention times the layer's cached weights (``masked.py``);
other IP-Adapter processors go through their ``ip_adapter_masks`` path with a mask already at
the layer's grid, so its resampling is the identity and per-row masks reach the right rows.

IP-Adapter units here are images: adapter 0's images first, then adapter 1's, and so on. Mask
mode ``per_unit`` records each image from its own keys and masks each with its own mask (each
adapter's weights on the exact path when every adapter has one image; otherwise diffusers'
``ip_adapter_masks``, which attends each image of an adapter on its own where it masks);
``shared`` records ``source_adapter``.
"""

from __future__ import annotations

import math

import torch

from ..attention import split_heads
from ..hooks import AttrPatch, HookSet, TorchHook
from ..masks import layer_size
from ..session import IPAction, MonkeySession
from .masked import masked_ip_attention, supports

try:  # the processor classes are only needed to recognise IP-Adapter layers
    from diffusers.models.attention_processor import (
        IPAdapterAttnProcessor,
        IPAdapterAttnProcessor2_0,
    )

    IP_PROCESSORS: tuple[type, ...] = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)
    EXACT_PROCESSOR: type | None = IPAdapterAttnProcessor2_0
except ImportError:  # pragma: no cover - diffusers is optional for the WebUI extension
    IP_PROCESSORS = ()
    EXACT_PROCESSOR = None


def ip_attention_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Attention modules (by diffusers path) whose processor is an IP-Adapter processor."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(getattr(module, "processor", None), IP_PROCESSORS)
    }


def diffusers_mask_grid(n_tokens: int, hw: tuple[int, int]) -> tuple[int, int]:
    """The grid on which ``IPAdapterMaskProcessor.downsample`` reads a mask of shape ``hw``.

    diffusers infers the layer grid from the mask's aspect ratio and gets some shapes wrong
    (a 7×18 layer becomes 6×21); a mask laid out on the grid it settles on passes through its
    resampling unchanged and flattens back to the layer's sequence order.
    """
    h, w = hw
    for _ in range(8):
        ratio = w / h
        mh = int(math.sqrt(n_tokens / ratio))
        mh = mh + int(n_tokens % mh != 0)
        mw = n_tokens // mh
        if (mh, mw) == (h, w):
            return h, w
        h, w = mh, mw
    raise ValueError(f"no stable diffusers mask grid for {n_tokens} positions")


def _positions(hidden_states: torch.Tensor) -> int:
    """Spatial positions of an attention input, ``[R, N, C]`` or ``[R, C, H, W]``."""
    return hidden_states.shape[1] if hidden_states.ndim == 3 else math.prod(hidden_states.shape[2:])


class MonkeyIPAdapterProcessor(torch.nn.Module):
    """Wraps one diffusers IP-Adapter processor; the wrapped one stays a child module so that
    ``.to()`` and state dicts still reach its weights while wrapped."""

    def __init__(
        self, inner: torch.nn.Module, name: str, session: MonkeySession, source_adapter: int
    ):
        super().__init__()
        self.inner = inner
        self.name = name
        self.source_adapter = source_adapter
        object.__setattr__(self, "session", session)
        object.__setattr__(self, "captured", {})
        object.__setattr__(self, "_mask_lists", {})
        self.armed = False
        self.zero_weight = False
        """Whether this layer recorded from keys it projected itself (its scale was 0)."""

    def capture(self, key: str):
        def hook(_module, _inputs, output):
            if self.armed:
                self.captured[key] = output

        return hook

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks=None,
    ) -> torch.Tensor:
        session = self.session
        action = session.ip_action() if session.active else IPAction.PLAIN
        masked = action is IPAction.MASKED and ip_adapter_masks is None
        if masked and supports(self.inner, EXACT_PROCESSOR, encoder_hidden_states):
            weights = self._unit_weights(hidden_states, encoder_hidden_states[1])
        else:
            weights = None
        if weights is not None:
            return masked_ip_attention(
                self.inner,
                attn,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                temb,
                weights,
            )
        if masked and isinstance(encoder_hidden_states, tuple):
            ip_adapter_masks = self._masks(hidden_states, encoder_hidden_states[1])
        self.armed = session.active and session.wants_record(self.name)
        # IP-Adapter off: scale 0 makes diffusers skip the image attention altogether, so such a
        # step costs less than a plain IP-Adapter step instead of computing it to multiply by 0
        scale_off = action is IPAction.OFF and isinstance(getattr(self.inner, "scale", None), list)
        saved = self.inner.scale if scale_off else None
        try:
            if scale_off:
                self.inner.scale = [0.0] * len(saved)
            out = self.inner(
                attn,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                temb,
                scale,
                ip_adapter_masks,
            )
            states = encoder_hidden_states[1] if isinstance(encoder_hidden_states, tuple) else None
            if self.armed and session.per_unit and "q" in self.captured and states is not None:
                self._observe_units(attn.heads, states)
            elif self.armed and "q" in self.captured:
                key = self._key("k", self.source_adapter, states)
                if key is not None:
                    heads = attn.heads
                    query = split_heads(self.captured["q"], heads)
                    session.observe(self.name, query, split_heads(key, heads))
        finally:
            if scale_off:
                self.inner.scale = saved
            self.armed = False
            self.captured.clear()
        return out

    def _key(self, name: str, adapter: int, states: list | None) -> torch.Tensor | None:
        """``[R, T·images, C]`` IP keys of ``adapter``: those its processor projected, or, where
        its scale here is 0 (InstantStyle-style per-layer scales; diffusers then skips the
        adapter and projects nothing), projected here from its own ``to_k_ip`` as diffusers
        would, as the WebUI hosts do at a layer whose weight is 0. The output is untouched."""
        key = self.captured.get(name)  # [R, images, T, C]: diffusers concatenates the images
        if key is None:
            if states is None or adapter >= len(states) or adapter >= len(self.inner.to_k_ip):
                return None
            with torch.no_grad():
                key = self.inner.to_k_ip[adapter](states[adapter])
            self.zero_weight = True
        return key.reshape(key.shape[0], -1, key.shape[-1])

    def _unit_weights(self, hidden_states: torch.Tensor, ip_states: list[torch.Tensor]):
        """The exact path's weights: one tensor for all adapters (``shared``), one per adapter
        (``per_unit``), or None when an adapter has several images to mask apart."""
        session, n = self.session, _positions(hidden_states)
        device, dtype = hidden_states.device, hidden_states.dtype
        if not session.per_unit:
            return session.weights(n, device, dtype)
        if any(state.ndim == 4 and state.shape[1] != 1 for state in ip_states):
            return None
        return [session.weights(n, device, dtype, unit) for unit in range(len(ip_states))]

    def _observe_units(self, heads: int, ip_states: list[torch.Tensor]) -> None:
        """Mask mode ``per_unit``: every image of every adapter records from its own keys."""
        query = split_heads(self.captured["q"], heads)
        unit = 0
        for adapter, state in enumerate(ip_states):
            key = self._key(f"k{adapter}", adapter, ip_states)
            images = state.shape[1] if state.ndim == 4 else 1
            if key is not None:  # [R, images·T, C]: each image's T tokens in turn
                per_image = key.view(key.shape[0], images, -1, key.shape[-1])
                for image in range(images):
                    self.session.observe(
                        self.name, query, split_heads(per_image[:, image], heads), unit + image
                    )
            unit += images
        self.session.saw_units(unit)

    def _masks(self, hidden_states: torch.Tensor, ip_states: list[torch.Tensor]):
        """The ``ip_adapter_masks`` list for this call, built once per pass and row layout."""
        session = self.session
        rows = session.rows.current
        key = (
            id(session.masks),
            rows.key,
            hidden_states.shape,
            hidden_states.dtype,
            tuple(state.shape[1] for state in ip_states),
        )
        if key not in self._mask_lists:
            n_tokens = _positions(hidden_states)
            grid = diffusers_mask_grid(n_tokens, layer_size(n_tokens, rows.latent_hw))

            def unit_grid(unit: int | None) -> torch.Tensor:
                weights = session.weights(n_tokens, hidden_states.device, hidden_states.dtype, unit)
                return weights.reshape(weights.shape[0], 1, *grid)

            self._mask_lists.clear()  # one pass's masks at a time
            if session.per_unit:  # each image of each adapter: its own unit's mask
                first = [
                    sum(state.shape[1] for state in ip_states[:i]) for i in range(len(ip_states))
                ]
                self._mask_lists[key] = [
                    torch.cat([unit_grid(start + j) for j in range(state.shape[1])], dim=1)
                    for start, state in zip(first, ip_states)
                ]
            else:
                shared = unit_grid(None)
                self._mask_lists[key] = [
                    shared.expand(shared.shape[0], state.shape[1], *grid) for state in ip_states
                ]
        return self._mask_lists[key]


class DiffusersMonkey:
    """The hooks of one MONKEY session on a diffusers UNet.

    The caller drives the step clock (``session.begin_step``) from its sampling loop and checks
    ``session.should_stop()`` there to end pass 1 early.
    """

    def __init__(self, unet: torch.nn.Module, session: MonkeySession, source_adapter: int = 0):
        self.unet = unet
        self.session = session
        self.hooks = HookSet()
        self.hooks.add(
            TorchHook(lambda: unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True))
        )
        self.processors: list[AttrPatch] = []
        for name, attn in ip_attention_modules(unet).items():
            layer = f"{name}"
            patch = AttrPatch(
                attn,
                "processor",
                lambda inner, layer=layer: MonkeyIPAdapterProcessor(
                    inner, layer, session, source_adapter
                ),
                setter=attn.set_processor,
            )
            self.hooks.add(patch)
            self.processors.append(patch)
            if layer in session.source_layers:
                self.hooks.add(
                    TorchHook(
                        lambda a=attn, p=patch: a.to_q.register_forward_hook(p.wrapper.capture("q"))
                    )
                )
                # per_unit: every adapter's keys ("k0", "k1", ...); shared: the source's ("k")
                adapters = range(len(attn.processor.to_k_ip)) if session.per_unit else ()
                for index, name in [(i, f"k{i}") for i in adapters] or [(source_adapter, "k")]:
                    self.hooks.add(
                        TorchHook(
                            lambda p=patch, i=index, n=name: p.wrapper.inner.to_k_ip[
                                i
                            ].register_forward_hook(p.wrapper.capture(n))
                        )
                    )

    def zero_weight_layers(self) -> set[str]:
        """Source layers that recorded from keys projected here: the adapter's scale there was 0."""
        return {
            patch.wrapper.name
            for patch in self.processors
            if patch.wrapper is not None and patch.wrapper.zero_weight
        }

    def _on_unet_call(self, _module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.session.begin_unet_call(sample.shape[0], tuple(sample.shape[-2:]))
