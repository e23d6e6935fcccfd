"""install.py installs nothing the WebUI already has and honours --skip-install."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[1] / "install.py"


def run_install(monkeypatch, installed: set[str], skip: bool) -> list[str]:
    pip_calls: list[str] = []
    launch = types.ModuleType("launch")
    launch.args = types.SimpleNamespace(skip_install=skip)
    launch.is_installed = lambda name: name in installed
    launch.run_pip = lambda command, desc=None: pip_calls.append(command)
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(INSTALL), run_name="__main__")
    return pip_calls


def test_nothing_is_installed_in_a_working_webui(monkeypatch):
    assert run_install(monkeypatch, {"torch", "numpy", "PIL"}, skip=False) == []


def test_only_what_is_missing_and_never_torch(monkeypatch):
    assert run_install(monkeypatch, {"PIL"}, skip=False) == ["install numpy"]
    assert all("torch" not in call for call in run_install(monkeypatch, set(), skip=False))


@pytest.mark.parametrize("installed", [set(), {"PIL"}], ids=["none", "some"])
def test_skip_install_installs_nothing(monkeypatch, installed):
    assert run_install(monkeypatch, installed, skip=True) == []
