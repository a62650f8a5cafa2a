"""No import cycle between uae_ray's packages: the graph of every ``uae_ray.<part>`` (a subpackage such as
``models/`` or a top-level module such as ``runtime.py``) importing another, read from the AST of every module with
function-level (lazy) imports included, is acyclic.

Lazy imports hide cycles from Python but not from the architecture: ``models/`` importing ``index/`` inside a
function while ``index/`` imports ``models/`` is still a cycle. Two edges are known and stated below (each with the
reason it exists); the test fails when one of them disappears, so the list only ever shrinks."""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

import uae_ray

PACKAGE = Path(uae_ray.__file__).resolve().parent

#: (importer, imported): edges that close a cycle today, accepted until they are removed.
KNOWN_EDGES: dict[tuple[str, str], str] = {
    ("config", "data"): "config._output_name refuses output names that the stages write (data.schema's names), "
    "while data/ reads config models (SplitRatios)",
    ("config", "stages"): "config.load_pipeline_config and config.__getattr__ hand out stages.registry's "
    "PipelineConfig, which is built from the stage list",
}


def _part(module: str) -> str | None:
    """The package-level node of a dotted ``uae_ray`` module name (None for ``uae_ray`` itself)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "uae_ray" and len(parts) > 1 else None


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every module named by an import statement anywhere in ``tree`` (inside functions too), absolute."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.append(prefix)
            out += [f"{prefix}.{a.name}" for a in node.names]  # `from uae_ray import metrics` names a module
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, list[str]]]:
    """importer part -> imported part -> the files (relative to the package) that make the edge."""
    parts = {p.stem for p in root.iterdir() if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py")
             .exists()}
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root.parent).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        src = _part(module)
        if src is None:
            continue
        for name in _imported_modules(ast.parse(f.read_text(encoding="utf-8"), str(f)), module, is_package):
            dst = _part(name)
            if dst is not None and dst != src and dst in parts:
                files = graph[src][dst]
                if str(f.relative_to(root)) not in files:
                    files.append(str(f.relative_to(root)))
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges`` as [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return [*path[path.index(m) :], m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_find_cycle_sees_a_lazy_import_cycle(tmp_path: Path):
    """The checker itself: a cycle made only of a function-level import and a relative import is found."""
    pkg = tmp_path / "uae_ray"
    (pkg / "models").mkdir(parents=True)
    (pkg / "index").mkdir()
    for d in (pkg, pkg / "models", pkg / "index"):
        (d / "__init__.py").write_text("")
    (pkg / "models" / "enc.py").write_text("def f():\n    from uae_ray.index.source import g\n    return g\n")
    (pkg / "index" / "source.py").write_text("from ..models import enc\n")
    graph = import_graph(pkg)
    assert {k: set(v) for k, v in graph.items()} == {"models": {"index"}, "index": {"models"}}
    assert find_cycle({k: set(v) for k, v in graph.items()}) in (["index", "models", "index"],
                                                                 ["models", "index", "models"])


def test_no_import_cycle_between_packages():
    graph = import_graph()
    assert "models" in graph and "stages" in graph  # the real package was read
    for edge, why in KNOWN_EDGES.items():
        assert edge[1] in graph.get(edge[0], {}), f"known edge {edge} is gone ({why}): remove it from KNOWN_EDGES"
    edges = {src: {dst for dst in dsts if (src, dst) not in KNOWN_EDGES} for src, dsts in graph.items()}
    cycle = find_cycle(edges)
    if cycle is not None:
        detail = "; ".join(f"{a} -> {b} in {graph[a][b]}" for a, b in itertools.pairwise(cycle))
        raise AssertionError(f"import cycle between uae_ray packages: {' -> '.join(cycle)} ({detail})")


def test_models_do_not_import_index_or_stages():
    """Models only encode: the run-dir model lookup they need lives in models.registry."""
    graph = import_graph()
    assert not {"index", "stages", "labeling", "eval", "training"} & set(graph.get("models", {})), graph["models"]
