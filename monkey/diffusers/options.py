"""What ``python -m monkey generate`` and ``evaluate`` share: the settings from the flags, the
checks made before any model loads, the pipeline they open, the call they make, one progress
bar, the one-line error, quiet libraries, and the settings text every PNG carries."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from .. import args as A
from ..args import MonkeyArgs

WEBUI_ONLY = ("enabled", "preview", "preview_pass1", "save_masks")
"""Settings that only mean something in the WebUI (the CLI always runs MONKEY and saves all)."""


class MonkeyCliError(ValueError):
    """A command-line argument that cannot work, said in one line."""


def settings_from(options: argparse.Namespace) -> MonkeyArgs:
    given = {
        name: getattr(options, f"monkey_{name}")
        for name in A.names()
        if name not in WEBUI_ONLY and getattr(options, f"monkey_{name}") is not None
    }
    return MonkeyArgs.from_dict(given, MonkeyArgs(enabled=True))


class Progress:
    """One progress bar over every pipeline run of a command (plain, pass 1, pass 2 ...)."""

    NAMES: ClassVar[dict[str, str]] = {
        "record": "MONKEY pass 1",
        "apply": "MONKEY pass 2",
        "idle": "plain (again)",
    }

    def __init__(self, enabled: bool = True):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm comes with the diffusers extra
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=0, unit="step", dynamic_ncols=True)

    def __call__(self, name: str, done: int, total: int) -> None:
        if self.bar is None:
            return
        if done == 1:  # a new run: the bar grows by its length (pass 1 may end sooner)
            self.bar.total = self.bar.n + total
            self.bar.set_description(self.NAMES.get(name, name))
        self.bar.update(1)

    def callback(self, name: str) -> Callable:
        """A ``callback_on_step_end`` reporting a plain pipeline run."""

        def on_step_end(pipe: Any, index: int, _t: Any, _tensors: dict) -> dict:
            self(name, index + 1, getattr(pipe, "num_timesteps", 0) or 0)
            return {}

        return on_step_end

    def close(self) -> None:
        if self.bar is not None:
            self.bar.total = self.bar.n
            self.bar.refresh()
            self.bar.close()


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a mistake said in one line (``prog: error: ...``) instead of the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# -- checks before any model is loaded ---------------------------------------------------------


def check_sampling(options: argparse.Namespace) -> None:
    """The numbers every command shares, and the device, before anything loads."""
    if options.steps < 1:
        raise MonkeyCliError(f"--steps: at least 1, got {options.steps}")
    for name in ("width", "height"):
        value = getattr(options, name)
        if value is not None and (value < 8 or value % 8):
            raise MonkeyCliError(
                f"--{name}: a positive multiple of 8 (the VAE's scale), got {value}"
            )
    if options.guidance is not None and options.guidance < 0:
        raise MonkeyCliError(f"--guidance: 0 or more, got {options.guidance}")
    check_device(options.device)


def check_device(device: str | None) -> None:
    """``--device``: cpu, cuda[:N] or mps, and one this torch can use."""
    if device is None:
        return
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise MonkeyCliError(f"--device: cpu, cuda, cuda:N or mps, got {device!r}")
    if kind == "cpu":
        return
    import torch

    if kind == "cuda" and not torch.cuda.is_available():
        raise MonkeyCliError(
            f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; "
            "use --device cpu, or install a CUDA build of torch (README: diffusers, Install)"
        )
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise MonkeyCliError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise MonkeyCliError(f"--device {device}: MPS is not available here; use --device cpu")


def resolve_device(options: argparse.Namespace) -> None:
    """No ``--device``: the GPU when torch has one, else the CPU."""
    if options.device is None:
        import torch

        options.device = "cuda" if torch.cuda.is_available() else "cpu"


def check_model_files(options: argparse.Namespace) -> None:
    """``--model``, ``--ip-adapter`` and ``--image-encoder`` exist, are what they should be and
    fit together (headers and configs only)."""
    from .checks import check_model_files as check
    from .files import need

    model = need(options.model, "--model")
    adapters = [need(path, "--ip-adapter", "file") for path in options.ip_adapter]
    encoder = need(options.image_encoder, "--image-encoder", "dir")
    if options.config:
        need(options.config, "--config", "dir")
    check(model, adapters, encoder)


def scheduler_config(options: argparse.Namespace) -> dict[str, Any] | None:
    """``--model``'s (or ``--config``'s) scheduler config, None for a bare checkpoint file."""
    import json

    for folder in (options.model, options.config):
        if folder and Path(folder, "scheduler", "scheduler_config.json").is_file():
            path = Path(folder, "scheduler", "scheduler_config.json")
            return json.loads(path.read_text(encoding="utf-8"))
    return None


def check_schedule(options: argparse.Namespace, strength: float | None = None) -> None:
    """``--steps`` (with img2img's ``--strength``) makes a schedule the plain pipeline can run on
    ``--scheduler``: asked of the scheduler built from the model's config, before any weights."""
    if strength is not None and int(options.steps * strength) < 1:
        steps = math.ceil(1 / strength - 1e-9)
        while int(steps * strength) < 1:
            steps += 1
        raise MonkeyCliError(
            f"--strength {strength} with --steps {options.steps} leaves "
            f"int({options.steps} x {strength}) = 0 steps to run: use --steps {steps} or more, "
            f"or --strength {math.ceil(100 / options.steps) / 100:g} or more"
        )
    config = scheduler_config(options)
    if config is None:
        return
    import diffusers

    from .files import SCHEDULERS
    from .schedule import loop_iterations

    name = SCHEDULERS[options.scheduler] or config.get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None:
        return  # a scheduler this diffusers does not have: loading the model will say so
    scheduler = cls.from_config(config)
    get_timesteps = None
    if strength is not None:
        get_timesteps = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps
    if loop_iterations(scheduler, options.steps, strength, get_timesteps):
        return
    fewest = next(
        (
            n
            for n in range(options.steps + 1, 1001)
            if loop_iterations(scheduler, n, strength, get_timesteps)
        ),
        None,
    )
    advice = f"use --steps {fewest} or more, or" if fewest else "use"
    raise MonkeyCliError(
        f"--scheduler {options.scheduler} ({name}) cannot run --steps {options.steps}: "
        f"{advice} another --scheduler"
    )


def check_layers(pipe: Any, settings: MonkeyArgs) -> None:
    """``--layers`` names IP-Adapter layers of the loaded UNet (said before anything runs)."""
    from ..layers import source_layers
    from .hooks import ip_attention_modules

    try:
        source_layers(settings.layers, list(ip_attention_modules(pipe.unet)))
    except KeyError as error:
        raise MonkeyCliError(f"--layers: {error.args[0]}") from None


# -- quiet by default --------------------------------------------------------------------------


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """No library chatter while a command runs: no warnings (torchvision fallbacks,
    ``torch_dtype``, accelerate advice, float32 casts) and no loading bars from diffusers and
    transformers, only our own progress bar. Everything is put back afterwards (commands also run
    inside tests)."""
    if not enabled:
        yield
        return
    env = {key: os.environ.get(key) for key in ENV}
    before = {}
    for lib in LIBRARIES:
        logging = sys.modules.get(f"{lib}.utils.logging")
        if logging is not None:
            before[lib] = (logging.get_verbosity(), logging.is_progress_bar_enabled())
    for key, value in ENV.items():
        os.environ.setdefault(key, value)  # read by the libraries when first imported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if before:
                hush_libraries()
            yield
        finally:
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
            for lib in LIBRARIES:
                logging = sys.modules.get(f"{lib}.utils.logging")
                if logging is not None:
                    level, bars = before.get(lib, (logging.WARNING, True))
                    logging.set_verbosity(level)
                    if bars:
                        logging.enable_progress_bar()


LIBRARIES = ("diffusers", "transformers")
ENV = {"DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}


def hush_libraries() -> None:
    """diffusers' and transformers' warnings and loading bars off (until ``quiet`` ends)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for logging in (diffusers.utils.logging, transformers.utils.logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def dtype_for(options: argparse.Namespace) -> str:
    if options.dtype:
        return options.dtype
    return "float16" if str(options.device).startswith("cuda") else "float32"


def open_pipeline(options: argparse.Namespace, img2img: bool = False) -> Any:
    from .files import load_pipeline, set_scheduler

    if not getattr(options, "verbose", False):
        hush_libraries()
    pipe = load_pipeline(
        options.model,
        options.ip_adapter,
        options.image_encoder,
        device=options.device,
        dtype=dtype_for(options),
        img2img=img2img,
        config=options.config,
    )
    set_scheduler(pipe, options.scheduler)
    pipe.set_progress_bar_config(disable=True)  # ours counts both passes
    check_layers(pipe, settings_from(options))
    return pipe


def call_kwargs(options: argparse.Namespace, prompt: str, references: list) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "prompt": prompt,
        "ip_adapter_image": references if len(references) > 1 else references[0],
        "num_inference_steps": options.steps,
        "negative_prompt": options.negative_prompt,
    }
    for key, value in (
        ("guidance_scale", options.guidance),
        ("width", options.width),
        ("height", options.height),
    ):
        if value is not None:
            kwargs[key] = value
    return kwargs


def run_params(
    options: argparse.Namespace,
    settings: MonkeyArgs,
    pipe: Any = None,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Every setting of the run, in the WebUI's infotext keys where it has one: what was run
    (the pipeline's guidance, the scheduler class, the image size), not what was asked."""
    from ..version import __version__

    guidance = options.guidance
    if guidance is None and pipe is not None:
        guidance = getattr(pipe, "guidance_scale", None)
    scheduler = options.scheduler
    if pipe is not None:
        scheduler = f"{options.scheduler} ({type(pipe.scheduler).__name__})"
    if size is not None:
        shown = f"{size[0]}x{size[1]}"
    else:
        shown = f"{options.width or 'default'}x{options.height or 'default'}"
    params: dict[str, Any] = {
        "Steps": options.steps,
        "Seed": options.seed,
        "Size": shown,
        "CFG scale": guidance if guidance is not None else "default",
        "Scheduler": scheduler,
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
        params["Init image"] = Path(options.init_image).name
        params["Size from"] = (
            "--width/--height (init image resized)"
            if options.width or options.height
            else "the init image"
        )
    params.update(settings.to_infotext())
    params[A.VERSION_LABEL] = __version__
    return params
