"""The package's shape, checked: imports flow one way (cli -> recipes -> library) with no cycle between modules nor
between packages, `checkpoints/` (how folders are read and written) depends on no capability, the Hub side and the
training side do not import each other, and only the `__init__.py` files docs/layout.md names export names."""

import ast
import importlib
import re
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_moe"
MODELING = ROOT / "modeling"  # installed as `hf_moe.modeling`
LAYOUT = ROOT / "docs" / "layout.md"


def _module_name(path: Path) -> str:
    if path.is_relative_to(MODELING):
        parts = ("hf_moe", "modeling", *path.relative_to(MODELING).with_suffix("").parts)
    else:
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """Every hf_moe module by name, `hf_moe.modeling` (the top-level modeling/ folder) included."""
    return {_module_name(path): path for path in [*PACKAGE.rglob("*.py"), *MODELING.glob("*.py")]}


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
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in _imports(path):
            while target not in modules and "." in target:  # `from pkg import function` -> pkg
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                graph.add_edge(name, target)
    return graph


def package_of(module: str) -> str:
    """The unit the package rules speak of: a folder of hf_moe (`hf_moe.hub`, `hf_moe.modeling`, ...) or, for a
    module directly in hf_moe/ (`hf_moe.cli`, `hf_moe.moe_layers`, the package's own `__init__`), the module."""
    parts = module.split(".")
    if len(parts) > 1 and (parts[1] == "modeling" or (PACKAGE / parts[1]).is_dir()):
        return ".".join(parts[:2])
    return module


def package_graph(graph: nx.DiGraph | None = None) -> nx.DiGraph:
    """Package -> the packages its modules import (lazily or not), each edge with the module imports behind it."""
    graph = import_graph() if graph is None else graph
    packages = nx.DiGraph()
    packages.add_nodes_from(package_of(module) for module in graph)
    for a, b in graph.edges:
        if package_of(a) != package_of(b):
            packages.add_edge(package_of(a), package_of(b))
            packages.edges[package_of(a), package_of(b)].setdefault("imports", []).append((a, b))
    return packages


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


CLI = ("hf_moe.cli", "hf_moe.cli_output")
CAPABILITIES = ("hf_moe.upcycling", "hf_moe.pruning", "hf_moe.export", "hf_moe.hub", "hf_moe.training",
                "hf_moe.quantization", "hf_moe.recipes", "hf_moe.data", "hf_moe.metrics")


def test_the_graph_sees_imports():
    graph = import_graph()
    assert graph.has_edge("hf_moe.upcycling.upcycle", "hf_moe.checkpoints.writing")
    assert graph.has_edge("hf_moe.cli", "hf_moe.recipes.finetune")  # an import inside a function counts
    assert graph.has_edge("hf_moe.checkpoints.names", "hf_moe.modeling.configuration_hf_moe")  # not hf_moe itself
    packages = package_graph()
    assert packages.has_edge("hf_moe.recipes", "hf_moe.hub") and packages.has_edge("hf_moe.auto", "hf_moe.hub")
    assert not packages.has_edge("hf_moe.checkpoints", "hf_moe")


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
    graph.remove_edges_from([(a, b) for a, b in list(graph.edges) if _in(a, b) and _modules()[b].name == "__init__.py"])
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, cycles


