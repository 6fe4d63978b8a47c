"""The package's shape, checked: imports flow one way (cli -> recipes -> library), with no cycle, and
`checkpoints/` (how folders are read and written) depends on no capability."""

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_moe"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The hf_moe modules `path` imports (at any depth: lazy imports inside functions count too)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(name for name in [target, *names] if name.startswith("hf_moe"))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("hf_moe"))
    return found


def import_graph() -> nx.DiGraph:
    """hf_moe module -> the hf_moe modules it imports (a package stands for its __init__)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in _imports(path):
            while target not in modules and "." in target:  # `from pkg import function` -> pkg
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                graph.add_edge(name, target)
    return graph


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_sees_imports():
    graph = import_graph()
    assert graph.has_edge("hf_moe.upcycling.upcycle", "hf_moe.checkpoints.writing")
    assert graph.has_edge("hf_moe.cli", "hf_moe.recipes.finetune")  # an import inside a function counts


def test_every_hf_moe_import_resolves_to_a_module_or_its_contents():
    """Lazy imports inside functions run only when their command does: a moved module must not leave one dangling
    (`hf-moe benchmark-stats` imported `hf_moe.recipes.training` after the recipes moved)."""
    import importlib.util

    def is_module(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None  # also `hf_moe.modeling`, the top-level modeling/
        except ModuleNotFoundError:
            return False

    dangling = []
    for path in PACKAGE.rglob("*.py"):
        for target in _imports(path):
            parent = target.rpartition(".")[0]  # `from pkg.module import name`: the module is the parent
            if not is_module(target) and not is_module(parent):
                dangling.append((_module_name(path), target))
    assert not dangling, dangling


def test_no_import_cycle_between_modules():
    graph = import_graph()
    # A package's __init__ re-exports its modules: edges into an __init__ from its own package are not a cycle.
    graph.remove_edges_from([(a, b) for a, b in list(graph.edges) if _in(a, b) and PACKAGE.joinpath(
        *b.split(".")[1:], "__init__.py").exists()])
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, cycles


@pytest.mark.parametrize("package, forbidden", [
    ("hf_moe", "hf_moe.recipes"),  # the library never imports a recipe
    ("hf_moe.checkpoints", "hf_moe.upcycling"),
    ("hf_moe.checkpoints", "hf_moe.export"),
    ("hf_moe.checkpoints", "hf_moe.hub"),
    ("hf_moe.checkpoints", "hf_moe.training"),
    ("hf_moe.checkpoints", "hf_moe.pruning"),
    ("hf_moe.pruning", "hf_moe.export"),
    ("hf_moe.pruning", "hf_moe.upcycling"),
    ("hf_moe.export", "hf_moe.upcycling"),
    ("hf_moe.upcycling", "hf_moe.export"),
])
def test_imports_flow_one_way(package, forbidden):
    graph = import_graph()
    allowed_importers = {"hf_moe.cli", "hf_moe.recipes"} if forbidden == "hf_moe.recipes" else set()
    offending = [(a, b) for a, b in graph.edges if _in(a, package) and _in(b, forbidden) and not _in(a, forbidden)
                 and not any(_in(a, importer) for importer in allowed_importers)]
    assert not offending, offending


def test_modeling_imports_nothing_of_hf_moe():
    for path in (PACKAGE.parent / "modeling").glob("*.py"):
        assert not {name for name in _imports(path) if name.startswith("hf_moe")}, path
