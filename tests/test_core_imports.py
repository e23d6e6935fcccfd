"""The core must import where the WebUI, gradio and diffusers are absent."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in (ROOT / "monkey").glob("*.py")
)


def test_core_modules_import_with_host_packages_blocked():
    script = textwrap.dedent(
        f"""
        import importlib, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("modules", "gradio", "diffusers", "transformers", "launch"):
                    raise ImportError(f"blocked: {{name}}")

        sys.meta_path.insert(0, Block())
        for name in {CORE!r}:
            importlib.import_module(name)
        print("imported", len({CORE!r}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert f"imported {len(CORE)}" in result.stdout
    assert "monkey.session" in CORE and "monkey" in CORE
