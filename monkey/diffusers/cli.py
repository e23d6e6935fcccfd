"""``python -m monkey generate`` and ``python -m monkey evaluate``.

MONKEY's settings become flags straight from the settings model (``--threshold 0.4``,
``--record-steps all`` ...), with the model's own parsers, ranges and help.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import args as A
from ..args import MonkeyArgs, MonkeyArgsError
from .evaluate import add_evaluate_arguments
from .options import (
    WEBUI_ONLY,
    MonkeyCliError,
    Progress,
    call_kwargs,
    dtype_for,
    open_pipeline,
    settings_from,
)

logger = logging.getLogger("monkey")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


SWEEP = "threshold"
"""The setting ``generate`` sweeps when given several values: one pass 1, a pass 2 per value."""


def add_settings(parser: argparse.ArgumentParser, sweep: bool = False) -> None:
    group = parser.add_argument_group("MONKEY settings (defaults as in the WebUI)")
    defaults = MonkeyArgs()
    for name in A.names():
        if name in WEBUI_ONLY:
            continue
        spec = A.spec(name)
        default = getattr(defaults, name)
        shown = (
            (", ".join(map(str, default)) or "default") if isinstance(default, tuple) else default
        )
        several = sweep and name == SWEEP
        group.add_argument(
            flag(name),
            dest=f"monkey_{name}",
            default=None,
            metavar="VALUE",
            nargs="+" if several else None,
            help=f"{spec.help} Allowed: {spec.allowed}. Default: {shown}."
            + (
                " Several values: pass 1 runs once, pass 2 once per value (its kept maps "
                "reused), and the sheet shows every value's image and mask."
                if several
                else ""
            ),
        )


def add_model(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (local files only)")
    group.add_argument("--model", required=True, help="diffusers model folder or checkpoint file")
    group.add_argument("--config", help="diffusers config folder for a single-file --model")
    group.add_argument(
        "--ip-adapter",
        required=True,
        nargs="+",
        help="IP-Adapter weight file(s) (.bin or .safetensors); the first records the mask "
        "unless --source-unit says otherwise",
    )
    group.add_argument("--image-encoder", required=True, help="CLIP image encoder folder")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    group.add_argument("--scheduler", default="default", help="default, euler, euler_a, ddim, ...")


def add_sampling(parser: argparse.ArgumentParser, steps: int, size: int | None) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--steps", type=int, default=steps)
    group.add_argument("--guidance", type=float, default=None, help="default: the pipeline's")
    group.add_argument("--width", type=int, default=size)
    group.add_argument("--height", type=int, default=size)
    group.add_argument("--seed", type=int, default=123, help="both passes start from this seed")
    group.add_argument("--negative-prompt", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m monkey", description="MONKEY for diffusers pipelines."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate",
        help="one prompt: MONKEY, plain IP-Adapter, masks and a side-by-side sheet",
        description="Write the MONKEY images, their masks, pass 1's images, the plain "
        "IP-Adapter images and a sheet (reference | plain IP-Adapter | MONKEY | mask) whose "
        "PNG text holds every setting.",
    )
    add_model(gen)
    gen.add_argument("--image", required=True, nargs="+", help="reference image per IP-Adapter")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--images", type=int, default=1, help="images per prompt")
    gen.add_argument("--ip-scale", type=float, default=1.0, help="IP-Adapter scale")
    gen.add_argument("--init-image", help="img2img: the image to start from")
    gen.add_argument("--strength", type=float, default=0.75, help="img2img strength")
    gen.add_argument("--out", default="outputs/monkey", help="output folder")
    gen.add_argument("--name", default="monkey", help="file name prefix")
    gen.add_argument("--no-plain", action="store_true", help="skip the plain IP-Adapter image")
    add_sampling(gen, steps=30, size=None)
    add_settings(gen, sweep=True)
    gen.set_defaults(run=run_generate)

    ev = commands.add_parser(
        "evaluate",
        help="the paper's protocol: CLIP-T, CLIP-I and DINO over subjects x location prompts",
        description="For every subject image x location prompt, generate with MONKEY and with "
        "plain IP-Adapter at scale 1.0 and 0.5, score CLIP-T, CLIP-I and DINO as the paper's "
        "code does, and write scores.csv, summary.md and scatter.png. Resumable.",
    )
    add_model(ev)
    add_evaluate_arguments(ev)
    add_sampling(ev, steps=8, size=256)
    add_settings(ev)
    return parser


def run_generate(options: argparse.Namespace) -> int:
    from .files import open_image
    from .pipeline import monkey_generate
    from .sheet import png_info, save_png, sheet

    sweep = getattr(options, f"monkey_{SWEEP}") or [None]
    setattr(options, f"monkey_{SWEEP}", sweep[0])
    settings = settings_from(options)
    sweep = [A.parse_field(SWEEP, value) for value in sweep] if sweep[0] is not None else [None]
    references = [open_image(path, "--image") for path in options.image]
    if len(references) != len(options.ip_adapter):
        raise MonkeyCliError(
            f"--image: one reference image per --ip-adapter ({len(options.ip_adapter)}), "
            f"got {len(references)}"
        )
    init = open_image(options.init_image, "--init-image") if options.init_image else None
    pipe = open_pipeline(options, img2img=init is not None)
    pipe.set_ip_adapter_scale([options.ip_scale] * len(references))
    kwargs = call_kwargs(options, options.prompt, references)
    kwargs["num_images_per_prompt"] = options.images
    if init is not None:
        kwargs.update(image=init, strength=options.strength)

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(options.seed)

    progress = Progress()
    try:
        plain = None
        if not options.no_plain:
            plain = pipe(
                **kwargs, generator=generator(), callback_on_step_end=progress.callback("plain")
            ).images
        outs = []
        for value in sweep:  # the first runs pass 1; the others reuse its kept maps
            tuned = settings if value is None else replace(settings, **{SWEEP: value})
            reuse = outs[0] if outs else None
            outs.append(
                monkey_generate(
                    pipe, tuned, progress=progress, reuse=reuse, **kwargs, generator=generator()
                )
            )
    finally:
        progress.close()
    if len(outs) > 1:
        return _write_sweep(options, settings, sweep, outs, references, plain)
    out = outs[0]

    params = run_params(options, settings)
    folder = Path(options.out)
    written = []
    rows = []
    for index, image in enumerate(out.images):
        info = png_info(options.prompt, {**params, A.STATUS_LABEL: out.statuses[index]})
        stem = f"{options.name}-{index}"
        written.append(save_png(image, folder / f"{stem}.png", info))
        written.append(save_png(out.masks[index], folder / f"{stem}-mask.png"))
        if out.first_images is not None:
            written.append(save_png(out.first_images[index], folder / f"{stem}-pass1.png"))
        if plain is not None:
            written.append(save_png(plain[index], folder / f"{stem}-plain.png"))
        rows.append([references[0], plain[index] if plain else None, image, out.masks[index]])
    grid = sheet(rows, out.images[0].size)
    written.append(
        save_png(grid, folder / f"{options.name}-sheet.png", png_info(options.prompt, params))
    )
    for path in written:
        sys.stdout.write(f"{path}\n")
    for index, text in enumerate(out.statuses):
        logger.info("image %d: %s", index, text)
    return 0


def _write_sweep(options, settings, values, outs, references, plain) -> int:
    """Each value's images and masks (``{name}-{image}-threshold{value}``) and one sheet: per
    image, the reference, plain IP-Adapter, then each value's MONKEY image and mask."""
    from .sheet import png_info, save_png, sheet

    params = run_params(options, settings)
    folder = Path(options.out)
    written, rows = [], []
    for index in range(len(outs[0].images)):
        row = [references[0], plain[index] if plain else None]
        for value, out in zip(values, outs, strict=True):
            info = {**params, A.spec(SWEEP).label: value, A.STATUS_LABEL: out.statuses[index]}
            stem = f"{options.name}-{index}-{SWEEP}{value}"
            written.append(
                save_png(out.images[index], folder / f"{stem}.png", png_info(options.prompt, info))
            )
            written.append(save_png(out.masks[index], folder / f"{stem}-mask.png"))
            row += [out.images[index], out.masks[index]]
        rows.append(row)
    columns = ["reference", "plain IP-Adapter"]
    for value in values:
        columns += [f"MONKEY {SWEEP} {value}", "mask"]
    grid = sheet(rows, outs[0].images[0].size, columns)
    written.append(
        save_png(grid, folder / f"{options.name}-sheet.png", png_info(options.prompt, params))
    )
    for path in written:
        sys.stdout.write(f"{path}\n")
    for value, out in zip(values, outs, strict=True):
        logger.info("%s %s: %s", SWEEP, value, out.statuses[0])
    return 0


