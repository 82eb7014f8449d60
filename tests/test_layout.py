"""The package layout: no import cycles among the project's modules, nothing in `training` imports `hub_cards`,
`modeling` imports only itself (it is the remote code of every release), and the subpackages of `training`
import in one direction only.

Imports are read with `ast` from the source, resolved (relative ones included) to project modules. Every import
counts, module-level or inside a function: an import deferred into a function still ties the two modules together.
The direction table names subpackages; a module of a listed subpackage may import its own subpackage and those
listed below it. Once any listed subpackage exists, every module of `training` must lie in one of them.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "densecl_vit"
SOURCE_DIRS = ("modeling", "training", "hub_cards")
# Subpackages of training, bottom first: each may import itself and those before it, never those after.
LAYERS = ("data", "interop", "engine", "evaluation", "tasks", "experiments")
# (importer prefix, imported prefix) pairs that never occur.
FORBIDDEN = ((f"{PACKAGE}.training", f"{PACKAGE}.hub_cards"),)


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> source file of every module of the package under `root` (the repo root is the package)."""
    modules = {PACKAGE: root / "__init__.py"} if (root / "__init__.py").is_file() else {}
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((PACKAGE, *parts))] = path
    return modules


def _targets(node: ast.ImportFrom | ast.Import, module: str, is_package: bool) -> Iterator[str]:
    """The dotted names an import statement of `module` names: the module and, for `from M import x`, M.x."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = module if is_package else module.rpartition(".")[0]
    if node.level:
        base = ".".join(base.split(".")[: len(base.split(".")) - (node.level - 1)])
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    yield source
    yield from (f"{source}.{alias.name}" for alias in node.names)


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source (nearest existing module for each name)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, name, path.name == "__init__.py"):
                    while target and target not in modules:
                        target = target.rpartition(".")[0]
                    if target and target != name and not name.startswith(target + "."):
                        edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def layer_packages(modules: Mapping[str, Path]) -> set[str]:
    """The `LAYERS` names that are packages of training in `modules` (a flat `training/data.py` is none)."""
    return {
        layer for layer in LAYERS if modules.get(f"{PACKAGE}.training.{layer}", Path()).name == "__init__.py"
    }


def layer_of(module: str, layers: set[str]) -> str | None:
    """The subpackage of training among `layers` that holds `module`, or None."""
    parts = module.split(".")
    if parts[:2] == [PACKAGE, "training"] and len(parts) > 2 and parts[2] in layers:
        return parts[2]
    return None


def layout_violations(modules: Mapping[str, Path]) -> list[str]:
    """One line per import that breaks `FORBIDDEN`, the modeling rule or the direction of `LAYERS`."""
    graph, layers = import_graph(modules), layer_packages(modules)
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            for importer, imported in FORBIDDEN:
                if module.startswith(importer) and (target + ".").startswith(imported + "."):
                    found.append(f"{module} imports {target}")
            if module.startswith(f"{PACKAGE}.modeling") and not target.startswith(f"{PACKAGE}.modeling"):
                found.append(f"{module} imports {target}: modeling imports only modeling")
            here, there = layer_of(module, layers), layer_of(target, layers)
            if here and there and LAYERS.index(there) > LAYERS.index(here):
                found.append(f"{module} imports {target}: {here} sits below {there}")
    return found


def unplaced(modules: Mapping[str, Path]) -> list[str]:
    """Modules of training outside every `LAYERS` subpackage, once the layout has any of them (else none)."""
    layers = layer_packages(modules)
    training = [m for m in modules if m.startswith(f"{PACKAGE}.training.")]
    return [m for m in training if layers and layer_of(m, layers) is None]


# --- the checks on the project -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return project_modules(ROOT)


def test_the_scan_sees_the_project(modules):
    graph = import_graph(modules)
    assert f"{PACKAGE}.modeling.modeling_densecl_vit" in graph
    assert len([m for m in graph if m.startswith(f"{PACKAGE}.training")]) > 20
    assert sum(len(targets) for targets in graph.values()) > 50


def test_no_import_cycles(modules):
    assert find_cycles(import_graph(modules)) == []


def test_imports_point_one_way(modules):
    assert layout_violations(modules) == []


def test_every_training_module_has_a_place_once_there_are_subpackages(modules):
    assert unplaced(modules) == []


def architecture_section(readme: str) -> str | None:
    """The README's "## Architecture" section, up to the next "## " heading; None when there is none."""
    start = readme.find("\n## Architecture\n")
    if start < 0:
        return None
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end >= 0 else len(readme)]


