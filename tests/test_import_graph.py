"""The package's import graph, read from the source with ast: no cycles between modules (imports
inside functions and under ``if TYPE_CHECKING:`` included), and no module reaches for another
module's underscore names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kimi_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def absolute(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """The module an ImportFrom names, relative imports resolved against module ``here``."""
    if not node.level:
        return node.module or ""
    base = here.split(".")[: len(here.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(source: str, here: str, modules=MODULES, is_package: bool = False) -> tuple[set[str], list[str]]:
    """(``modules`` that module ``here`` imports anywhere in its ``source``, underscore names it
    takes from them)."""
    tree = ast.parse(source)
    targets: set[str] = set()
    private: list[str] = []
    bound: dict[str, str] = {}  # local name -> package module it is bound to
    for node in ast.walk(tree):  # every node: module level, function bodies, TYPE_CHECKING blocks
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    targets.add(alias.name)
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            origin = absolute(node, here, is_package)
            if origin not in modules:
                continue
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                if submodule in modules:  # `from pkg import module`
                    targets.add(submodule)
                    bound[alias.asname or alias.name] = submodule
                    continue
                targets.add(origin)
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    private.append(f"{here} imports {alias.name} from {origin}")
    for node in ast.walk(tree):  # module._name through a module bound by an import
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):  # fmt: skip
            private.append(f"{here} uses {bound[node.value.id]}.{node.attr}")
    targets.discard(here)
    # importing `a.b.c` also runs the packages `a` and `a.b`; they are empty, so they add no edges
    return targets, private


GRAPH = {name: imports(path.read_text(encoding="utf-8"), name, is_package=path.name == "__init__.py")
         for name, path in MODULES.items()}  # fmt: skip


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_imports_are_found_wherever_they_are_written():
    source = """
from typing import TYPE_CHECKING
import a.b
from a import c
from . import d
if TYPE_CHECKING:
    from a.e import Plan
def f():
    from a.b import _helper
    return c._private, c.__name__
"""
    modules = {"a", "a.b", "a.c", "a.d", "a.e", "a.here"}
    targets, private = imports(source, "a.here", modules)
    assert targets == {"a.b", "a.c", "a.d", "a.e"}
    assert private == ["a.here imports _helper from a.b", "a.here uses a.c._private"]
    assert len(MODULES) > 30 and "kimi_jax.verify.checklist" in GRAPH["kimi_jax.cli"][0]  # a function-body import


def test_no_import_cycles():
    cycle = find_cycle({name: targets for name, (targets, _) in GRAPH.items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_type_only_back_import():
    # what vindex had before: phases imported the plan back from command under TYPE_CHECKING
    assert find_cycle({"command": {"phases"}, "phases": {"command"}}) == ["command", "phases", "command"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_takes_another_modules_private_names():
    found = [line for _, (_, private) in sorted(GRAPH.items()) for line in private]
    assert found == [], "\n".join(found)


# The order data flows in: a module may import from its own stage and from stages below it, never
# from a stage above or beside it. Rank 0 is the ground every stage stands on. The run certifies the
# bundle it writes (the technical note carries verify's certification checks), so verify and the
# note sit below the run; verify and its note are one stage.
STAGES = {
    "kimi_jax": 0, "errors": 0, "records": 0, "fileio": 0, "settings": 0, "config": 0, "platform_info": 0,
    "shapes": 0, "text": 0, "progress": 0,
    "manifest": 1,
    "storage": 2,
    "model": 3, "ledger": 3,
    "explorer": 4,
    "verify": 5, "note": 5,
    "run": 6,
    "vindex": 7, "serve": 7,
    "cli": 8,
}
ONE_STAGE = {"note": "verify"}
# Replay re-executes a bundle: the one place verify runs the model.
ALLOWED_CLIMBS = {("kimi_jax.verify.replay", "kimi_jax.run.plan"), ("kimi_jax.verify.replay", "kimi_jax.run.runner")}


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_module_has_a_stage():
    assert sorted({stage_of(m) for m in MODULES} - set(STAGES)) == []


def stage_violations(graph: dict[str, set[str]]) -> list[str]:
    """``A imports B`` for each import that climbs to a later stage or crosses to a sibling one."""
    wrong = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = stage_of(name), stage_of(target)
            if ONE_STAGE.get(a, a) == ONE_STAGE.get(b, b) or (name, target) in ALLOWED_CLIMBS or STAGES[a] == STAGES[b] == 0:
                continue  # within a stage, or on the ground (where the cycle test keeps order)
            if STAGES[b] >= STAGES[a]:
                wrong.append(f"{name} (stage {a}) imports {target} (stage {b})")
    return wrong


def test_imports_follow_the_stage_order():
    wrong = stage_violations({name: targets for name, (targets, _) in GRAPH.items()})
    assert wrong == [], "\n".join(wrong)


def test_the_stage_check_finds_a_climb_and_a_sibling():
    graph = {"kimi_jax.storage.reader": {"kimi_jax.manifest.schema", "kimi_jax.model.layers"},
             "kimi_jax.ledger.ledger": {"kimi_jax.model.params", "kimi_jax.errors"},
             "kimi_jax.verify.replay": {"kimi_jax.run.plan"}}
    assert stage_violations(graph) == [
        "kimi_jax.ledger.ledger (stage ledger) imports kimi_jax.model.params (stage model)",
        "kimi_jax.storage.reader (stage storage) imports kimi_jax.model.layers (stage model)",
    ]
