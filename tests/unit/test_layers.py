"""The import layers of ``proxy/``: no cycles, each layer imports only what it declares.

Every package's ``__init__.py`` docstring, and every top-level module's docstring, carries a
line ``May import: a, b, c.`` (or ``May import: nothing.``) naming the packages and
top-level modules under ``proxy/`` it may import. :func:`check_layers` reads every module
with :mod:`ast` and collects each import of the package's own modules, wherever it is: at
the top, inside a function, under ``if TYPE_CHECKING:``. It fails on

* an import cycle among modules, shown as a chain of ``file:line`` edges (unless it runs
  through an import already reported as against the layers: that import is the culprit);
* an import its layer did not declare (a module may always import its own package's
  modules, and anything may import ``proxy/__init__.py``, the version);
* a layer with no declaration, or a declaration naming nothing under ``proxy/``, or declared
  layers that loop;
* an import in ``proxy/policy/`` of an I/O library: policy is pure.

Undeclared on purpose: ``cli``, ``check``, ``__main__`` and ``demo`` may import anything,
``emulator`` only itself (it is self-contained). Any of them that has a line is held to it.

Only the modules named are edges, although ``import proxy.a.b`` also runs
``proxy/a/__init__.py``: a cycle through that implied edge leaves a layer and comes back, so
(the declared layers being an order) one of its imports is against the layers and reported;
inside a package, implied edges would make every ``__init__`` that re-exports its submodules
a "cycle".
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "proxy"

# What proxy/policy/ may never import: policy decides, it does no I/O.
IO_LIBRARIES = frozenset(
    {
        "asyncio",
        "aiohttp",
        "httpx",
        "socket",
        "websockets",
        "redis",
        "uvicorn",
        "starlette",
        "subprocess",
    }
)
PURE = "policy"
# Layers without a `May import:` line that need none (None: anything).
UNDECLARED: dict[str, frozenset[str] | None] = {
    "cli": None,
    "check": None,
    "__main__": None,
    "demo": None,
    "emulator": frozenset({"emulator"}),
}
DECLARATION = "May import:"


@dataclass(frozen=True, order=True)
class Import:
    """One imported module: ``source`` (dotted) imports ``target`` at ``file:line``."""

    source: str
    target: str
    file: str
    line: int


def find_modules(root: Path) -> dict[str, Path]:
    """Dotted name → file of every module under ``root`` (a package's file is its ``__init__``)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def is_module(name: str, modules: dict[str, Path]) -> bool:
    return name in modules or any(known.startswith(name + ".") for known in modules)


def imports_in(
    name: str, path: Path, tree: ast.Module, modules: dict[str, Path], shown: str
) -> tuple[list[Import], list[str]]:
    """Every module ``tree`` imports, own or not, at any depth; and what could not be resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[Import] = set()
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(Import(name, alias.name, shown, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level > len(parts):
                    problems.append(f"{shown}:{node.lineno} imports beyond the top of the package")
                    continue
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            for alias in node.names:
                # `from pkg import sub` imports the submodule when there is one, else a name
                # of pkg/__init__.py.
                sub = f"{module}.{alias.name}"
                target = sub if alias.name != "*" and is_module(sub, modules) else module
                found.add(Import(name, target, shown, node.lineno))
    return sorted(found), problems


def declaration(docstring: str | None) -> tuple[str, ...] | str | None:
    """The names of ``May import: a, b.`` (empty for ``nothing``); None if there is no such
    line; a string saying what is wrong if there is one that does not read."""
    if not docstring or DECLARATION not in docstring:
        return None
    text = docstring.split(DECLARATION, 1)[1]
    text = re.split(r"\.(\s|$)|\n\s*\n", text, maxsplit=1)[0]  # to the sentence's end
    text = " ".join(re.sub(r"\([^)]*\)", "", text).split())
    if text == "nothing":
        return ()
    names = tuple(part.strip() for part in text.split(","))
    if not all(n.isidentifier() for n in names):
        return f"cannot read `{DECLARATION} {text}.`: want `{DECLARATION} a, b, c.` or `nothing`"
    return names


def layer_of(module: str) -> str | None:
    """``proxy.policy.headers`` → ``policy``; ``proxy.cli`` → ``cli``; ``proxy`` → None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def find_cycles(edges: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Import cycles as node lists (first node not repeated): per strongly connected set of
    modules, the shortest cycle through each of its modules, each cycle once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, {})):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(edges):
        if node not in index:
            connect(node)

    cycles: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for component in components:
        if len(component) == 1:
            (only,) = component
            if only not in edges.get(only, {}):
                continue
        for start in sorted(component):
            came_from: dict[str, str] = {}
            queue = deque([start])
            while queue:  # breadth first: the shortest way back to start
                node = queue.popleft()
                if start in edges.get(node, {}) and (node != start or not came_from):
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    cycle = path[::-1]
                    first = cycle.index(min(cycle))
                    key = tuple(cycle[first:] + cycle[:first])
                    if key not in seen:
                        seen.add(key)
                        cycles.append(list(key))
                    break
                for nxt in sorted(edges.get(node, {})):
                    if nxt in component and nxt != start and nxt not in came_from:
                        came_from[nxt] = node
                        queue.append(nxt)
    return sorted(cycles)


