"""The layers of glmv, checked on the source: imports point down only, front ends use the Backend protocol.

Every module under src/glmv is parsed with ``ast`` (nothing is imported, so this runs in well under a second)
and placed in a layer; an import of a module in a higher layer fails the test with the file, line and names.
Imports inside functions and under ``TYPE_CHECKING`` count too: a lazy import is still a dependency. A new
top-level module must be given a layer here (the failure says so); README "How it is built" lists the map.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "glmv"

LAYERS = ("core", "engine", "backends", "tasks", "front ends")

# Top-level modules by what they are. Subpackages: see PACKAGES.
MODULES = {
    # core: plain data, parsing, media and prompt building; no model, no backend
    "glmv": "core", "errors": "core", "tokens": "core", "settings": "core", "parsing": "core", "prompts": "core",
    "media": "core", "documents": "core", "limits": "core", "outputs": "core", "grounding": "core",
    "render": "core", "score": "core", "history": "core", "tiny": "core", "privacy": "core",
    # loading a checkpoint (quantizing it with the engine's int4 format) is the local backend's business
    "loading": "backends",
    # flows over a backend: ask/ocr/html, refine, the tool loop
    "tasks": "tasks", "tools": "tasks",
    # front ends: turn user input into task/backend calls and render what comes back
    "cli": "front ends", "chat": "front ends", "batch": "front ends", "bench": "front ends",
    "bench_serve": "front ends", "bench_options": "front ends", "resident": "front ends", "__main__": "front ends",
}
PACKAGES = {"engine": "engine", "backends": "backends", "testing": "backends", "server": "front ends",
            "ui": "front ends", "templates": "core"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts == ["glmv"]:
        return MODULES["glmv"]
    if parts[1] in PACKAGES:
        return PACKAGES[parts[1]]
    return MODULES.get(parts[1])


def glmv_imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, module) for every import of a glmv module in a file (or ``text`` as that file), relative imports
    resolved."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8") if text is None else text)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "glmv"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "glmv":
                continue
            for alias in node.names:  # `from . import x` and `from .pkg import mod` name modules
                sub = f"{target}.{alias.name}"
                where = SRC / sub.replace(".", "/")
                is_module = where.with_suffix(".py").exists() or where.is_dir()
                found.append((node.lineno, sub if is_module else target))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in SOURCES if layer_of(module_name(p)) is None]
    assert not unplaced, f"give these modules a layer in tests/test_architecture.py (MODULES): {unplaced}"


def test_imports_point_down_only():
    upward = []
    for path in SOURCES:
        mine = layer_of(module_name(path))
        for line, target in glmv_imports(path):
            theirs = layer_of(target)
            if mine is not None and theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
                upward.append(f"{path.relative_to(SRC)}:{line}: {module_name(path)} ({mine}) "
                              f"imports {target} ({theirs})")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def _mentions_backend(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and "backend" in n.id.lower()
               or isinstance(n, ast.Attribute) and "backend" in n.attr.lower() for n in ast.walk(node))


def test_front_ends_use_the_backend_protocol_not_getattr():
    """Every backend has the whole Backend protocol (backends/base.py), so reading it needs no probing."""
    probes = []
    for path in SOURCES:
        if layer_of(module_name(path)) not in ("tasks", "front ends"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr") and node.args and _mentions_backend(node.args[0])):
                probes.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert not probes, ("front ends probing a backend (add the member to the Backend protocol instead):\n"
                        + "\n".join(probes))


@pytest.mark.parametrize("source, expect", [
    ("from ..cli import main\n", "glmv.cli"),
    ("from ..tools import run_tool_loop\n", "glmv.tools"),
    ("from . import stream\n", "glmv.backends.stream"),
    ("import glmv.ui.app\n", "glmv.ui.app"),
    ("def f():\n    from ..server.app import build_app\n", "glmv.server.app"),
])
def test_the_import_reader_resolves_imports(source, expect):
    """The checker itself: imports from a backend module, relative, absolute or lazy, resolve to the module."""
    assert [t for _, t in glmv_imports(PACKAGE / "backends" / "base.py", source)] == [expect]


def test_the_checker_sees_an_upward_import():
    (line, target), = glmv_imports(PACKAGE / "parsing.py", "from .backends.local import LocalBackend\n")
    assert target == "glmv.backends.local"
    assert LAYERS.index(layer_of(target)) > LAYERS.index(layer_of("glmv.parsing"))


def test_every_backend_has_the_whole_protocol():
    from glmv.backends.base import Backend
    from glmv.backends.local import LocalBackend
    from glmv.backends.remote import RemoteBackend
    from glmv.testing.scripted import ScriptedBackend

    members = {n for n in vars(Backend) if not n.startswith("_")} | set(Backend.__annotations__)
    assert {"default_sampling", "load", "max_batch", "queue_depth", "context_length", "serving_stats"} <= members
    missing = {cls.__name__: sorted(m for m in members if not hasattr(cls, m))
               for cls in (LocalBackend, RemoteBackend, ScriptedBackend)}
    assert missing == {"LocalBackend": [], "RemoteBackend": [], "ScriptedBackend": []}


def test_a_backend_written_to_the_short_protocol_gets_one_clear_error(sample_png):
    import io

    from glmv.backends.base import PROTOCOL_MEMBERS, Backend, check_backend
    from glmv.cli import main
    from glmv.errors import GlmvError
    from glmv.server.app import build_app
    from glmv.testing.scripted import ScriptedBackend

    # the list check_backend uses is the protocol itself
    assert set(PROTOCOL_MEMBERS) == {n for n in vars(Backend) if not n.startswith("_")} | set(Backend.__annotations__)

    class Old:  # what the protocol asked for before this round: generate and close
        name = "old"

        def generate(self, request, cancel=None):
            raise AssertionError("must not be reached")

        def close(self):
            pass

    out, err = io.StringIO(), io.StringIO()
    code = main(["ask", str(sample_png), "-p", "hi", "--no-server"], backend_factory=lambda settings: Old(),
                stdout=out, stderr=err)
    assert code == 2 and out.getvalue() == ""
    assert err.getvalue().startswith("error: the backend Old lacks default_sampling, max_batch")
    assert "subclass glmv.backends.base.BackendBase" in err.getvalue() and err.getvalue().count("\n") == 1
    with pytest.raises(GlmvError, match="the backend Old lacks"):
        build_app(Old())
    scripted = ScriptedBackend("hi")
    assert check_backend(scripted) is scripted


# Flows that must exist once (issue #12): (the core module that owns it, its steps front ends must not redo).
ONCE = {"grounding": ("find_boxes", "draw_boxes", "boxes_json", "boxes_report", "no_boxes_note")}


@pytest.mark.parametrize("owner", sorted(ONCE))
def test_front_ends_call_a_flow_never_redo_its_steps(owner):
    """Front ends turn input into a call of the flow (``grounding.annotate``) and show what comes back; calling
    its steps themselves would be a second copy of the flow that can drift from the first."""
    steps = ONCE[owner]
    offenders = []
    for path in SOURCES:
        if layer_of(module_name(path)) != "front ends":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = getattr(node, "id", None) or getattr(node, "attr", None)
            if isinstance(node, (ast.Name, ast.Attribute)) and name in steps:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} uses {name}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith(owner):
                offenders += [f"{path.relative_to(SRC)}:{node.lineno} imports {a.name}" for a in node.names
                              if a.name in steps]
    assert not offenders, f"the {owner} flow is redone outside {owner}.py: " + "; ".join(offenders)
