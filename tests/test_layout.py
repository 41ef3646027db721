"""The layout holds: imports form a DAG; the foundations (retok/core/) import nothing but each other; the shared
features (retok/headfit/, retok/teacher/, retok/plan/) import the foundations and each other, never a stage;
stage packages never import each other; every stage package has its entry where the stage table says.

Every ``import`` / ``from ... import`` of a retok module counts, including those inside functions: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from retok.core.stages import STAGES, entry_function

ROOT = Path(__file__).resolve().parents[1] / "retok"
STAGE_PACKAGES = ("tokenizer", "embeddings", "train", "evaluate", "export")
FOUNDATIONS = ("core",)  # config, errors, the stage contract, sources, data, tokens, metrics, file I/O
FEATURES = ("headfit", "teacher", "plan")  # what two or more stages share that is not a foundation
ORCHESTRATORS = ("cli", "pipeline", "summary")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The retok module an imported name belongs to (``retok.a.b.func`` -> ``retok.a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    files = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph: dict[str, set[str]] = {}
    for f in files:
        me = _module_name(f)
        package = me if f.name == "__init__.py" else me.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for n in names:
                target = _resolve(n, modules)
                if target and target != me and target != "retok":
                    deps.add(target)
        graph[me] = deps
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_graph_is_read():
    graph = import_graph()
    # a few arrows that must exist, so that an empty graph cannot pass the tests below
    assert "retok.core.config" in graph["retok.core.stages"]
    assert "retok.train.loss" in graph["retok.train.loop"]
    assert "retok.embeddings.rows" in graph["retok.embeddings.report"]


def test_imports_form_a_dag():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_stage_packages_do_not_import_each_other():
    bad = [
        f"{m} -> {d}"
        for m, deps in import_graph().items()
        for d in deps
        if _top(m) in STAGE_PACKAGES and _top(d) in STAGE_PACKAGES and _top(d) != _top(m)
    ]
    assert not bad, "a stage package reaches into another (share through the core instead): " + ", ".join(bad)


def _arrows(src: tuple[str, ...], dst: tuple[str, ...]) -> list[str]:
    return [
        f"{m} -> {d}" for m, deps in import_graph().items() for d in deps if _top(m) in src and _top(d) in dst
    ]


def test_foundations_import_only_foundations():
    bad = _arrows(FOUNDATIONS, STAGE_PACKAGES + FEATURES + ORCHESTRATORS)
    assert not bad, "a foundation must not depend on a feature, a stage or the CLI: " + ", ".join(bad)


def test_features_import_no_stage_and_no_orchestrator():
    bad = _arrows(FEATURES, STAGE_PACKAGES + ORCHESTRATORS)
    assert not bad, "a shared feature must not depend on a stage or the CLI: " + ", ".join(bad)


def test_the_foundations_and_features_are_folders():
    """The rooms show in the tree: every module below retok/ is in core/, a feature, a stage package, or one
    of the orchestrators at the top."""
    top = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    assert top == set(ORCHESTRATORS)
    for room in FOUNDATIONS + FEATURES + STAGE_PACKAGES:
        assert (ROOT / room / "__init__.py").is_file(), room


def test_every_module_is_in_a_known_room():
    rooms = set(STAGE_PACKAGES) | set(FOUNDATIONS) | set(FEATURES) | set(ORCHESTRATORS) | {"retok"}
    assert {_top(m) for m in import_graph()} <= rooms


@pytest.mark.parametrize("key", list(STAGES))
def test_each_stage_entry_lives_in_its_package(key):
    fn = entry_function(key)
    assert callable(fn)
    assert fn.__module__.split(".")[1] in STAGE_PACKAGES and fn.__module__.endswith(".stage")
