"""MONKEY for diffusers users: one call, two commands.

* ``monkey_generate(pipe, settings, **pipeline_kwargs)`` runs MONKEY's two passes on a
  Stable Diffusion (XL) pipeline, txt2img or img2img, with IP-Adapters loaded by
  ``pipe.load_ip_adapter`` (``pipeline``);
* ``python -m monkey generate ...`` and ``python -m monkey evaluate ...`` (``cli``, ``evaluate``).

Needs the ``diffusers`` extra (``pip install -e ".[diffusers]"``); the WebUI extension never
imports this package.
"""

from __future__ import annotations

from ..args import MonkeyArgs
from .pipeline import MonkeyPipelineOutput, monkey_generate

__all__ = ["MonkeyArgs", "MonkeyPipelineOutput", "monkey_generate"]
