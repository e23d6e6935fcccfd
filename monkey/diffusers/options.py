"""What ``python -m monkey generate`` and ``evaluate`` share: the settings from the flags, the
pipeline they open, the call they make, one progress bar, and the one-line error."""

from __future__ import annotations

import argparse
from collections.abc import Callable
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


def dtype_for(options: argparse.Namespace) -> str:
    if options.dtype:
        return options.dtype
    return "float16" if str(options.device).startswith("cuda") else "float32"


def open_pipeline(options: argparse.Namespace, img2img: bool = False) -> Any:
    from .files import load_pipeline, set_scheduler

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
