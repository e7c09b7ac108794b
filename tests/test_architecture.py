"""The dependency direction of docs/architecture.md, checked on the source's imports.

Every import in src/rgemma (module level or inside a function) is read with
``ast``; an import against the documented direction, or a cycle between
modules, fails with the offending import named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "rgemma"

# layer -> the layers it may import (its own included)
ALLOWED = {
    "core": {"core"},
    "io": {"core", "io"},
    "inference": {"core", "io", "inference"},
    "training": {"core", "io", "training"},
    "serving": {"core", "io", "inference", "serving"},
    "evaluation": {"core", "io", "inference", "evaluation"},
    "cli": {"core", "io", "inference", "training", "serving", "evaluation", "cli", "facade"},
    "facade": {"core", "io", "facade"},
}
SUBPACKAGES = ("io", "inference", "training", "serving", "evaluation", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "rgemma":
        return "facade"
    if parts[1] == "__main__":
        return "cli"
    return parts[1] if parts[1] in SUBPACKAGES else "core"


def is_package(module: str) -> bool:
    return (SRC / module.replace(".", "/") / "__init__.py").is_file()


def imported_modules(path: Path, module: str) -> list[tuple[str, int]]:
    """(rgemma module imported, line) for every import of rgemma code in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("rgemma")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("rgemma"):
                continue
            for alias in node.names:  # `from rgemma.io import checkpoint` names a module
                sub = f"{base}.{alias.name}"
                target = (
                    sub
                    if (is_package(sub) or (SRC / (sub.replace(".", "/") + ".py")).is_file())
                    else base
                )
                found.append((target, node.lineno))
    return found


def import_graph() -> dict[str, list[tuple[str, int]]]:
    return {
        module_name(p): imported_modules(p, module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))
    }


def test_every_module_has_a_layer():
    graph = import_graph()
    assert "rgemma.model" in graph and "rgemma.cli.generate" in graph
    assert {layer(m) for m in graph} == set(ALLOWED)


def test_imports_follow_the_documented_direction():
    bad = []
    for module, imports in import_graph().items():
        for target, line in imports:
            if layer(target) not in ALLOWED[layer(module)]:
                bad.append(
                    f"{module}:{line} imports {target} "
                    f"({layer(module)} may not import {layer(target)})"
                )
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {
        m: sorted({t for t, _ in imports if t != m and t in import_graph_keys()})
        for m, imports in import_graph().items()
    }
    cycles = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t) :] + [t]))
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def import_graph_keys() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize(
    "source, message",
    [
        ("from rgemma.io import checkpoint\n", "rgemma.model:1 imports rgemma.io.checkpoint"),
        (
            "def f():\n    from rgemma.serving import app\n",
            "rgemma.model:2 imports rgemma.serving.app",
        ),
    ],
)
def test_the_check_catches_an_upward_import(source, message, tmp_path, monkeypatch):
    """The checker itself: an import from the core into io (also inside a function) fails."""
    fake = tmp_path / "model.py"
    fake.write_text(source)
    imports = imported_modules(fake, "rgemma.model")
    bad = [
        f"rgemma.model:{line} imports {t}" for t, line in imports if layer(t) not in ALLOWED["core"]
    ]
    assert bad == [message]


def test_help_does_not_import_torch():
    """Every verb's parser is built by `rgemma --help`; none may import torch (or the
    server's and lm-eval's libraries) at module level."""
    import subprocess
    import sys

    code = (
        "import sys; from rgemma.cli import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'fastapi', 'numpy', 'lm_eval', 'pydantic') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
