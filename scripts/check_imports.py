#!/usr/bin/env python3
"""Check the package's import graph against its layers (docs/architecture.md).

Walks every ``import`` in ``proxy/`` with :mod:`ast` (module level, function level and
``TYPE_CHECKING`` blocks alike: a lazy or type-only import is still a dependency) and
reports, one line each:

* import cycles (a package's ``__init__`` re-exporting its own children is not one);
* a module importing a layer above its own (the table :data:`LAYERS`, bottom first);
* a private name (``_x``) imported from another module;
* a module that no layer claims (so a new module must be placed on purpose).

Exit status 1 when anything is reported. ``--sizes`` also prints lines and modules per
layer. Run by the test suite (tests/test_imports.py).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Layers, bottom first: a module may import its own layer and those below. Modules are
#: placed by the longest matching prefix (``proxy.storage`` covers ``proxy.storage.gc``);
#: a name starting with ``=`` matches only that module.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("vocabulary", ("=proxy", "proxy.reference", "proxy.mediatypes", "proxy.errors", "proxy.untrusted",
                    "proxy.units", "proxy.redact", "proxy.defaults", "proxy.atomicfile",
                    "proxy.logsetup", "proxy.requestnotes", "proxy.bounded", "proxy.results")),
    # policy/ is pure (rules, caps, signature checks over the grammar and the field parsers):
    # the upstreams' settings parse their rules with it
    ("settings", ("proxy.config", "proxy.settings", "proxy.envconfig", "proxy.auth.htpasswd",
                  "proxy.policy")),
    ("drivers and upstream", ("proxy.storage.driver", "proxy.storage.localfs", "proxy.upstream",
                              "proxy.singleflight", "proxy.sharedcache", "proxy.metrics")),
    ("repository", ("proxy.storage", "proxy.layout", "proxy.routing")),
    ("fills", ("proxy.pullthrough.fill", "proxy.pullthrough.ranged", "proxy.pullthrough.fills",
               "proxy.pullthrough.cluster", "proxy.pullthrough.coordination")),
    ("services", ("proxy.pullthrough", "proxy.hosted")),
    ("http", ("proxy.handlers", "proxy.auth", "proxy.tls",
              "proxy.accesslog", "proxy.forwarded", "proxy.stats", "proxy.workerstatus",
              "proxy.timeseries", "proxy.upstreamactivity")),
    ("tools", ("proxy.tools",)),
    ("wiring and commands", ("proxy.app", "proxy.server", "proxy.startup", "proxy.cli",
                             "proxy.cachecli", "proxy.edgecli", "proxy.certs",
                             "proxy.healthcheck", "proxy.clientconfig", "proxy.__main__",
                             "proxy.httpserver", "proxy.debuglisten")),
]


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


def modules(root: Path) -> dict[str, Module]:
    """Every module of the package at ``root``, by dotted name."""
    out: dict[str, Module] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = Module(".".join(parts), path, is_package)
    return out


def imports(mod: Module, mods: dict[str, Module]) -> Iterator[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in ``mod``."""
    tree = ast.parse(mod.path.read_text(), str(mod.path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = mod.name.split(".")
                if not mod.is_package:
                    parts.pop()
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full, None) if full in mods else (base, alias.name)


def owner(name: str, mods: dict[str, Module]) -> str | None:
    """The module of ``mods`` that ``name`` (a module or a name in one) lives in."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def layer_of(name: str) -> int | None:
    best: tuple[int, int] | None = None
    for index, (_label, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.startswith("="):
                if name == prefix[1:]:
                    return index
            elif ((name == prefix or name.startswith(prefix + "."))
                  and (best is None or len(prefix) > best[0])):
                best = (len(prefix), index)
    return None if best is None else best[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    # a package re-exporting its own children is not a cycle worth reporting
    return [c for c in found if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]


def check(root: Path) -> tuple[list[str], dict[str, Module]]:
    mods = modules(root)
    pkg = root.name
    edges: dict[str, set[str]] = {name: set() for name in mods}
    problems: list[str] = []
    for name, mod in mods.items():
        mine = layer_of(name)
        if mine is None:
            problems.append(f"unplaced: {name} is in no layer (add it to LAYERS)")
        for target, imported in imports(mod, mods):
            if target.split(".")[0] != pkg:
                continue
            other = owner(target, mods)
            if other is None or other == name:
                continue
            edges[name].add(other)
            if imported is not None and imported.startswith("_") and not imported.startswith("__"):
                problems.append(f"private: {name} imports {other}.{imported}")
            theirs = layer_of(other)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"upward: {name} ({LAYERS[mine][0]}) imports {other} "
                                f"({LAYERS[theirs][0]})")
    problems.extend("cycle: " + " <-> ".join(c) for c in cycles(edges))
    return problems, mods


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default=str(Path(__file__).parent.parent / "proxy"))
    parser.add_argument("--sizes", action="store_true", help="lines and modules per layer")
    args = parser.parse_args()
    problems, mods = check(Path(args.package))
    for line in problems:
        print(line)
    if args.sizes:
        totals: dict[str, list[int]] = {label: [0, 0] for label, _ in LAYERS}
        for name, mod in mods.items():
            index = layer_of(name)
            label = "unplaced" if index is None else LAYERS[index][0]
            entry = totals.setdefault(label, [0, 0])
            entry[0] += 1
            entry[1] += len(mod.path.read_text().splitlines())
        for label, (count, lines) in totals.items():
            print(f"{label:22} {count:3} modules {lines:6} lines")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
