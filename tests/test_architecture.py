"""The layering the README's layout promises, read from the code's imports: no cycles; deploy/ needs only ONNX
Runtime, the web stack and the model's metadata; components/ holds no Prefect."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import PROJECT

PACKAGES = ("components", "deploy", "flows", "graft")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (PROJECT / package).rglob("*.py"):
            dotted = path.relative_to(PROJECT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
            found[dotted] = path
    return found


MODULES = _modules()


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module name an import statement in `path` names (`from a.b import c` names a.b and a.b.c)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def test_no_import_cycles_between_project_modules():
    graph = {name: {i for i in _imports(path) if i in MODULES and i != name} for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for following in sorted(graph[name]):
            assert state.get(following) != "open", f"import cycle: {' -> '.join([*trail, following])}"
            if following not in state:
                visit(following, [*trail, following])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_deploy_needs_no_training_code_torch_or_prefect():
    for name, path in MODULES.items():
        if not name.startswith("deploy"):
            continue
        everywhere = {i.split(".")[0] for i in _imports(path)}
        assert not everywhere & {"components", "flows", "graft", "torch", "torchvision", "prefect", "dvc"}, name
        # mlflow only inside the function that reads an embedded sqlite store (a serving image talks HTTP)
        assert "mlflow" not in {i.split(".")[0] for i in _imports(path, top_level_only=True)}, name


def test_components_hold_no_prefect():
    for name, path in MODULES.items():
        if name.startswith("components"):
            assert not {i.split(".")[0] for i in _imports(path)} & {"prefect", "flows"}, name
