"""The package's dependencies run one way (README "Architecture", docs/design.md section 2).

Every ``bids_ketdcm`` import of every module is read from its syntax tree and checked
against the layers: a module imports only from its own layer or those below; the two levels
(participant, group) never import each other; ``testing`` is imported by the CLI's tools
only; package imports sit at module top, except the CLI's workflow imports that must follow
the cache redirection.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bids_ketdcm

PACKAGE = Path(bids_ketdcm.__file__).parent
#: Layer of each top-level part of the package; higher layers may import lower ones.
LAYERS = {
    "errors": 0,
    "config": 1, "io": 1, "provenance": 1, "threads": 1, "seeds": 1,
    "dcm": 2, "model_store": 2,
    "bids": 3,  # bids/ writes and reads the posterior records of dcm/
    "report": 4,
    "participant": 5, "group": 5,
    "cli": 6,
    "testing": 7,
}
#: Modules allowed to import the package inside a function, and why.
LOCAL_IMPORTS = {"cli/app.py": "the workflows load matplotlib, which must follow the cache redirection"}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported bids_ketdcm module, imported at module top) of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found += [(name, id(node) in top) for name in names if name.startswith("bids_ketdcm.")]
    return found


def _modules() -> list[tuple[str, Path]]:
    return [(str(p.relative_to(PACKAGE)), p) for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_module_has_a_layer():
    parts = {rel.split("/")[0].removesuffix(".py") for rel, _ in _modules()} - {"__init__", "__main__"}
    assert parts <= set(LAYERS), parts - set(LAYERS)


def test_dependencies_run_one_way():
    wrong = []
    for rel, path in _modules():
        own = rel.split("/")[0].removesuffix(".py")
        if own in ("__init__", "__main__"):
            continue
        for module, _ in _imports(path):
            other = _part(module)
            if other == own:
                continue
            if other == "testing" and rel != "cli/tools.py":
                wrong.append(f"{rel} imports {module} (testing/ is for tests, benchmarks and cli/tools.py)")
            elif other != "testing" and LAYERS[other] >= LAYERS[own]:
                wrong.append(f"{rel} (layer {LAYERS[own]}) imports {module} (layer {LAYERS[other]})")
    assert not wrong, "\n".join(wrong)


def test_package_imports_sit_at_module_top():
    local = [f"{rel}: {module}" for rel, path in _modules() for module, at_top in _imports(path)
             if not at_top and rel not in LOCAL_IMPORTS]
    assert not local, "\n".join(local)


def test_the_check_sees_a_violation(tmp_path):
    """The import reader finds a function-level upward import (the checks above can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from bids_ketdcm.group.run import run_group\n")
    assert _imports(bad) == [("bids_ketdcm.group.run", False)]
