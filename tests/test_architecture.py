"""The house rules of DESIGN.md ("Layers and imports", "A module per registry name"), enforced.

- the import graph of effattn has no cycle, and every arrow runs down the layers;
- only ``effattn/backend.py`` imports numpy or cupy among the compute packages, and no compute
  package imports matplotlib, the figures or the tools;
- every registry name has its module, its test file, its figure entry and its notebook, and its
  module offers the same names for the same roles, configuration keyword-only;
- DESIGN.md's table of building blocks names every module of ``effattn/nn/``;
- every relative link and image in README.md and DESIGN.md points at a file that exists.
"""
import ast
import importlib
import inspect
import pathlib
import re

import pytest

import effattn
from effattn import figures

PKG = pathlib.Path(effattn.__file__).parent
ROOT = PKG.parent
COMPUTE = ("nn", "attention", "layers", "models")

# The layers, bottom to top: a module may import only from layers strictly below its own, and
# from its own package where the package allows it (SIBLINGS). The top-level package
# ``effattn/__init__.py`` re-exports the backend and the registry.
RANK = {"backend": 0, "validate": 1, "gradcheck": 1, "nn": 2, "registry": 2, "__init__": 2.5,
        "attention": 3, "layers": 4, "models": 5, "figures": 6, "tools": 7, "__main__": 8}
SIBLINGS = {"nn", "figures", "tools", "models"}   # attention/ and layers/ modules never import each other


def _module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(importer, node):
    """Absolute effattn module names an import statement refers to (ast node)."""
    is_pkg = MODULES[importer].name == "__init__.py"
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "effattn"]
    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
        if mod.split(".")[0] != "effattn":
            return []
    out = []
    for a in node.names:
        sub = f"{mod}.{a.name}"
        out.append(sub if sub in MODULES else mod)
    return out


def _graph():
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(d for d in _resolve(name, node) if d in MODULES and d != name)
        graph[name] = deps
    return graph


def _layer(name):
    parts = name.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def test_import_graph_has_no_cycle():
    graph, state, stack = _graph(), {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycle = stack[stack.index(v):] + [v]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)


def test_every_import_runs_down_the_layers():
    bad = []
    for name, deps in _graph().items():
        src = _layer(name)
        for dep in deps:
            dst = _layer(dep)
            if dst == src and src in SIBLINGS:
                continue
            if dep == "effattn" or not RANK[dst] < RANK[src]:
                bad.append(f"{name} -> {dep}")
    assert not bad, "imports that run up or sideways (see DESIGN.md, 'Layers and imports'): " + ", ".join(sorted(bad))


def _top_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("folder", COMPUTE)
def test_compute_packages_import_no_numpy_cupy_or_matplotlib(folder):
    banned = {"numpy", "cupy", "cupyx", "matplotlib"}
    bad = {str(f.relative_to(PKG)): sorted(set(_top_imports(f)) & banned) for f in (PKG / folder).rglob("*.py")}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"compute modules import {bad} (arrays: effattn.backend.get_namespace; drawing: effattn/figures)"


@pytest.mark.parametrize("folder", COMPUTE)
def test_compute_packages_import_neither_figures_nor_tools(folder):
    graph = _graph()
    bad = sorted(f"{m} -> {d}" for m in graph if m.startswith(f"effattn.{folder}") for d in graph[m]
                 if d.startswith(("effattn.figures", "effattn.tools")))
    assert not bad, f"compute code imports figure or tool code: {bad}"


# --------------------------------------------------------------------------- one module per registry name
def _module_of(spec):
    return importlib.import_module(f"effattn.{'attention' if spec.kind == 'kernel' else 'layers'}.{spec.name}")


def test_every_mechanism_module_is_a_registry_name():
    names = set(effattn.names())
    for folder in ("attention", "layers"):
        mods = {p.stem for p in (PKG / folder).glob("*.py") if not p.name.startswith("_")}
        extra = mods - names
        assert not extra, f"effattn/{folder}/ holds modules that are not registry names: {sorted(extra)} " \
                          "(shared code belongs in effattn/nn/)"


@pytest.mark.parametrize("name", effattn.names())
def test_a_mechanism_is_found_by_its_name(name):
    spec = effattn.get(name)
    mod = _module_of(spec)
    assert mod.MECHANISM is spec
    assert spec.forward is mod.forward and spec.backward is mod.backward
    roles = ["weights", "setup"] + (["pattern"] if spec.exact else []) if spec.kind == "kernel" else ["weights"]
    for role in roles:
        assert getattr(spec, role) is getattr(mod, role, None), f"{name}: registry {role} is not {mod.__name__}.{role}"
    if spec.reference is not None:
        assert spec.reference is getattr(mod, "reference", None)
    for role in ("init_state", "prefill", "step"):
        if getattr(spec, role) is not None:
            assert getattr(spec, role) is getattr(mod, role, None), f"{name}: registry {role} is not {mod.__name__}.{role}"
    if not spec.causal:
        assert isinstance(getattr(mod, "WHY_NOT_CAUSAL", None), str), f"{name} cannot decode: say why in WHY_NOT_CAUSAL"
    assert (ROOT / "tests" / f"test_{name}.py").exists(), f"tests/test_{name}.py is missing"
    assert name in figures.FIGURES, f"{name} has no entry in effattn.figures.FIGURES"
    nb = ROOT / "notebooks" / f"{spec.notebook}.ipynb"
    assert nb.exists(), f"{name}: notebook {nb.name} is missing"
    assert re.search(rf"\b{name}\b", nb.read_text()), f"{name} is never named in its notebook {nb.name}"


@pytest.mark.parametrize("name", effattn.names())
def test_configuration_is_keyword_only(name):
    spec = effattn.get(name)
    mod = _module_of(spec)
    n_pos = 3 if spec.kind == "kernel" else 1
    for role in ("forward", "reference", "loop"):
        fn = getattr(mod, role, None)
        if fn is None:
            continue
        params = list(inspect.signature(fn).parameters.values())
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        want = ["q", "k", "v"] if spec.kind == "kernel" else ["x"]
        assert positional == want, f"{name}.{role}: only {want} are positional, got {positional}"
        assert len(params) >= n_pos


def test_figure_table_names_only_registered_mechanisms():
    assert set(figures.FIGURES) == set(effattn.names())
    for name, fn in figures.FIGURES.items():
        assert fn is None or callable(fn), name


def test_design_names_every_building_block():
    """DESIGN.md's table "What nn/ holds" names each module of effattn/nn/, and no other."""
    text = (ROOT / "DESIGN.md").read_text()
    section = text.split("### What `nn/` holds", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `(\w+)\.py` \|", section, flags=re.M))
    present = {p.stem for p in (PKG / "nn").glob("*.py") if p.stem != "__init__"}
    assert named == present, f"DESIGN.md misses {sorted(present - named)}, names absent {sorted(named - present)}"


# --------------------------------------------------------------------------- links
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)|<img [^>]*src=\"([^\"]+)\"")


@pytest.mark.parametrize("doc", ["README.md", "DESIGN.md"])
def test_relative_links_and_images_exist(doc):
    text = (ROOT / doc).read_text()
    targets = [a or b for a, b in LINK.findall(text)]
    relative = [t for t in targets if not re.match(r"^[a-z]+://|^mailto:", t)]
    assert relative, f"{doc} links to no file of the project"
    missing = [t for t in relative if not (ROOT / t).exists()]
    assert not missing, f"{doc} links to files that do not exist: {missing}"