def check_layers(root: Path) -> list[str]:
    """Every problem with the imports of the package at ``root``, one line each."""
    package = root.name
    modules = find_modules(root)
    shown = {name: path.relative_to(root.parent).as_posix() for name, path in modules.items()}
    problems: list[str] = []
    imports: list[Import] = []
    trees: dict[str, ast.Module] = {}
    for name, path in modules.items():
        try:
            tree = trees[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as error:
            problems.append(f"{shown[name]}:{error.lineno}: cannot parse: {error.msg}")
            continue
        found, unresolved = imports_in(name, path, tree, modules, shown[name])
        imports += found
        problems += unresolved

    def own(target: str) -> bool:
        return target == package or target.startswith(package + ".")

    # What each layer may import.
    layers = sorted({layer for name in modules if (layer := layer_of(name)) is not None})
    may: dict[str, tuple[str, ...] | None] = {}
    declared: dict[str, tuple[str, ...]] = {}
    for layer in layers:
        home = trees.get(f"{package}.{layer}")
        if home is None and f"{package}.{layer}" in modules:
            may[layer] = None  # it did not parse: said above
            continue
        names = None if home is None else declaration(ast.get_docstring(home))
        where = shown.get(f"{package}.{layer}", f"{package}/{layer}/")
        if isinstance(names, str):
            problems.append(f"{where}: {names}")
            may[layer] = ()
        elif names is not None:
            unknown = [n for n in names if n not in layers]
            if unknown:
                problems.append(
                    f"{where}: `{DECLARATION}` names {', '.join(unknown)}: "
                    f"no such package or module under {package}/"
                )
            may[layer] = declared[layer] = names
        elif layer in UNDECLARED:
            allowed = UNDECLARED[layer]
            may[layer] = None if allowed is None else tuple(sorted(allowed))
        else:
            problems.append(
                f"{where}: {layer} has no `{DECLARATION}` line in its docstring: "
                "declare what it may import"
            )
    layer_edges = {
        layer: {n: [] for n in below if n != layer and n in declared}
        for layer, below in declared.items()
    }
    for loop in find_cycles(layer_edges):
        steps = [f"{a} may import {b}" for a, b in zip(loop, loop[1:] + loop[:1], strict=True)]
        problems.append("declared layers loop: " + ", ".join(steps))

    # Each import against its layer, the pure layer's imports, modules that do not exist.
    edges: dict[str, dict[str, list[int]]] = {name: {} for name in modules}
    upward: set[tuple[str, str]] = set()  # the edges reported as against the layers
    for imp in imports:
        source_layer = layer_of(imp.source)
        if not own(imp.target):
            top = imp.target.split(".")[0]
            if source_layer == PURE and top in IO_LIBRARIES:
                problems.append(
                    f"{imp.file}:{imp.line} imports {imp.target} ({PURE} is pure: no I/O)"
                )
            continue
        if not is_module(imp.target, modules):
            problems.append(f"{imp.file}:{imp.line} imports {imp.target}: no such module")
        else:
            edges[imp.source].setdefault(imp.target, []).append(imp.line)
        target_layer = layer_of(imp.target)
        if imp.target == package or target_layer == source_layer:
            continue
        if source_layer is None:
            upward.add((imp.source, imp.target))
            problems.append(
                f"{imp.file}:{imp.line} imports {imp.target} ({package}/__init__.py may import "
                f"nothing of {package}: everything may import it)"
            )
            continue
        allowed = may.get(source_layer)
        if source_layer not in may or allowed is None or target_layer in allowed:
            continue  # undeclared (reported once above), or free
        upward.add((imp.source, imp.target))
        problems.append(
            f"{imp.file}:{imp.line} imports {imp.target} "
            f"({source_layer} may import: {', '.join(allowed) or 'nothing'})"
        )

    # Cycles without the imports reported above: a cycle through one of them goes when it
    # goes (or shows here once it is declared instead), and one can close dozens.
    for source, target in upward:
        edges[source].pop(target, None)
    for cycle in find_cycles(edges):
        hops = [
            f"{shown[a]}:{','.join(map(str, sorted(set(edges[a][b]))))}"
            for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)
        ]
        problems.append("import cycle: " + " → ".join([*hops, shown[cycle[0]]]))
    return problems


