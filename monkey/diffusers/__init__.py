"""MONKEY for diffusers users: one call, two commands.

* ``monkey_generate(pipe, settings, **pipeline_kwargs)`` runs MONKEY's two passes on a
  Stable Diffusion (XL) pipeline, txt2img or img2img, with IP-Adapters loaded by
  ``pipe.load_ip_adapter`` (``pipeline``);
* ``python -m monkey generate ...`` and ``python -m monkey evaluate ...`` (``cli``, ``evaluate``).

Needs the ``diffusers`` extra (``pip install -e ".[diffusers]"``); the WebUI extension never
imports this package. ``monkey_generate`` is imported on first use, so that the command line
answers ``--help`` and argument mistakes without loading torch and diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..args import MonkeyArgs

if TYPE_CHECKING:
    from .pipeline import MonkeyPipelineOutput, monkey_generate

__all__ = ["MonkeyArgs", "MonkeyPipelineOutput", "monkey_generate"]


def __getattr__(name: str) -> Any:
    if name in ("MonkeyPipelineOutput", "monkey_generate"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
