"""The image cross-attention (attn2) layers of SD1.x/SD2.x and SDXL UNets, in one place.

Layers are named by stable module paths: the ldm/sgm path the WebUI's UNet uses
(``output_blocks.4.1.transformer_blocks.0.attn2``) and the diffusers path of the same module
(``up_blocks.1.attentions.1.transformer_blocks.0.attn2``). The table order is IP-Adapter's
order, so a layer's ``number`` is the ``n`` of the weights ``{2n+1}.to_k_ip`` in an official
IP-Adapter file (ControlNet enumerates input, output, then middle blocks; diffusers down, up, mid).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttnLayer:
    ldm: str
    diffusers: str
    number: int
    transformer_index: int
    """ControlNet's advanced-weighting group (one per transformer block of the UNet)."""
    level: int
    """The layer works at the latent size halved ``level`` times (rounding up)."""
    channels: int

    @property
    def ip_key(self) -> str:
        return f"{2 * self.number + 1}.to_k_ip"

    def size(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The layer's (h, w) for a latent of ``latent_hw`` (strided convs round up)."""
        h, w = latent_hw
        for _ in range(self.level):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w


@dataclass(frozen=True)
class ModelFamily:
    name: str
    layers: tuple[AttnLayer, ...]
    default_source: tuple[str, ...]
    """Stable names of the default mask-source layer(s)."""

    def layer(self, name: str) -> AttnLayer:
        """Look a layer up by its ldm or diffusers path (``.processor`` suffix allowed)."""
        key = name.removesuffix(".processor")
        for layer in self.layers:
            if key in (layer.ldm, layer.diffusers):
                return layer
        raise KeyError(
            f"{name!r} is not an attn2 layer of {self.name}; known: {self.layers[0].ldm} ..."
        )

    def names(self) -> tuple[str, ...]:
        return tuple(layer.ldm for layer in self.layers)


def _family(name: str, blocks: list[tuple[str, int, str, int, int, int]], default: tuple[str, ...]):
    """``blocks``: (ldm block, transformer depth, diffusers attention, level, channels, group)."""
    layers = []
    for ldm_block, depth, diff_block, level, channels, group in blocks:
        for index in range(depth):
            layers.append(
                AttnLayer(
                    ldm=f"{ldm_block}.transformer_blocks.{index}.attn2",
                    diffusers=f"{diff_block}.transformer_blocks.{index}.attn2",
                    number=len(layers),
                    transformer_index=group,
                    level=level,
                    channels=channels,
                )
            )
    return ModelFamily(name, tuple(layers), default)


# ControlNet numbers SD1 transformer groups input 0-5, middle 6, output 7-15, while the weight
# order (``number``) puts the middle block last.
SD1 = _family(
    "sd1",
    [
        ("input_blocks.1.1", 1, "down_blocks.0.attentions.0", 0, 320, 0),
        ("input_blocks.2.1", 1, "down_blocks.0.attentions.1", 0, 320, 1),
        ("input_blocks.4.1", 1, "down_blocks.1.attentions.0", 1, 640, 2),
        ("input_blocks.5.1", 1, "down_blocks.1.attentions.1", 1, 640, 3),
        ("input_blocks.7.1", 1, "down_blocks.2.attentions.0", 2, 1280, 4),
        ("input_blocks.8.1", 1, "down_blocks.2.attentions.1", 2, 1280, 5),
        ("output_blocks.3.1", 1, "up_blocks.1.attentions.0", 2, 1280, 7),
        ("output_blocks.4.1", 1, "up_blocks.1.attentions.1", 2, 1280, 8),
        ("output_blocks.5.1", 1, "up_blocks.1.attentions.2", 2, 1280, 9),
        ("output_blocks.6.1", 1, "up_blocks.2.attentions.0", 1, 640, 10),
        ("output_blocks.7.1", 1, "up_blocks.2.attentions.1", 1, 640, 11),
        ("output_blocks.8.1", 1, "up_blocks.2.attentions.2", 1, 640, 12),
        ("output_blocks.9.1", 1, "up_blocks.3.attentions.0", 0, 320, 13),
        ("output_blocks.10.1", 1, "up_blocks.3.attentions.1", 0, 320, 14),
        ("output_blocks.11.1", 1, "up_blocks.3.attentions.2", 0, 320, 15),
        ("middle_block.1", 1, "mid_block.attentions.0", 3, 1280, 6),
    ],
    # The paper's layer: index 15 of the reference code's Attention-module list.
    ("output_blocks.4.1.transformer_blocks.0.attn2",),
)

# SDXL's counterpart of the paper's layer is the middle attention of the first (lowest-resolution)
# cross-attention up block, which in SDXL is a depth-10 transformer; its maps are averaged over
# the whole depth, as the SD1 block has only one transformer.
SDXL = _family(
    "sdxl",
    [
        ("input_blocks.4.1", 2, "down_blocks.1.attentions.0", 1, 640, 0),
        ("input_blocks.5.1", 2, "down_blocks.1.attentions.1", 1, 640, 1),
        ("input_blocks.7.1", 10, "down_blocks.2.attentions.0", 2, 1280, 2),
        ("input_blocks.8.1", 10, "down_blocks.2.attentions.1", 2, 1280, 3),
        ("output_blocks.0.1", 10, "up_blocks.0.attentions.0", 2, 1280, 5),
        ("output_blocks.1.1", 10, "up_blocks.0.attentions.1", 2, 1280, 6),
        ("output_blocks.2.1", 10, "up_blocks.0.attentions.2", 2, 1280, 7),
        ("output_blocks.3.1", 2, "up_blocks.1.attentions.0", 1, 640, 8),
        ("output_blocks.4.1", 2, "up_blocks.1.attentions.1", 1, 640, 9),
        ("output_blocks.5.1", 2, "up_blocks.1.attentions.2", 1, 640, 10),
        ("middle_block.1", 10, "mid_block.attentions.0", 2, 1280, 4),
    ],
    tuple(f"output_blocks.1.1.transformer_blocks.{i}.attn2" for i in range(10)),
)

FAMILIES = (SD1, SDXL)


def family_for(layer_names: set[str] | list[str]) -> ModelFamily | None:
    """The family whose attn2 layers are exactly ``layer_names`` (ldm or diffusers paths)."""
    found = {name.removesuffix(".processor") for name in layer_names}
    for family in FAMILIES:
        if found in (
            {layer.ldm for layer in family.layers},
            {layer.diffusers for layer in family.layers},
        ):
            return family
    return None


def source_layers(requested: tuple[str, ...], available: list[str]) -> tuple[str, ...]:
    """Resolve the mask-source setting against the layers a model actually has.

    ``requested`` empty means the family default. Names may be given in either convention; they
    come back in the convention of ``available``. Raises ``KeyError`` naming what is missing.
    """
    family = family_for(available)
    wanted = requested or (family.default_source if family else ())
    if not wanted:
        raise KeyError("this UNet is neither SD1.x nor SDXL; name the mask layer(s) explicitly")
    resolved = []
    for name in wanted:
        if name in available:
            resolved.append(name)
            continue
        layer = family.layer(name) if family else None
        twin = (
            next((n for n in (layer.ldm, layer.diffusers) if n in available), None)
            if layer
            else None
        )
        if twin is None:
            raise KeyError(f"mask layer {name!r} is not an IP-Adapter layer of this model")
        resolved.append(twin)
    return tuple(resolved)
