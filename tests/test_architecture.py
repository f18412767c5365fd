"""The package's structure: no import circle, at module or package level (docs/architecture.md)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_module_imports_itself_through_others():
    g = _import_graph()
    assert g.cycles(g.graph(ROOT)) == []


def test_no_package_imports_itself_through_others():
    g = _import_graph()
    packages = g.package_edges(g.graph(ROOT))
    nodes = set(packages) | {t for targets in packages.values() for t in targets}
    assert g.cycles({n: packages.get(n, set()) for n in nodes}) == []


def test_low_layers_import_nothing_above_them():
    g = _import_graph()
    edges = g.package_edges(g.graph(ROOT))
    for low, forbidden in {"sdlora.util": {"sdlora.training", "sdlora.adapter", "sdlora.model", "sdlora.lora"},
                           "sdlora.model": {"sdlora.training", "sdlora.adapter", "sdlora.lora", "sdlora.commands"},
                           "sdlora.adapter": {"sdlora.training", "sdlora.lora", "sdlora.commands"}}.items():
        assert not edges.get(low, set()) & forbidden, (low, edges.get(low))
