"""MONKEY: IP-Adapter subject masks from IP-Adapter's own attention (arXiv 2510.07656).

The core (the modules of this package itself) is pure torch: it never imports the WebUI, gradio,
diffusers or ComfyUI. Each place MONKEY runs is a wing of its own over it: ``monkey.webui``
(AUTOMATIC1111 and Forge) and ``monkey.diffusers`` (the pipeline call and the command line).
"""

from .version import __version__

__all__ = ["__version__"]
