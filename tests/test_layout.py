"""The architecture, read from the imports: a host-free core, one wing per host, no circles, and
small files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "monkey"
HOSTS = (
    "modules",
    "gradio",
    "diffusers",
    "transformers",
    "launch",
    "comfy",
    "nodes",
    "latent_preview",
)
WINGS = ("webui", "diffusers", "comfyui")
MAX_LINES = 400
LONG_BY_DESIGN = {"monkey/args.py"}  # the declarative settings model: one entry per setting


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


SOURCES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {  # a module's own packages are imported before it, never by it
    name: {
        dep
        for dep in imports(path)
        if dep in SOURCES and dep != name and not name.startswith(dep + ".")
    }
    for name, path in SOURCES.items()
}


ENTRY_POINTS = {"monkey.__main__"}  # `python -m monkey`: hands the command line to its wing


def wing(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else None


@pytest.mark.parametrize("name", [n for n in SOURCES if wing(n) is None and n not in ENTRY_POINTS])
def test_the_core_imports_no_host_and_no_wing(name):
    for dep in imports(SOURCES[name]):
        assert dep.split(".")[0] not in HOSTS, f"{name} imports {dep}"
        assert wing(dep) is None, f"the core module {name} imports the wing module {dep}"


def test_no_wing_imports_another():
    for name, deps in GRAPH.items():
        for dep in deps if name not in ENTRY_POINTS else ():
            assert wing(dep) in (None, wing(name)), f"{name} imports {dep}"


def test_no_import_circles():
    state: dict[str, int] = {}

    def walk(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = [*trail[trail.index(dep) :], dep] if dep in trail else [name, dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep, [*trail, dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            walk(name, [name])


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_files_stay_small(path):
    relative = path.relative_to(ROOT).as_posix()
    if relative in LONG_BY_DESIGN:
        pytest.skip("the declarative settings model")
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{relative} has {lines} lines"


def test_the_layout_is_one_folder_per_host():
    # a folder of stale bytecode (monkey/hosts/__pycache__ after a git pull) is no package
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and any(p.glob("*.py")))
    assert folders == sorted(WINGS)
