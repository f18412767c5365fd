"""Import graph of the sdlora package: every import (lazy ones included), the cycles among modules, and the edges
between packages.

    python3 scripts/import_graph.py [REPO]                # exit 1 if there is a module cycle
    python3 scripts/import_graph.py [REPO] --type-only    # also count imports under `if TYPE_CHECKING:`

Imports under `if TYPE_CHECKING:` are counted only with --type-only, which lists the cycles they close. They are
left out of the verdict because they never run, and because the one cycle they close is deliberate: the data
package's functions are typed by the config sections they read (`data.buckets`, `data.captions`, `data.sources`
-> `config`), while the config validates data settings with the data package's own tables (image extensions, the
bucket table: `config` -> `data.images`, `data.buckets`). Breaking it would put the types or the tables in the
wrong package; neither import runs at the other's import time.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def modules(repo: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for p in (repo / "sdlora").rglob("*.py"):
        parts = list(p.relative_to(repo).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def graph(repo: Path, type_only: bool = False) -> dict[str, set[str]]:
    """Module -> the modules it imports; `type_only`: imports under `if TYPE_CHECKING:` count too."""
    mods = modules(repo)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                       for b in n.body for x in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in typing_only and not type_only:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = m.split(".") if is_pkg else m.split(".")[:-1]
                if node.level:
                    base = base[: len(base) - (node.level - 1)]
                    absolute = ".".join(base + ([node.module] if node.module else []))
                else:
                    absolute = node.module or ""
                targets = [f"{absolute}.{a.name}" if f"{absolute}.{a.name}" in mods else absolute for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t not in (m, "sdlora"):
                    edges[m].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    out: dict[str, set[str]] = {}
    for m, targets in edges.items():
        for t in targets:
            if top(m) != top(t):
                out.setdefault(top(m), set()).add(top(t))
    return out


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--type-only"]
    type_only = "--type-only" in sys.argv[1:]
    repo = Path(args[0] if args else Path(__file__).resolve().parent.parent).resolve()
    edges = graph(repo)
    found = cycles(edges)
    for comp in found:
        print("cycle:", " <-> ".join(comp))
    print("package edges:")
    for a, b in sorted(package_edges(edges).items()):
        print(f"  {a} -> {', '.join(sorted(b))}")
    print(f"{len(found)} module cycles")
    if type_only:
        typed = [c for c in cycles(graph(repo, type_only=True)) if c not in found]
        for comp in typed:
            print("cycle through a type-only import:", " <-> ".join(comp))
        print(f"{len(typed)} more module cycles counting type-only imports (see the docstring)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