def run_params(options: argparse.Namespace, settings: MonkeyArgs) -> dict[str, Any]:
    """Every setting of the run, in the WebUI's infotext keys where it has one."""
    from ..version import __version__

    params: dict[str, Any] = {
        "Steps": options.steps,
        "Seed": options.seed,
        "Size": f"{options.width or 'default'}x{options.height or 'default'}",
        "CFG scale": options.guidance if options.guidance is not None else "default",
        "Scheduler": options.scheduler,
        "Model": Path(options.model).name,
        "IP-Adapter": " + ".join(Path(path).name for path in options.ip_adapter),
        "IP-Adapter scale": getattr(options, "ip_scale", 1.0),
        "Device": options.device,
        "Dtype": dtype_for(options),
    }
    if options.negative_prompt:
        params["Negative prompt"] = options.negative_prompt
    if getattr(options, "init_image", None):
        params["Denoising strength"] = options.strength
    params.update(settings.to_infotext())
    params[A.VERSION_LABEL] = __version__
    return params


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .files import MissingFileError

    try:
        return options.run(options)
    except (MissingFileError, MonkeyArgsError, MonkeyCliError) as error:
        parser.exit(2, f"{parser.prog} {options.command}: error: {error}\n")
    return 1  # pragma: no cover - parser.exit raises