# ---------------------------------------------------------------------------------------------


def write_tree(base: Path, files: dict[str, str]) -> Path:
    """A synthetic ``proxy/`` under ``base``: a valid layered tree with ``files`` on top."""
    tree = {
        "proxy/__init__.py": '"""The version."""\n__version__ = "0"\n',
        "proxy/errors.py": '"""Errors.\n\nMay import: nothing (every layer raises these).\n"""\n',
        "proxy/policy/__init__.py": '"""Rules.\n\nMay import: errors.\n"""\n',
        "proxy/policy/rules.py": "from ..errors import *\nfrom .. import __version__\n",
        "proxy/observe/__init__.py": '"""Logs.\n\nMay import: errors, policy.\n"""\n',
        "proxy/observe/logs.py": "from ..errors import *\n",
        "proxy/config/__init__.py": (
            '"""Settings.\n\nMay import: errors, policy,\n    observe.\n"""\n'
            "from .settings import Settings\n"
        ),
        "proxy/config/settings.py": "import proxy.errors\nfrom proxy.policy.rules import x\n",
        "proxy/cli.py": '"""The command."""\nfrom .config import Settings\nfrom . import errors\n',
        "proxy/emulator/__init__.py": '"""Self-contained."""\nfrom .app import App\n',
        "proxy/emulator/app.py": "import json\nimport proxy\n",
        **files,
    }
    for name, text in tree.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return base / "proxy"


def test_the_real_tree_keeps_its_layers() -> None:
    problems = check_layers(ROOT)
    assert not problems, "\n" + "\n".join(problems)


def test_a_valid_synthetic_tree_passes(tmp_path: Path) -> None:
    assert check_layers(write_tree(tmp_path, {})) == []


def test_every_import_is_resolved_to_the_module_it_imports(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "proxy/limits/__init__.py": (
                '"""May import: errors, policy, observe, config."""\ndef create_limiter(): ...\n'
            ),
            "proxy/limits/memory.py": """\
                from typing import TYPE_CHECKING
                from ..limits import create_limiter
                from ..observe import logs
                from .. import errors, __version__
                from . import create_limiter as again
                import proxy.config.settings
                from proxy.policy.rules import x
                if TYPE_CHECKING:
                    from ..config import settings, Settings
                def later():
                    from ..policy import rules
                    import proxy.observe
            """,
        },
    )
    modules = find_modules(root)
    path = modules["proxy.limits.memory"]
    found, problems = imports_in(
        "proxy.limits.memory", path, ast.parse(path.read_text()), modules, "m"
    )
    assert problems == []
    assert [(i.target, i.line) for i in found if i.target.startswith("proxy")] == [
        ("proxy", 4),
        ("proxy.config", 9),
        ("proxy.config.settings", 6),
        ("proxy.config.settings", 9),
        ("proxy.errors", 4),
        ("proxy.limits", 2),
        ("proxy.limits", 5),
        ("proxy.observe", 12),
        ("proxy.observe.logs", 3),
        ("proxy.policy.rules", 7),
        ("proxy.policy.rules", 11),
    ]


def test_a_layer_violation_names_the_file_and_line(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {"proxy/policy/rules.py": "import json\n\nfrom ..observe.logs import log\n"},
    )
    assert check_layers(root) == [
        "proxy/policy/rules.py:3 imports proxy.observe.logs (policy may import: errors)"
    ]


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("import proxy.observe.logs\n", "proxy.observe.logs"),
        ("from proxy.observe import logs\n", "proxy.observe.logs"),
        ("def f():\n    from ..observe import logs\n", "proxy.observe.logs"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import observe\n",
            "proxy.observe",
        ),
    ],
)
def test_a_violation_is_found_in_every_form(tmp_path: Path, text: str, target: str) -> None:
    root = write_tree(tmp_path, {"proxy/policy/rules.py": text})
    line = text.count("\n")
    assert check_layers(root) == [
        f"proxy/policy/rules.py:{line} imports {target} (policy may import: errors)"
    ]


def test_a_top_level_module_is_held_to_its_line_and_nothing_is_nothing(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path, {"proxy/errors.py": '"""May import: nothing."""\nfrom .emulator import app\n'}
    )
    assert check_layers(root) == [
        "proxy/errors.py:2 imports proxy.emulator.app (errors may import: nothing)"
    ]


def test_the_packages_own_init_imports_nothing_of_it(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"proxy/__init__.py": "from . import errors\n"})
    assert check_layers(root) == [
        "proxy/__init__.py:1 imports proxy.errors "
        "(proxy/__init__.py may import nothing of proxy: everything may import it)"
    ]


