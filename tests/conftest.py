from __future__ import annotations

import pytest
import torch
from hypothesis import settings

# CPU-only CI on 2 cores: no per-example deadline, a fixed example budget, reproducible examples.
settings.register_profile("default", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("default")
# `pytest --hypothesis-profile=explore` searches wider with fresh random examples.
settings.register_profile("explore", deadline=None, max_examples=500)


# -- tiny diffusers pipelines -------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: one thread is several times faster than contending for two.
    Modules that build tiny pipelines use it for all their tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the WebUI fixture ----------------------------------------------------------------------------

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def webui(monkeypatch):
    """Fake ``modules.*`` (and gradio) of A1111 v1.10.1 in ``sys.modules``, the extension's script
    loaded from ``scripts/`` as the WebUI loads it; everything is undone after the test."""
    from fake_webui import WebUI, make_modules

    from monkey.kept import STORE

    STORE.clear()  # a server's kept maps: each test starts as a freshly started WebUI
    errors, saved = [], []
    modules = make_modules(errors, saved)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location(
        "sd_webui_monkey.py", ROOT / "scripts" / "sd_webui_monkey.py"
    )
    script_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script_module)
    handle = WebUI(modules, errors, saved)
    handle.script_module = script_module
    yield handle
    from monkey.webui import run

    run.unload()
    STORE.clear()
