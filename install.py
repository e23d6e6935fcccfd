"""Run by the WebUI at start-up. MONKEY needs only what the WebUI itself ships (torch, numpy,
Pillow), so this installs nothing in a working WebUI: it only fills in numpy or Pillow if they
are missing, and never under --skip-install."""

from __future__ import annotations

try:
    import launch
except ImportError:  # ComfyUI-Manager runs install.py too; ComfyUI ships all MONKEY needs
    launch = None

# distribution name -> module name; torch is the WebUI's own and is never installed from here
REQUIREMENTS = {"numpy": "numpy", "Pillow": "PIL"}


def main() -> None:
    if getattr(launch.args, "skip_install", False):
        return
    for package, module in REQUIREMENTS.items():
        if not launch.is_installed(module):
            launch.run_pip(f"install {package}", f"{package} for sd-webui-monkey")


if launch is not None:
    main()
