"""Structural rules of the package (docs/architecture.md), checked on the source so they stay true:
no model-type switch outside the models, mesh axes named only by partitioning, no import cycles."""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "t5x_like"
FAMILY_NAMES = r"(EncoderDecoder|DecoderOnly|EncoderOnly)(Model|Config)?"


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _family_specific(path: pathlib.Path) -> bool:
    """Files that exist for one family: the models themselves and each family's HF converter."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] == "models" or (rel.parts[0] == "interop" and rel.name.startswith("hf_"))


def test_no_model_type_switch_outside_models():
    pattern = re.compile(rf"isinstance\([^)]*\b\w*Model\b|isinstance\([^)]*\b{FAMILY_NAMES}\b"
                         rf"|[\"']{FAMILY_NAMES}[\"']|type\([^)]*\)\.__name__\s*==")
    hits = [f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}" for p in _sources() if not _family_specific(p)
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "model-type switches belong to the model contract (models/base.py):\n" + "\n".join(hits)


def test_only_partitioning_names_mesh_axes():
    from t5x_like.partitioning import MESH_AXES
    assert set(MESH_AXES) == {"data", "fsdp", "tensor", "expert"}
    # "fsdp" and "tensor" mean nothing but mesh axes; "data" (and "expert", also a logical name)
    # only count next to a mesh or a PartitionSpec.
    always = re.compile(r"[\"'](fsdp|tensor)[\"']")
    in_context = re.compile(r"[\"']data[\"']")
    hits = []
    for p in _sources():
        if p.name == "partitioning.py":
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if always.search(code) or (in_context.search(code) and re.search(r"PartitionSpec|\bP\(|mesh|Mesh", code)):
                hits.append(f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not hits, "mesh axes are named in partitioning.py only:\n" + "\n".join(hits)


def _imports(path: pathlib.Path) -> set[str]:
    """t5x_like modules `path` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("t5x_like"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("t5x_like"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_no_import_cycles():
    modules = {_module_name(p): p for p in _sources()}
    graph = {}
    for name, path in modules.items():
        targets = {t for t in _imports(path) if t in modules and t != name}
        # Importing a package's submodule runs the package's __init__ first, but that is not a
        # dependency of the importer on the package's other submodules: only edges to modules count.
        graph[name] = {t for t in targets if not (modules[t].name == "__init__" and name.startswith(t + "."))}
    packages = {n for n, p in modules.items() if p.name == "__init__.py"}
    state, stack = {}, []

    def visit(node):
        state[node] = "active"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in packages:  # a package re-exports its submodules: not a level of its own
                continue
            if state.get(nxt) == "active":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_evaluation_and_models_do_not_import_training():
    """Levels: models and evaluation sit below training (training imports them, never the reverse)."""
    offenders = [str(p.relative_to(PACKAGE)) for p in _sources()
                 if (p.relative_to(PACKAGE).parts[0] in ("models", "layers", "objectives", "data")
                     or p.name == "evaluation.py")
                 and any(t.startswith("t5x_like.training") for t in _imports(p))]
    assert not offenders, offenders


# The levels of docs/architecture.md, lowest first: a module imports only from its own level or lower ones.
LEVELS = ("errors", "layers", "objectives", "models", "data", "partitioning", "gin_config", "evaluation", "training",
          "inference", "interop", "sweep", "runtime", ("main", "demo"))


def test_levels_follow_the_architecture_doc():
    rank = {name: i for i, level in enumerate(LEVELS) for name in (level if isinstance(level, tuple) else (level,))}
    upward = []
    for path in _sources():
        rel = path.relative_to(PACKAGE).with_suffix("").parts
        if rel[0] not in rank:
            continue
        for target in _imports(path):
            parts = target.split(".")
            if len(parts) > 1 and parts[1] in rank and rank[parts[1]] > rank[rel[0]]:
                upward.append(f"{'/'.join(rel)} -> {target}")
    assert not upward, "upward imports (see docs/architecture.md, Levels):\n" + "\n".join(sorted(set(upward)))
