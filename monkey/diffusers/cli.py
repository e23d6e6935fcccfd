"""``python -m monkey generate`` and ``python -m monkey evaluate``.

MONKEY's settings become flags straight from the settings model (``--threshold 0.4``,
``--record-steps all`` ...), with the model's own parsers, ranges and help. Every mistake the
command can see is said in one line with exit code 2, before any model loads where it can be
(``options.py``, ``checks.py``); torch and diffusers are imported only once the arguments hold.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import args as A
from ..args import MonkeyArgs, MonkeyArgsError
from .evaluate import add_evaluate_arguments
from .files import DTYPES, SCHEDULERS
from .options import (
    WEBUI_ONLY,
    MonkeyCliError,
    OneLineParser,
    Progress,
    call_kwargs,
    check_model_files,
    check_sampling,
    check_schedule,
    open_pipeline,
    quiet,
    resolve_device,
    run_params,
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
    group.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if torch has it)"
    )
    group.add_argument("--dtype", default=None, choices=DTYPES)
    group.add_argument(
        "--scheduler",
        default="default",
        choices=list(SCHEDULERS),
        help="default: the model's own",
    )
    group.add_argument(
        "--verbose", action="store_true", help="show the libraries' warnings and tracebacks"
    )


def add_sampling(parser: argparse.ArgumentParser, steps: int, size: int | None) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--steps", type=int, default=steps)
    group.add_argument("--guidance", type=float, default=None, help="default: the pipeline's")
    group.add_argument("--width", type=int, default=size)
    group.add_argument("--height", type=int, default=size)
    group.add_argument("--seed", type=int, default=123, help="both passes start from this seed")
    group.add_argument("--negative-prompt", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m monkey", description="MONKEY for diffusers pipelines.")
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
    gen.add_argument(
        "--init-image",
        help="img2img: the image to start from; the output has its size, or --width/--height "
        "when given (the init image is resized to them)",
    )
    gen.add_argument("--strength", type=float, default=0.75, help="img2img strength, (0, 1]")
    gen.add_argument("--out", default="outputs/monkey", help="output folder")
    gen.add_argument("--name", default="monkey", help="file name prefix")
    gen.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run of the same --name in --out (refused otherwise)",
    )
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


OUTPUT = r"-(?:\d+(?:-threshold[\d.]+)?(?:-mask|-pass1|-plain)?|sheet)\.png"
"""What ``generate`` writes after ``--name``: ``-<i>.png``, ``-<i>-mask.png`` ... ``-sheet.png``."""


def earlier_outputs(folder: Path, name: str) -> list[Path]:
    """Files of an earlier ``generate --name name`` run in ``folder``."""
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(name) + OUTPUT)
    return sorted(path for path in folder.iterdir() if pattern.fullmatch(path.name))


def check_generate(options: argparse.Namespace) -> tuple[MonkeyArgs, list, Any]:
    """Everything ``generate`` can check before loading a model; its MONKEY settings, reference
    images and init image (None for txt2img)."""
    from .files import open_image

    settings = settings_from(options)
    check_sampling(options)
    if options.images < 1:
        raise MonkeyCliError(f"--images: at least 1, got {options.images}")
    if options.ip_scale < 0:
        raise MonkeyCliError(f"--ip-scale: 0 or more, got {options.ip_scale}")
    if options.init_image and not 0 < options.strength <= 1:
        raise MonkeyCliError(f"--strength: more than 0 and at most 1, got {options.strength}")
    if len(options.image) != len(options.ip_adapter):
        raise MonkeyCliError(
            f"--image: one reference image per --ip-adapter ({len(options.ip_adapter)}), "
            f"got {len(options.image)}"
        )
    references = [open_image(path, "--image") for path in options.image]
    init = init_image(options) if options.init_image else None
    earlier = earlier_outputs(Path(options.out), options.name)
    if earlier and not options.overwrite:
        shown = ", ".join(path.name for path in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise MonkeyCliError(
            f"--out {options.out} already holds a run named {options.name!r} ({shown}): "
            "pass --overwrite to replace it, or another --out or --name"
        )
    check_model_files(options)
    check_schedule(options, options.strength if options.init_image else None)
    return settings, references, init


def init_image(options: argparse.Namespace) -> Any:
    """img2img's start image: at its own size, or resized to ``--width``/``--height``."""
    from PIL import Image

    from .files import open_image

    image = open_image(options.init_image, "--init-image")
    if options.width or options.height:
        width = options.width or round(image.width * options.height / image.height / 8) * 8
        height = options.height or round(image.height * options.width / image.width / 8) * 8
        image = image.resize((max(width, 8), max(height, 8)), Image.LANCZOS)
    return image


