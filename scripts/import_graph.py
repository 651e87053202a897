"""The package's import graph: internal imports (module level and in-function), import loops, and imports that go
up the layer order. Standard library only; run from the repository root:

    python scripts/import_graph.py            # summary
    python scripts/import_graph.py --edges    # every internal import, with its line

A loop is a strongly connected component of the graph of every internal import (in-function ones included: an
in-function import that closes a loop still is one). Layers: LAYERS below, lowest first; an import from a module
to a package in a later (higher) layer is "upward". Modules outside LAYERS' packages count as the top layer.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys

PACKAGE = "pal_jax"
# lowest first: a module may import from its own layer or any earlier one
LAYERS = ("core", "data", "model", "weights", "inference", "training", "evaluation")


def module_name(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def modules(root: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(os.path.join(root, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                out[module_name(p, root)] = p
    return out


def resolve(name: str, known: dict) -> str | None:
    """The known module an imported name refers to (the longest known prefix)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(path: str, mod: str, known: dict) -> list[tuple[str, int, bool]]:
    """(target module, line, at module level) for each internal import of one file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    top = {id(n) for n in tree.body}
    for n in tree.body:  # `if TYPE_CHECKING:` / try blocks at the top level count as module level
        for c in ast.walk(n):
            top.add(id(c))
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    inner = {id(c) for f in funcs for c in ast.walk(f) if c is not f}
    out = []
    is_pkg = path.endswith("__init__.py")
    for n in ast.walk(tree):
        names = []
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = mod.split(".")
                parts = parts if is_pkg else parts[:-1]
                parts = parts[:len(parts) - (n.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in n.names] or [base]
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            t = resolve(name, known)
            if t and t != mod:
                out.append((t, n.lineno, id(n) not in inner))
    return out


def sccs(graph: dict[str, set]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node (or a self loop)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) > 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    if len(parts) == 2 and parts[1] in LAYERS:  # the package itself
        return LAYERS.index(parts[1])
    return len(LAYERS)  # top level: pipeline, main, config, ...


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--edges", action="store_true", help="print every internal import")
    args = ap.parse_args()
    known = modules(args.root)
    if not known:
        print(f"no {PACKAGE}/ under {os.path.abspath(args.root)}", file=sys.stderr)
        return 2
    edges = {m: imports(p, m, known) for m, p in sorted(known.items())}
    graph = {m: {t for t, _, _ in e} for m, e in edges.items()}
    loops = sccs(graph)
    # statements, not names: `from pal_jax import a, b` on one line is one import
    n_top = len({(m, line) for m, e in edges.items() for _, line, top in e if top})
    n_inner = len({(m, line) for m, e in edges.items() for _, line, top in e if not top})
    upward = [(m, t, line) for m, e in edges.items() for t, line, _ in e if layer(t) > layer(m)]
    if args.edges:
        for m, e in edges.items():
            for t, line, top in e:
                print(f"{m}:{line} -> {t}{'' if top else '  (in a function)'}")
    print(f"modules: {len(known)}; internal import statements: {n_top} at module level, {n_inner} in functions")
    print(f"import loops (strongly connected components): {len(loops)}")
    for comp in loops:
        print("  " + " <-> ".join(comp))
    print(f"upward imports (layers, lowest first: {', '.join(LAYERS)}, then the top level): {len(upward)}")
    for m, t, line in upward:
        print(f"  {m}:{line} -> {t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