def reading_lists(section: str) -> list[list[str]]:
    """The numbered lists of files of the section ("1. `path`: ..."), in order."""
    lists: list[list[str]] = []
    for line in section.splitlines():
        match = re.match(r"(\d+)\. `([^`]+)`", line)
        if match and match.group(1) == "1":
            lists.append([])
        if match:
            lists[-1].append(match.group(2))
    return lists


def test_the_readme_reading_lists_name_existing_files_within_budget():
    """Pre-training in at most 8 files, segmentation fine-tuning in at most 9, every one of them there."""
    section = architecture_section((ROOT / "README.md").read_text())
    if section is None:
        pytest.skip("the README has no Architecture section")
    lists = reading_lists(section)
    assert [len(files) <= budget for files, budget in zip(lists, (8, 9))] == [True, True]
    assert [path for files in lists for path in files if not (ROOT / path).is_file()] == []
    named = set(re.findall(r"`((?:training|tests)/[\w/.]+)`", section))
    assert [path for path in named if not (ROOT / path).exists()] == []


# --- the checks can fail ---------------------------------------------------------------------------------


def _write(root: Path, files: Mapping[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_through_relative_and_absolute_imports_is_found(tmp_path):
    _write(
        tmp_path,
        {
            "__init__.py": "",
            "training/__init__.py": "",
            "training/a.py": "from .b import f\n",
            "training/b.py": "def f():\n    from densecl_vit.training.sub import c\n",
            "training/sub/__init__.py": "",
            "training/sub/c.py": "from .. import a\n",
            "training/d.py": "from .a import f\n",
        },
    )
    graph = import_graph(project_modules(tmp_path))
    assert find_cycles(graph) == [
        [f"{PACKAGE}.training.a", f"{PACKAGE}.training.b", f"{PACKAGE}.training.sub.c"]
    ]


def test_forbidden_and_upward_imports_are_reported(tmp_path):
    _write(
        tmp_path,
        {
            "training/data/loader.py": "from ..engine.loop import run\n",
            "training/engine/loop.py": "from ...hub_cards import export\nfrom ..data import loader\n",
            "training/engine/__init__.py": "",
            "training/data/__init__.py": "",
            "training/stray.py": "",
            "training/evaluation.py": "from .tasks import x\n",
            "hub_cards/export.py": "from ..training.engine import loop\n",
            "modeling/modeling_x.py": "import densecl_vit.training.data.loader\n",
        },
    )
    modules = project_modules(tmp_path)
    assert layout_violations(modules) == [
        f"{PACKAGE}.modeling.modeling_x imports {PACKAGE}.training.data.loader: modeling imports only modeling",
        f"{PACKAGE}.training.data.loader imports {PACKAGE}.training.engine.loop: data sits below engine",
        f"{PACKAGE}.training.engine.loop imports {PACKAGE}.hub_cards.export",
    ]
    assert unplaced(modules) == [f"{PACKAGE}.training.evaluation", f"{PACKAGE}.training.stray"]


def test_reading_lists_are_read_per_list():
    section = "\n## Architecture\n\n1. `a.py`: x;\n2. `b/c.py`: y.\n\ntext\n\n1. `d.py`: z.\n\n## Next\n"
    assert architecture_section("# t\n" + section + "more") == section[: section.index("\n## Next")]
    assert reading_lists(section) == [["a.py", "b/c.py"], ["d.py"]]
