"""The shape of the package, checked: no import cycle, imports at the top outside the CLI, a command line that
loads no deep-learning library to show its help, family names only where the families are, and every
function simple enough to read (ruff's C901 in pyproject.toml)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "sdtune"
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _internal_imports(name: str, tree: ast.Module, known: set[str]) -> list[tuple[str, ast.AST]]:
    """(imported sdtune module, node) for every import in a module, ``from sdtune.x import y`` resolved to
    ``sdtune.x.y`` when that is a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names if a.name.split(".")[0] == "sdtune"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sdtune":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in known else node.module, node))
    return found


def _top_level(tree: ast.Module) -> set[int]:
    """ids of the import nodes at module level (including inside ``if TYPE_CHECKING:`` and try blocks)."""
    top = set()
    for node in tree.body:
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                top.add(id(inner))
    return top


def test_no_import_cycles():
    modules = _modules()
    known = set(modules)
    graph = {name: {m for m, _ in _internal_imports(name, tree, known) if m != name}
             for name, tree in modules.items()}
    # a package imports its own submodules (its __init__ re-exports them); that is not a cycle
    graph = {name: {m for m in deps if not m.startswith(name + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_sdtune_imports_sit_at_the_top_outside_the_cli():
    """Inside functions only the command line (which loads each command's modules when it runs) imports sdtune
    modules; everywhere else they are at the top, so dependencies are visible and cycles cannot hide."""
    modules = _modules()
    late = []
    for name, tree in modules.items():
        if name.startswith("sdtune.cli"):
            continue
        top = _top_level(tree)
        late += [f"{name}: {m}" for m, node in _internal_imports(name, tree, set(modules)) if id(node) not in top]
    assert late == []


def _imported_by(argv: list[str]) -> list[str]:
    code = (f"import sys\nfrom sdtune.cli import main\ncode = main({argv!r})\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return eval(proc.stdout.strip().splitlines()[-1])  # a list literal printed by the child


def test_help_imports_no_deep_learning_library():
    from sdtune.cli import build_parser

    commands = [name for action in build_parser()._subparsers._group_actions for name in action.choices]
    argvs = [["--help"]] + [[c, "--help"] for c in commands] + [["micro", c, "--help"]
                                                              for c in ("subject", "model", "pretrain", "check")]
    for argv in argvs:
        assert _imported_by(argv) == [], argv


def test_family_names_live_in_the_families_package():
    """Outside sdtune/families/ no code names a family, except the command line's defaults and the micro
    model, which is an SD1.x model by construction; the loop, caches, checkpoints, sampling and export ask
    the family."""
    allowed = {"sdtune.cli.data", "sdtune.cli.train", "sdtune.micro.model"}
    named = []
    for name, tree in _modules().items():
        if name.startswith("sdtune.families") or name in allowed:
            continue
        named += [f"{name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in ("sd15", "sd2", "sdxl")]
    # the word itself (as code, comment or docstring): the user spells it in recipes and on the command line
    for path in PACKAGE.rglob("*.py"):
        if "families" not in path.relative_to(PACKAGE).parts:
            named += [f"{path.name}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                      if re.search(r"\bsdxl\b", line)]
    assert named == []


def test_every_function_is_simple_enough():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed beside this Python")
    proc = subprocess.run([str(ruff), "check", "--select", "C901", str(PACKAGE)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
