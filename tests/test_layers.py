"""The import direction of DESIGN.md, checked on the source: lower layers never import higher ones.

Every ``import evolve.x`` / ``from evolve.x import`` in a module counts, including imports inside
functions (a lazy import is still a dependency) and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import evolve

ROOT = Path(evolve.__file__).parent
BASE = {"schema", "text", "errors", "specs"}
# layer -> the evolve layers it may import (besides itself and BASE).
ALLOWED: dict[str, set[str]] = {
    "schema": set(),
    "text": set(),
    "errors": set(),
    "specs": set(),
    "llm": set(),
    "stores": set(),
    "envs": set(),
    "diagnose": {"llm"},
    "skills": {"stores", "diagnose"},
    "agents": {"envs", "stores", "skills", "diagnose", "llm"},
    "synth": {"stores", "llm"},
    "train": {"synth", "llm", "agents", "envs", "stores"},
    "eval": {"agents", "envs", "stores"},
    "config": set(),
    "pipeline": {"*"},
    "cli": {"*"},
    "__init__": {"*"},
    "examples": set(),
}


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "evolve" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_no_upward_imports() -> None:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        layer = _layer(path)
        allowed = ALLOWED.get(layer)
        assert allowed is not None, f"{path}: layer {layer!r} is missing from DESIGN's table (add it here)"
        if "*" in allowed:
            continue
        for dep in _imports(path) - {layer} - BASE:
            if dep not in allowed:
                bad.append(f"{path.relative_to(ROOT.parent)} ({layer}) imports evolve.{dep}")
    assert not bad, "imports against DESIGN's table:\n" + "\n".join(bad)


def test_base_modules_import_nothing_above() -> None:
    for name in ("schema", "text", "errors"):
        deps = _imports(ROOT / f"{name}.py") - {name}
        assert deps <= {"schema", "text", "errors"}, (name, deps)
