"""MONKEY: the AlwaysOn script. Thin glue; everything lives in ``monkey/``."""

from __future__ import annotations

from pathlib import Path

from modules import scripts

import monkey

# `monkey` is a generic name: make sure the WebUI imported this extension's package, not another.
_HERE = Path(__file__).resolve().parents[1]
if Path(monkey.__file__).resolve().parent != _HERE / "monkey":
    raise ImportError(
        f"sd-webui-monkey: 'monkey' resolved to {monkey.__file__}, expected {_HERE / 'monkey'}"
    )

from monkey.webui import controlnet, forge, run  # noqa: E402
from monkey.webui import ui as monkey_ui  # noqa: E402
from monkey.webui.backend import IPBackend  # noqa: E402


def backend(p) -> IPBackend:
    """Forge (and reForge) bring their own IP-Adapter; A1111 has sd-webui-controlnet's."""
    return forge.BACKEND if forge.is_forge(p) else controlnet.BACKEND


class MonkeyScript(scripts.Script):
    def title(self) -> str:
        return "MONKEY"

    def show(self, is_img2img: bool):
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool):
        return monkey_ui.build(self, is_img2img)

    def process(self, p, *args):
        run.start(p, args, backend(p))

    def process_batch(self, p, *args, **kwargs):
        run.before_batch(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        run.before_sampling(p)

    def postprocess(self, p, processed, *args):
        run.finish(p, processed)


monkey_ui.register_callbacks()