def sweep_values(options: argparse.Namespace) -> list:
    """The values of a ``--threshold`` given several (``[None]``: one value or none, a plain
    run); the settings keep the first, so that they check and record as one run's."""
    given = getattr(options, f"monkey_{SWEEP}") or [None]
    setattr(options, f"monkey_{SWEEP}", given[0])
    if len(given) == 1:
        return [None]
    return [A.parse_field(SWEEP, value) for value in given]


def run_generate(options: argparse.Namespace) -> int:
    sweep = sweep_values(options)
    settings, references, init = check_generate(options)
    import torch

    from .pipeline import monkey_generate
    from .sheet import COLUMNS, png_info, save_png, sheet

    resolve_device(options)
    pipe = open_pipeline(options, img2img=init is not None)
    pipe.set_ip_adapter_scale([options.ip_scale] * len(references))
    kwargs = call_kwargs(options, options.prompt, references)
    kwargs["num_images_per_prompt"] = options.images
    if init is not None:  # img2img pipelines take their size from the image
        kwargs.pop("width", None)
        kwargs.pop("height", None)
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

    params = run_params(options, settings, pipe, outs[0].images[0].size)
    folder = Path(options.out)
    for path in earlier_outputs(folder, options.name):  # only with --overwrite (checked)
        path.unlink()

    def info(image: str, status: str | None = None, value: Any = None) -> Any:
        extra = {"Image": image} | ({A.STATUS_LABEL: status} if status else {})
        if value is not None:
            extra[A.spec(SWEEP).label] = value
        return png_info(options.prompt, {**params, **extra})

    written = []
    rows = []
    for index in range(len(outs[0].images)):
        row = [references[0], plain[index] if plain else None]
        for value, out in zip(sweep, outs, strict=True):
            status = out.statuses[index]
            stem = f"{options.name}-{index}" + ("" if value is None else f"-{SWEEP}{value}")
            files = [("", out.images[index], "MONKEY"), ("-mask", out.masks[index], "mask")]
            if out.first_images is not None and value is None:
                files.append(("-pass1", out.first_images[index], "MONKEY pass 1"))
            for suffix, picture, kind in files:
                path = folder / f"{stem}{suffix}.png"
                written.append(save_png(picture, path, info(kind, status, value)))
            row += [out.images[index], out.masks[index]]
        if plain is not None:
            path = folder / f"{options.name}-{index}-plain.png"
            written.append(save_png(plain[index], path, info("plain IP-Adapter")))
        rows.append(row)
    columns = list(COLUMNS)
    if len(sweep) > 1:
        columns = ["reference", "plain IP-Adapter"]
        for value in sweep:
            columns += [f"MONKEY {SWEEP} {value}", "mask"]
    grid = sheet(rows, outs[0].images[0].size, columns)
    written.append(save_png(grid, folder / f"{options.name}-sheet.png", info("sheet")))
    for path in written:
        sys.stdout.write(f"{path}\n")
    for value, out in zip(sweep, outs, strict=True):
        for index, text in enumerate(out.statuses):
            prefix = "" if value is None else f"{SWEEP} {value}, "
            logger.info("%simage %d: %s", prefix, index, text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a mistake ends in one line and exit code 2, Ctrl-C in one line and 130."""
    parser = build_parser()
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .files import MissingFileError

    prefix = f"{parser.prog} {options.command}"
    with quiet(not options.verbose):
        try:
            return options.run(options)
        except (MissingFileError, MonkeyArgsError, MonkeyCliError) as error:
            if options.verbose:
                raise
            parser.exit(2, f"{prefix}: error: {error}\n")
        except KeyboardInterrupt:
            kept: Callable[[], str] | None = getattr(options, "kept", None)
            parser.exit(
                130, f"{prefix}: interrupted; {kept() if kept else 'nothing was written'}\n"
            )
    return 1  # pragma: no cover - parser.exit raises
