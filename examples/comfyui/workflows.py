"""The example ComfyUI workflows, written in both of ComfyUI's formats from one description.

``python examples/comfyui/workflows.py`` rewrites the ``*.json`` files beside it:
``<name>.api.json`` (the API format: ``POST /prompt``, or *Load* in ComfyUI) and ``<name>.json``
(the UI format: drag it into ComfyUI's page). ``benchmarks/comfyui_check.py`` builds its
workflows with the same ``Graph``. Model file names are the ones ComfyUI_IPAdapter_plus's README
asks for; rename them to what your ``models/`` folders hold.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from monkey.comfyui.inputs import monkey_inputs  # noqa: E402

KSAMPLER_WIDGETS = ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"]
# Widget inputs of each node class in ComfyUI's order (``widgets_values`` of the UI format; a
# seed widget is followed by its ``control_after_generate`` value).
WIDGETS: dict[str, list[str]] = {
    "CheckpointLoaderSimple": ["ckpt_name"],
    "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "KSampler": KSAMPLER_WIDGETS,
    "VAEDecode": [],
    "VAEEncode": [],
    "SaveImage": ["filename_prefix"],
    "SaveLatent": ["filename_prefix"],
    "LoadImage": ["image", "upload"],
    "CLIPVisionLoader": ["clip_name"],
    "IPAdapterModelLoader": ["ipadapter_file"],
    "IPAdapterAdvanced": [
        "weight",
        "weight_type",
        "combine_embeds",
        "start_at",
        "end_at",
        "embeds_scaling",
    ],
    "MaskToImage": [],
    "MonkeyKSampler": KSAMPLER_WIDGETS + list(monkey_inputs()),
    "MonkeyMask": KSAMPLER_WIDGETS + list(monkey_inputs()),
}
OUTPUTS: dict[str, list[tuple[str, str]]] = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "VAEEncode": [("LATENT", "LATENT")],
    "SaveImage": [],
    "SaveLatent": [],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "CLIPVisionLoader": [("CLIP_VISION", "CLIP_VISION")],
    "IPAdapterModelLoader": [("IPADAPTER", "IPADAPTER")],
    "IPAdapterAdvanced": [("MODEL", "MODEL")],
    "MaskToImage": [("IMAGE", "IMAGE")],
    "MonkeyKSampler": [
        ("LATENT", "LATENT"),
        ("MASK", "MASK"),
        ("pass 1 LATENT", "LATENT"),
        ("status", "STRING"),
    ],
    "MonkeyMask": [("MASK", "MASK"), ("pass 1 LATENT", "LATENT"), ("status", "STRING")],
}


@dataclass
class Graph:
    """A workflow: nodes by id, each ``(class_type, inputs)``; a link is ``[node id, slot]``."""

    nodes: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    def add(self, class_type: str, **inputs: Any) -> str:
        node = str(len(self.nodes) + 1)
        self.nodes[node] = (class_type, inputs)
        return node

    def api(self) -> dict:
        return {
            node: {"class_type": cls, "inputs": inputs}
            for node, (cls, inputs) in self.nodes.items()
        }

    def ui(self) -> dict:
        """The UI format (litegraph): nodes with widget values and typed slots, and links."""
        links, nodes = [], []
        out_links: dict[tuple[int, int], list[int]] = {}
        for node, (_cls, inputs) in self.nodes.items():
            for name, value in inputs.items():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    src, slot = int(value[0]), value[1]
                    kind = OUTPUTS[self.nodes[value[0]][0]][slot][1]
                    links.append([len(links) + 1, src, slot, int(node), None, kind, name])
                    out_links.setdefault((src, slot), []).append(len(links))
        place = _Layout()
        for index, (node, (cls, inputs)) in enumerate(self.nodes.items()):
            widgets = []
            for name in WIDGETS[cls]:
                if name == "upload":
                    widgets.append("image")
                    continue
                widgets.append(inputs[name] if name in inputs else _default(cls, name))
                if name == "seed":
                    widgets.append("fixed")
            linked = [link for link in links if link[3] == int(node)]
            in_slots = []
            for slot, link in enumerate(linked):
                link[4] = slot
                in_slots.append({"name": link[6], "type": link[5], "link": link[0]})
            outputs = [
                {
                    "name": name,
                    "type": kind,
                    "links": out_links.get((int(node), slot), []),
                    "slot_index": slot,
                }
                for slot, (name, kind) in enumerate(OUTPUTS[cls])
            ]
            nodes.append(
                {
                    "id": int(node),
                    "type": cls,
                    "pos": place.next(cls),
                    "size": [COLUMN_WIDTH, HEIGHTS.get(cls, 120)],
                    "flags": {},
                    "order": index,
                    "mode": 0,
                    "inputs": in_slots,
                    "outputs": outputs,
                    "properties": {"Node name for S&R": cls},
                    "widgets_values": widgets,
                }
            )
        return {
            "last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes,
            "links": [link[:6] for link in links], "groups": [], "config": {}, "extra": {},
            "version": 0.4,
        }  # fmt: skip


def _default(cls: str, name: str) -> Any:
    if cls in ("MonkeyKSampler", "MonkeyMask") and name in monkey_inputs():
        return monkey_inputs()[name][1]["default"]
    raise KeyError(f"{cls}.{name} needs a value")


# Left to right: loaders, IPAdapter and prompts, the sampler, outputs.
COLUMNS = {
    "CheckpointLoaderSimple": 0, "CLIPVisionLoader": 0, "IPAdapterModelLoader": 0, "LoadImage": 0,
    "IPAdapterAdvanced": 1, "CLIPTextEncode": 1, "EmptyLatentImage": 1, "VAEEncode": 1,
    "KSampler": 2, "MonkeyKSampler": 2, "MonkeyMask": 2,
    "VAEDecode": 3, "SaveImage": 3, "SaveLatent": 3, "MaskToImage": 3,
}  # fmt: skip
HEIGHTS = {
    "CheckpointLoaderSimple": 100, "LoadImage": 320, "IPAdapterAdvanced": 260,
    "CLIPTextEncode": 160, "EmptyLatentImage": 110, "KSampler": 270, "MonkeyKSampler": 520,
    "MonkeyMask": 520, "SaveImage": 280, "VAEDecode": 50, "MaskToImage": 30,
}  # fmt: skip
COLUMN_WIDTH, GAP = 330, 40


class _Layout:
    def __init__(self) -> None:
        self.tops = [30, 30, 30, 30]

    def next(self, cls: str) -> list[int]:
        column = COLUMNS[cls]
        top = self.tops[column]
        self.tops[column] += HEIGHTS.get(cls, 120) + GAP
        return [30 + column * (COLUMN_WIDTH + GAP), top]


@dataclass
class Models:
    checkpoint: str
    ipadapter: str
    clip_vision: str
    size: int
    images: tuple[str, ...]


SD15 = Models(
    "v1-5-pruned-emaonly.safetensors",
    "ip-adapter_sd15.safetensors",
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
    512,
    ("subject.png", "second_subject.png"),
)
SDXL = Models(
    "sd_xl_base_1.0.safetensors",
    "ip-adapter_sdxl_vit-h.safetensors",
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
    1024,
    ("subject.png", "second_subject.png"),
)


def monkey_workflow(
    models: Models,
    units: int = 1,
    *,
    sampler: str = "MonkeyKSampler",
    prompt: str = "a photo of a dog on a beach, sunset",
    seed: int = 0,
    steps: int = 30,
    batch: int = 1,
    denoise: float = 1.0,
    settings: dict | None = None,
    weight: float = 1.0,
    prefix: str = "monkey",
    save_latent: bool = False,
    decode: bool = True,
) -> Graph:
    """Checkpoint -> ``units`` chained IPAdapterAdvanced nodes -> ``sampler`` (a MONKEY node or
    the stock KSampler; ``units=0``: no IPAdapter) -> decoded image, and MONKEY's MASK saved."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=models.checkpoint)
    model = [ckpt, 0]
    if units:
        vision = g.add("CLIPVisionLoader", clip_name=models.clip_vision)
        adapter = g.add("IPAdapterModelLoader", ipadapter_file=models.ipadapter)
        for unit in range(units):
            image = g.add("LoadImage", image=models.images[unit % len(models.images)])
            applied = g.add(
                "IPAdapterAdvanced", model=model, ipadapter=[adapter, 0], image=[image, 0],
                clip_vision=[vision, 0], weight=weight, weight_type="linear",
                combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only",
            )  # fmt: skip
            model = [applied, 0]
    positive = g.add("CLIPTextEncode", text=prompt, clip=[ckpt, 1])
    negative = g.add("CLIPTextEncode", text="", clip=[ckpt, 1])
    size = models.size
    latent = [g.add("EmptyLatentImage", width=size, height=size, batch_size=batch), 0]
    if denoise < 1.0:  # img2img: the first reference image as the starting image
        start = g.add("LoadImage", image=models.images[0])
        latent = [g.add("VAEEncode", pixels=[start, 0], vae=[ckpt, 2]), 0]
    common = {
        "model": model, "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": [positive, 0], "negative": [negative, 0],
        "latent_image": latent, "denoise": denoise,
    }  # fmt: skip
    node = g.add(sampler, **common, **(settings or {}))
    if sampler == "MonkeyMask":
        mask = g.add("MaskToImage", mask=[node, 0])
        g.add("SaveImage", images=[mask, 0], filename_prefix=f"{prefix}_mask")
        return g
    if decode:
        decoded = g.add("VAEDecode", samples=[node, 0], vae=[ckpt, 2])
        g.add("SaveImage", images=[decoded, 0], filename_prefix=prefix)
    if save_latent:
        g.add("SaveLatent", samples=[node, 0], filename_prefix=f"latents/{prefix}")
    if decode and sampler != "KSampler":
        mask = g.add("MaskToImage", mask=[node, 1])
        g.add("SaveImage", images=[mask, 0], filename_prefix=f"{prefix}_mask")
    return g


EXAMPLES = {
    "monkey_sd15_one_unit": lambda: monkey_workflow(SD15, 1),
    "monkey_sd15_two_units": lambda: monkey_workflow(
        SD15, 2, prompt="a dog and a cat in a garden", settings={"mask_mode": "per_unit"}
    ),
    "monkey_sdxl_one_unit": lambda: monkey_workflow(SDXL, 1),
    "monkey_sdxl_two_units": lambda: monkey_workflow(
        SDXL, 2, prompt="a dog and a cat in a garden", settings={"mask_mode": "per_unit"}
    ),
    "monkey_mask_sd15": lambda: monkey_workflow(SD15, 1, sampler="MonkeyMask"),
}


def write(folder: Path = HERE) -> list[Path]:
    written = []
    for name, make in EXAMPLES.items():
        graph = make()
        for suffix, data in ((".api.json", graph.api()), (".json", graph.ui())):
            path = folder / f"{name}{suffix}"
            path.write_text(json.dumps(data, indent=1) + "\n")
            written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        print(path.relative_to(HERE.parents[1]))  # noqa: T201