def test_an_undeclared_layer_must_declare(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "proxy/upstream/__init__.py": '"""No line."""\n',
            "proxy/upstream/x.py": "from .. import cli\n",
        },
    )
    assert check_layers(root) == [
        "proxy/upstream/__init__.py: upstream has no `May import:` line in its docstring: "
        "declare what it may import"
    ]


def test_the_emulator_imports_only_itself_and_demo_is_held_to_a_line(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "proxy/emulator/app.py": "from ..errors import X\n",
            "proxy/demo/__init__.py": '"""May import: emulator."""\nfrom ..config import X\n',
        },
    )
    assert check_layers(root) == [
        "proxy/demo/__init__.py:2 imports proxy.config (demo may import: emulator)",
        "proxy/emulator/app.py:1 imports proxy.errors (emulator may import: emulator)",
    ]


def test_declarations_that_do_not_read_or_name_nothing_or_loop_fail(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "proxy/errors.py": '"""May import: policy and config."""\n',
            "proxy/policy/__init__.py": '"""May import: errors, observe, phases."""\n',
        },
    )
    assert check_layers(root) == [
        "proxy/errors.py: cannot read `May import: policy and config.`: "
        "want `May import: a, b, c.` or `nothing`",
        "proxy/policy/__init__.py: `May import:` names phases: no such package or module "
        "under proxy/",
        "declared layers loop: observe may import policy, policy may import observe",
    ]


def test_a_module_that_does_not_parse_fails(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"proxy/policy/__init__.py": '"""May import: errors."""\ndef (:\n'})
    (problem,) = check_layers(root)
    assert problem.startswith("proxy/policy/__init__.py:2: cannot parse: ")


def test_an_import_of_a_module_that_is_not_there_fails(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"proxy/config/settings.py": "def f():\n    from .gone import x\n"})
    assert check_layers(root) == [
        "proxy/config/settings.py:2 imports proxy.config.gone: no such module"
    ]


CYCLES = {
    "a function-level import": "def load():\n    from .settings import Settings\n",
    "an if TYPE_CHECKING import": (
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .settings import S\n"
    ),
}


@pytest.mark.parametrize("text", CYCLES.values(), ids=CYCLES.keys())
def test_a_hidden_cycle_fails_naming_both_edges(tmp_path: Path, text: str) -> None:
    root = write_tree(
        tmp_path,
        {
            "proxy/config/settings.py": "import json\nfrom . import loader\n",
            "proxy/config/loader.py": text,
        },
    )
    line = text.count("\n")
    assert check_layers(root) == [
        f"import cycle: proxy/config/loader.py:{line} → proxy/config/settings.py:2 "
        "→ proxy/config/loader.py"
    ]


def test_a_cycle_closed_by_an_upward_import_is_reported_as_that_import(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "proxy/observe/logs.py": "from ..policy import rules\n",
            "proxy/policy/rules.py": "def f():\n    from ..observe import logs\n",
        },
    )
    assert check_layers(root) == [
        "proxy/policy/rules.py:2 imports proxy.observe.logs (policy may import: errors)"
    ]


def test_each_cycle_is_reported_once_with_every_line_of_an_edge(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "proxy/config/settings.py": "from . import loader\nfrom .loader import y\n",
            "proxy/config/loader.py": "def f():\n    from .settings import x\n",
            "proxy/observe/logs.py": "from . import trace\n",
            "proxy/observe/trace.py": "from . import metrics\n",
            "proxy/observe/metrics.py": "from .logs import x\n",
            "proxy/cli.py": "from . import cli\n",
        },
    )
    assert check_layers(root) == [
        "import cycle: proxy/cli.py:1 → proxy/cli.py",
        "import cycle: proxy/config/loader.py:2 → proxy/config/settings.py:1,2 "
        "→ proxy/config/loader.py",
        "import cycle: proxy/observe/logs.py:1 → proxy/observe/trace.py:1 "
        "→ proxy/observe/metrics.py:1 → proxy/observe/logs.py",
    ]


@pytest.mark.parametrize(
    ("text", "module", "line"),
    [
        ("import asyncio\n", "asyncio", 1),
        ("def f():\n    import subprocess\n", "subprocess", 2),
        ("from starlette.types import Scope\n", "starlette.types", 1),
        ("import typing\nif typing.TYPE_CHECKING:\n    import aiohttp.web\n", "aiohttp.web", 3),
        ("from socket import socket\n", "socket", 1),
    ],
)
def test_policy_importing_io_fails(tmp_path: Path, text: str, module: str, line: int) -> None:
    root = write_tree(tmp_path, {"proxy/policy/rules.py": text})
    assert check_layers(root) == [
        f"proxy/policy/rules.py:{line} imports {module} (policy is pure: no I/O)"
    ]


def test_io_outside_policy_is_fine(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"proxy/observe/logs.py": "import asyncio\nimport socket\n"})
    assert check_layers(root) == []
