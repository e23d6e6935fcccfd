"""Pipelines, IP-Adapters and images from local files only, with errors that name the path."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

DTYPES = ("float32", "float16", "bfloat16")
"""``--dtype`` values: torch's dtypes of these names (torch is imported only to load a model)."""


class MissingFileError(FileNotFoundError):
    """A path given on the command line does not exist or is not what it should be."""


def need(path: str | Path, what: str, kind: str = "any") -> Path:
    """``path`` as a Path, or a MissingFileError saying which argument it was and why."""
    found = Path(path).expanduser()
    if not found.exists():
        raise MissingFileError(f"{what} not found: {found}")
    if kind == "file" and not found.is_file():
        raise MissingFileError(f"{what} must be a file: {found}")
    if kind == "dir" and not found.is_dir():
        raise MissingFileError(f"{what} must be a folder: {found}")
    return found


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    found = need(path, what, "file")
    try:
        with Image.open(found) as image:
            return image.convert("RGB")
    except OSError as error:
        raise MissingFileError(f"{what} is not an image: {found} ({error})") from None


def _first(error: BaseException) -> str:
    """An exception's first line, for a one-line message."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _is_xl(model: Path) -> bool:
    if model.is_dir():
        index = need(model / "model_index.json", "model_index.json of --model", "file")
        return "XL" in json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    if model.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(model), framework="pt") as handle:
            return any(key.startswith("conditioner.embedders.1") for key in handle.keys())  # noqa: SIM118 - a safetensors handle, not a dict
    return False


def load_pipeline(
    model: str | Path,
    ip_adapters: Sequence[str | Path],
    image_encoder: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    img2img: bool = False,
    config: str | Path | None = None,
) -> Any:
    """A Stable Diffusion or SDXL pipeline (a diffusers folder, or a single checkpoint file with
    ``config`` its diffusers config folder) with the image encoder and IP-Adapter files loaded
    through diffusers' own ``load_ip_adapter``; nothing is downloaded."""
    import torch
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPVisionModelWithProjection

    model_path = need(model, "--model")
    adapter_paths = [need(path, "--ip-adapter", "file") for path in ip_adapters]
    encoder_path = need(image_encoder, "--image-encoder", "dir")
    torch_dtype = getattr(torch, dtype)
    xl = _is_xl(model_path)
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    if model_path.is_dir():
        try:
            pipe = cls.from_pretrained(model_path, torch_dtype=torch_dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise MissingFileError(
                f"--model {model_path}: not a loadable diffusers model folder ({_first(error)})"
            ) from None
    else:
        extra = {"config": str(need(config, "--config", "dir"))} if config else {}
        try:
            pipe = cls.from_single_file(
                str(model_path), torch_dtype=torch_dtype, local_files_only=True, **extra
            )
        except OSError as error:
            raise MissingFileError(
                f"{model_path}: a single-file checkpoint needs its diffusers config offline; "
                f"pass --config with a diffusers model folder of the same family ({error})"
            ) from None
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            encoder_path, torch_dtype=torch_dtype, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise MissingFileError(
            f"--image-encoder {encoder_path}: not a loadable CLIP image encoder ({_first(error)})"
        ) from None
    pipe.register_modules(image_encoder=encoder)
    # checks.py refuses the usual mismatches before anything loads; this catches the rest
    try:
        pipe.load_ip_adapter(
            [str(path.parent) for path in adapter_paths],
            subfolder=[""] * len(adapter_paths),
            weight_name=[path.name for path in adapter_paths],
            image_encoder_folder=None,
            local_files_only=True,
            # diffusers warns at length when it cannot have its low-memory loading without accelerate
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        names = " ".join(str(path) for path in adapter_paths)
        raise MissingFileError(
            f"--ip-adapter {names}: diffusers cannot load it into --model {model_path} "
            f"({_first(error)})"
        ) from None
    if img2img:
        pipe = (
            StableDiffusionXLImg2ImgPipeline if xl else StableDiffusionImg2ImgPipeline
        ).from_pipe(pipe)
    return pipe.to(device)


SCHEDULERS = {
    "default": None,
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lcm": "LCMScheduler",
}


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the pipeline's scheduler for one of ``SCHEDULERS`` on the same config."""
    if SCHEDULERS[name] is None:
        return
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
