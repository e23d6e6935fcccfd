"""MONKEY: IP-Adapter subject masks from IP-Adapter's own attention (arXiv 2510.07656).

The core (everything outside ``monkey.hosts``) is pure torch: it never imports the WebUI,
gradio or diffusers.
"""

from .version import __version__

__all__ = ["__version__"]
