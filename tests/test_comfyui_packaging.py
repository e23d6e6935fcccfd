"""One repository, three hosts: ComfyUI's entry point, the A1111/Forge script and pytest keep out
of each other's way, and the example workflows are current."""

from __future__ import annotations

import importlib.util
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "comfyui"


def test_root_init_exports_the_nodes_lazily_relative_to_itself(monkeypatch):
    """Loaded as ComfyUI loads a custom node (a package named by its path); importing it costs
    nothing, the mappings come from this repository's ``monkey`` (not one on ``sys.path``)."""
    import fake_comfyui

    for name, module in fake_comfyui.make_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    name = str(ROOT / "custom_nodes_probe").replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    assert f"{name}.monkey.comfyui.nodes" not in sys.modules
    assert not hasattr(module, "WEB_DIRECTORY")
    mappings = module.NODE_CLASS_MAPPINGS
    assert set(mappings) == {"MonkeyKSampler", "MonkeyMask"}
    assert mappings["MonkeyKSampler"].__module__ == f"{name}.monkey.comfyui.nodes"
    assert module.NODE_DISPLAY_NAME_MAPPINGS["MonkeyKSampler"] == "MONKEY KSampler"
    for key in [k for k in sys.modules if k.startswith(name + ".")]:
        del sys.modules[key]  # this second copy of the package must not outlive the test


def test_nothing_outside_the_comfyui_wing_imports_it():
    imports = re.compile(r"^\s*(from|import)\s+[\w.]*comfyui", re.MULTILINE)
    hits = [
        str(path.relative_to(ROOT))
        for folder in ("scripts", "monkey")
        for path in (ROOT / folder).rglob("*.py")
        if "comfyui" not in path.parts and imports.search(path.read_text())
    ]
    assert hits == []


def test_install_py_does_nothing_under_comfyui_manager(monkeypatch):
    """ComfyUI-Manager runs install.py too, where there is no WebUI ``launch`` module."""
    monkeypatch.setitem(sys.modules, "launch", None)  # import launch -> ImportError
    runpy.run_path(str(ROOT / "install.py"), run_name="__main__")


def test_the_webui_script_never_loads_the_comfyui_wing(request, monkeypatch):
    for name in [
        n for n in sys.modules if n == "monkey.comfyui" or n.startswith("monkey.comfyui.")
    ]:
        monkeypatch.delitem(sys.modules, name)  # loaded by other tests of this session
    request.getfixturevalue("webui")  # loads scripts/sd_webui_monkey.py as the WebUI does
    assert "monkey.webui" in sys.modules or "monkey.hosts.a1111" in sys.modules
    assert not any(n.startswith("monkey.comfyui") or n == "comfy" for n in sys.modules)


def test_importing_the_core_and_the_wing_needs_no_comfyui():
    code = (
        "import sys; import monkey.comfyui.nodes, monkey.comfyui.run; "
        "assert not any(m == 'comfy' or m.startswith(('comfy.', 'nodes', 'latent_preview')) "
        "for m in sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_pyproject_registers_with_the_comfy_registry_at_the_packages_version():
    tomllib = pytest.importorskip("tomllib")
    from monkey.version import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["version"] == __version__
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert "Repository" in project["project"]["urls"]


@pytest.mark.parametrize("name", ["monkey_sd15_one_unit", "monkey_sd15_two_units",
                                  "monkey_sdxl_one_unit", "monkey_sdxl_two_units",
                                  "monkey_mask_sd15"])  # fmt: skip
def test_example_workflows_are_current_in_both_formats(name):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import workflows
    finally:
        sys.path.remove(str(EXAMPLES))
    graph = workflows.EXAMPLES[name]()
    assert json.loads((EXAMPLES / f"{name}.api.json").read_text()) == graph.api()
    ui = json.loads((EXAMPLES / f"{name}.json").read_text())
    assert ui == json.loads(json.dumps(graph.ui()))
    monkey_nodes = [n for n in ui["nodes"] if n["type"].startswith("Monkey")]
    assert len(monkey_nodes) == 1
    adapters = [n for n in ui["nodes"] if n["type"] == "IPAdapterAdvanced"]
    assert len(adapters) == (2 if "two_units" in name else 1)
