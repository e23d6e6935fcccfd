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

from monkey.hosts import a1111, a1111_ui, controlnet_backend, forge  # noqa: E402


def backend(p) -> a1111.IPBackend:
    """Forge (and reForge) bring their own IP-Adapter; A1111 has sd-webui-controlnet's."""
    return forge.BACKEND if forge.is_forge(p) else controlnet_backend.BACKEND


class MonkeyScript(scripts.Script):
    def title(self) -> str:
        return "MONKEY"

    def show(self, is_img2img: bool):
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool):
        return a1111_ui.build(self, is_img2img)

    def process(self, p, *args):
        a1111.start(p, args, backend(p))

    def process_batch(self, p, *args, **kwargs):
        a1111.before_batch(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        a1111.before_sampling(p)

    def postprocess(self, p, processed, *args):
        a1111.finish(p, processed)


a1111_ui.register_callbacks()
