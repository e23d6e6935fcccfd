"""What the command line can tell about its files before loading any model: that each is the kind
of file its argument needs, and that the IP-Adapter fits the model and the image encoder.

Reads only headers and ``config.json`` files (a ``.bin`` IP-Adapter is unpickled, weights only),
so a wrong file is named in one line in a second instead of a traceback after minutes of loading.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import MissingFileError

TEXT_WIDTHS = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
"""Cross-attention (text embedding) width -> the base model family that has it."""
_TO_K_IP = re.compile(r"^ip_adapter\.\d+\.to_k_ip(?:\.0)?\.weight$")


def _family(width: int) -> str:
    name = TEXT_WIDTHS.get(width)
    return f"{width} ({name})" if name else str(width)


def _read_json(path: Path, what: str, expected: str) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(f"{what} {path.parent}: no {path.name}; expected {expected}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MissingFileError(
            f"{what} {path}: unreadable ({error}); expected {expected}"
        ) from None


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a ``.safetensors`` header (8-byte length, then JSON)."""
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > 100_000_000:
            raise ValueError("not a safetensors header")
        header = json.loads(handle.read(length))
    return {key: tuple(value["shape"]) for key, value in header.items() if key != "__metadata__"}


def _torch_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    shapes = {}
    for group, value in state.items():
        if isinstance(value, Mapping):
            for key, tensor in value.items():
                shapes[f"{group}.{key}"] = tuple(getattr(tensor, "shape", ()))
        else:
            shapes[str(group)] = tuple(getattr(value, "shape", ()))
    return shapes


def _torch_magic(path: Path) -> bool:
    """A PyTorch file starts as a zip archive (``PK``) or, in the legacy format, a pickle."""
    with path.open("rb") as handle:
        head = handle.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def adapter_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The IP-Adapter file's tensor shapes (``image_proj.*``, ``ip_adapter.*``), or one line
    saying why ``path`` is not a readable IP-Adapter."""
    safetensors = path.suffix == ".safetensors"
    try:
        shapes = safetensors_shapes(path) if safetensors else _torch_shapes(path)
    except Exception as error:  # any failure to read is the same mistake to the user
        kind = "a .safetensors file" if safetensors else "a PyTorch .bin state dict"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not safetensors and not _torch_magic(path):
            reason = "not a PyTorch file"
        raise MissingFileError(
            f"--ip-adapter {path}: cannot be read as {kind} ({reason[:160]}); "
            "expected an IP-Adapter weight file such as ip-adapter_sd15.bin"
        ) from None
    groups = {key.split(".", 1)[0] for key in shapes}
    if not {"image_proj", "ip_adapter"} <= groups:
        found = ", ".join(sorted(shapes)[:3]) or "nothing"
        raise MissingFileError(
            f"--ip-adapter {path} is not an IP-Adapter: it has no image_proj/ip_adapter weights "
            f"(it holds {found}{', ...' if len(shapes) > 3 else ''})"
        )
    return shapes


def adapter_text_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The text embedding width the adapter's key projections read (768 for SD1.x)."""
    for key, shape in shapes.items():
        if _TO_K_IP.match(key) and len(shape) == 2:
            return int(shape[1])
    return None


def adapter_image_width(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, str] | None:
    """The image embedding width the adapter's projection reads, and which encoder output it is
    (``projection_dim`` for plain IP-Adapters, ``hidden_size`` for Plus ones); None if unknown."""
    plain = shapes.get("image_proj.proj.weight")
    if plain is not None and len(plain) == 2:
        return int(plain[1]), "projection_dim"
    plus = shapes.get("image_proj.proj_in.weight")
    if plus is not None and len(plus) == 2:
        return int(plus[1]), "hidden_size"
    return None


def model_text_width(model: Path) -> int | None:
    """The UNet's ``cross_attention_dim`` from a diffusers model folder (None for a single file)."""
    if not model.is_dir():
        return None
    config = _read_json(
        model / "unet" / "config.json", "--model", "a diffusers model folder with unet/"
    )
    width = config.get("cross_attention_dim")
    return int(width) if isinstance(width, int) else None


def encoder_config(folder: Path) -> dict[str, Any]:
    """The image encoder folder's config, refused unless it is a CLIP vision model."""
    expected = "a CLIP image encoder folder (IP-Adapter's models/image_encoder)"
    config = _read_json(folder / "config.json", "--image-encoder", expected)
    kind = config.get("model_type")
    if kind == "clip":  # a whole CLIP model: its vision tower is the encoder
        config = {**config.get("vision_config", {}), "projection_dim": config.get("projection_dim")}
    elif kind != "clip_vision_model":
        what = ", ".join(config.get("architectures") or []) or kind or "unknown"
        raise MissingFileError(f"--image-encoder {folder} is a {what} model; expected {expected}")
    return config


def check_model_files(model: Path, adapters: list[Path], encoder: Path) -> None:
    """Every ``--ip-adapter`` readable, made for ``--model``'s base and fed by ``--image-encoder``."""
    text = model_text_width(model)
    encoder_cfg = encoder_config(encoder)
    for path in adapters:
        shapes = adapter_shapes(path)
        wants = adapter_text_width(shapes)
        if text is not None and wants is not None and wants != text:
            raise MissingFileError(
                f"--ip-adapter {path} is made for a base model with text width {_family(wants)}; "
                f"--model {model} has {_family(text)}: use the IP-Adapter made for this model"
            )
        image = adapter_image_width(shapes)
        if image is not None:
            width, field = image
            gives = encoder_cfg.get(field)
            if isinstance(gives, int) and gives != width:
                raise MissingFileError(
                    f"--image-encoder {encoder} gives {gives}-wide image embeddings ({field}); "
                    f"--ip-adapter {path} expects {width}: use the image encoder the "
                    "IP-Adapter was trained with"
                )


def check_scorer(folder: Path, what: str) -> None:
    """``--clip`` must be a CLIP model with its processor, ``--dino`` a ViT (DINO ViT-S/16)."""
    if what == "--clip":
        expected = "a CLIP ViT-B/32 folder (model + processor, e.g. openai/clip-vit-base-patch32)"
        kinds = ("clip",)
    else:
        expected = "a DINO ViT-S/16 folder (e.g. facebook/dino-vits16)"
        kinds = ("vit",)
    config = _read_json(folder / "config.json", what, expected)
    kind = config.get("model_type")
    if kind not in kinds:
        raise MissingFileError(
            f"{what} {folder} is a {kind or 'unknown'} model; expected {expected}"
        )
    processor = ("preprocessor_config.json", "processor_config.json")
    if what == "--clip" and not any((folder / name).is_file() for name in processor):
        raise MissingFileError(f"{what} {folder}: no CLIP processor files; expected {expected}")