def test_no_import_cycle_between_packages():
    """Two packages that import each other, even lazily inside functions, are one package in two folders."""
    packages = package_graph()
    cycles = [[(a, b, packages.edges[a, b]["imports"][:2]) for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
              for cycle in nx.simple_cycles(packages)]
    assert not cycles, cycles


@pytest.mark.parametrize("package, forbidden", [
    ("hf_moe.hub", "hf_moe.training"),  # the card reads what training logged, never the callbacks
    ("hf_moe.training", "hf_moe.hub"),  # the push hook is the Hub side's, installed from outside
    ("hf_moe.recipes", "hf_moe.cli"),
    ("hf_moe.recipes", "hf_moe.cli_output"),
    *[("hf_moe.checkpoints", capability) for capability in CAPABILITIES],
    ("hf_moe.modeling", "hf_moe"),  # the remote code: torch and transformers only
    ("hf_moe.pruning", "hf_moe.export"),
    ("hf_moe.pruning", "hf_moe.upcycling"),
    ("hf_moe.export", "hf_moe.upcycling"),
    ("hf_moe.upcycling", "hf_moe.export"),
])
def test_a_package_does_not_reach_what_it_must_not_use(package, forbidden):
    """Neither directly nor through another package: a path `package -> ... -> forbidden` in the package graph."""
    packages = package_graph()
    sources = [node for node in packages if _in(node, package)]
    targets = {node for node in packages if _in(node, forbidden) and not _in(node, package)}
    paths = [path for source in sources for target in targets if nx.has_path(packages, source, target)
             for path in [nx.shortest_path(packages, source, target)]]
    assert not paths, [(path, packages.edges[path[0], path[1]]["imports"][:3]) for path in paths]


def test_the_layout_lists_every_import_between_packages():
    """docs/layout.md's "Who imports whom" table is the package graph: an import it does not list fails here."""
    section = LAYOUT.read_text().split("## Who imports whom", 1)[1].split("\n## ", 1)[0]

    def full(name: str) -> str:
        return name if name == "hf_moe" else f"hf_moe.{name}"

    documented = {full(match["package"]): {full(name) for name in re.findall(r"`(\w+)`", match["imports"])}
                  for match in re.finditer(r"^\| `(?P<package>\w+)` \| (?P<imports>[^|]+) \|$", section, re.M)}
    packages = package_graph()
    actual = {node: set(packages.successors(node)) for node in packages if packages.out_degree(node)}
    differences = {node: {"not listed": sorted(actual.get(node, set()) - documented.get(node, set())),
                          "listed, not imported": sorted(documented.get(node, set()) - actual.get(node, set()))}
                   for node in actual.keys() | documented.keys() if actual.get(node) != documented.get(node)}
    assert not differences, differences


def test_the_library_imports_neither_a_recipe_nor_the_command_line():
    graph = import_graph()
    offending = [(a, b) for a, b in graph.edges
                 if (_in(b, "hf_moe.recipes") and not _in(a, "hf_moe.recipes") and package_of(a) not in CLI)
                 or (package_of(b) in CLI and package_of(a) not in CLI)]
    assert not offending, offending


def test_modeling_imports_nothing_of_hf_moe():
    for path in MODELING.glob("*.py"):
        outside = {name for name in _imports(path) if not _in(name, "hf_moe.modeling")}
        assert not outside, (path, outside)


# ------------------------------------------------------------------------------------------------ __init__ exports
def _documented_exports() -> tuple[set[str], dict[str, set[str]]]:
    """From docs/layout.md's "What the `__init__.py` files export": the packages whose `__init__` re-exports the
    public names of their docs page, and, per capability package, exactly the names its `__init__` exports."""
    section = LAYOUT.read_text().split("## What the `__init__.py` files export", 1)[1].split("\n## ", 1)[0]
    public_sentence = next(line for line in section.split("\n\n") if "public API" in line)
    public = set(re.findall(r"`(hf_moe(?:\.\w+)?)`", public_sentence))
    rows = {match["package"]: set(re.findall(r"`(\w+)`", match["names"]))
            for match in re.finditer(r"^\| `(?P<package>hf_moe\.\w+)` \| (?P<names>[^|]+) \|$", section, re.M)}
    return public, rows


def _exported_names(init: Path) -> set[str]:
    """What an `__init__.py` exports: its `__all__`, else the public names it imports from its own package or
    assigns."""
    module = importlib.import_module(_module_name(init))
    if hasattr(module, "__all__"):
        return set(module.__all__)
    names = set()
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return {name for name in names if not name.startswith("_")}


def test_the_layout_documents_which_init_files_export_names():
    public, rows = _documented_exports()
    assert public == {"hf_moe", "hf_moe.training", "hf_moe.hub", "hf_moe.quantization"}
    assert {"hf_moe.pruning", "hf_moe.upcycling", "hf_moe.export"} <= set(rows)


@pytest.mark.parametrize("init", sorted(PACKAGE.rglob("__init__.py")), ids=lambda path: _module_name(path))
def test_only_the_documented_init_files_export_and_only_the_documented_names(init):
    public, rows = _documented_exports()
    package, exported = _module_name(init), _exported_names(init)
    if package in public:
        assert exported, f"{package} is documented as public API but exports nothing"
    elif package in rows:
        assert exported == rows[package], (f"{package} exports {sorted(exported - rows[package])} that docs/layout.md "
                                           f"does not list, and lacks {sorted(rows[package] - exported)}")
    else:
        assert not exported, f"{package} exports {sorted(exported)}; docs/layout.md lists no export for it"
