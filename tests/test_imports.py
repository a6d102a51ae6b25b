"""The package graph of sparseseg/: imports point down a declared layer order and no package
imports one that imports it back (docs/design/layout.md). Function-local imports count too: a
cycle hidden inside a function is still a cycle a reader has to untangle."""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "sparseseg"

# Lowest first; a module may import only from a lower layer (or from inside its own package).
# "sparseseg" is the package's own __init__: the Python API (load_model, predict).
LAYERS = [
    {"version", "errors", "fsutil", "progress"},      # no imports of the project
    {"volume"},                                        # reading and writing volumes
    {"labels_zarr", "synthetic"},                      # OME-Zarr label images; the demo's data
    {"model"},                                         # what trainer, export and engine share
    {"kernels"},
    {"engine"},
    {"export"},                                        # ONNX, TensorRT builds, bioimage.io
    {"eval"},                                          # IoU, figures, report
    {"trainer"},
    {"suggest", "selftrain"},                          # Zheng et al.: suggestion, self-training
    {"sparseseg", "pipeline"},                         # the Python API, densify
    {"demo", "napari"},
    {"cli"},
]

# Modules that import the project's own modules inside functions on purpose: an entry point
# stays light at import (`sparseseg --help`, `import sparseseg`, opening napari's widget must not
# import torch, dask and onnx). Elsewhere outside engine/, kernels/ and export/ (the engine
# branch's part) an import of the project's own modules stands at the top of its module.
LAZY_ENTRY_MODULES = {"sparseseg", "sparseseg.cli", "sparseseg.napari.widget"}
NOT_CHECKED_FOR_LOCAL = ("sparseseg.engine", "sparseseg.kernels", "sparseseg.export")


def _modules() -> dict:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _targets(module: str, node, is_package: bool, mods: dict) -> list[str]:
    """The project modules an import statement imports (`from pkg import mod` names mod)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source for a in node.names]


def _imports() -> list[tuple[str, str, bool, int]]:
    """(importer, imported, inside a function, line) for every import of a project module."""
    mods, found = _modules(), []
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        local = {id(c) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for c in ast.walk(n) if isinstance(c, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, node, path.name == "__init__.py", mods):
                    if target.split(".")[0] == "sparseseg":
                        found.append((module, target, id(node) in local, node.lineno))
    return found


def package_of(module: str) -> str:
    """sparseseg.engine.run -> engine; sparseseg.volume -> volume; sparseseg -> sparseseg."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "sparseseg"


def package_edges() -> dict:
    """{(importer package, imported package): ["module:line -> module", ...]}"""
    edges = defaultdict(list)
    for a, b, _, line in _imports():
        pa, pb = package_of(a), package_of(b)
        if pa != pb:
            edges[(pa, pb)].append(f"{a}:{line} -> {b}")
    return edges


def _layer(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in _modules()}
    declared = set().union(*LAYERS)
    assert packages - declared == set(), "add the new package or top-level module to LAYERS"
    assert declared - packages == set(), "LAYERS names a package that is gone"


def test_no_cycle_between_packages():
    assert _cycles(set(package_edges())) == []


def test_imports_point_down_the_layers():
    upward = {e: where for e, where in package_edges().items()
              if _layer(e[1]) >= _layer(e[0])}
    assert upward == {}


def test_project_imports_stand_at_the_top_of_their_module():
    local = [f"{a}:{line} -> {b}" for a, b, inside, line in _imports()
             if inside and a not in LAZY_ENTRY_MODULES and not a.startswith(NOT_CHECKED_FOR_LOCAL)]
    assert local == []


def test_entry_points_import_no_torch():
    # Why LAZY_ENTRY_MODULES import inside functions: `sparseseg --help` and `import sparseseg`
    # answer in a fraction of the seconds torch takes to import.
    code = "import sys, sparseseg, sparseseg.cli; print(sorted({'torch', 'dask', 'onnx'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout
    assert out.strip() == "[]"


def test_the_graph_sees_function_local_and_relative_imports():
    mods = {"sparseseg.a": None, "sparseseg.a.b": None, "sparseseg.c": None}
    tree = ast.parse("from . import b\nfrom sparseseg import c\ndef f():\n    from sparseseg.a.b import x\n")
    found = [t for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
             for t in _targets("sparseseg.a", n, True, mods)]
    assert found == ["sparseseg.a.b", "sparseseg.c", "sparseseg.a.b"]
    assert _cycles({("x", "y"), ("y", "z"), ("z", "x"), ("z", "w")}) == [["x", "y", "z"]]
