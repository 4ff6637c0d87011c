"""dvc.yaml says what each stage reads and writes; these tests keep it in step with the code.

Code dependencies: a stage's module (components/stages/) and every project module it imports, transitively, are
exactly the .py files the stage declares. Outputs: a full `dvc repro` writes no file that no stage declares, and
every declared output exists.
"""
import ast
from pathlib import Path

import pytest

from components.stage_runner import stage_module
from tests.conftest import PROJECT

CODE_FOLDERS = ("components", "deploy")


def _module_file(dotted: str) -> Path | None:
    path = PROJECT / (dotted.replace(".", "/") + ".py")
    return path if path.is_file() and dotted.split(".")[0] in CODE_FOLDERS else None


def _imports(file: Path) -> set[Path]:
    """The project modules a module imports, anywhere in it (a function-level import runs too)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {path for name in candidates if (path := _module_file(name))}
    return found


def stage_code(stage: str) -> set[str]:
    """The .py files a stage runs: its module and every project module it imports, transitively."""
    todo, seen = [_module_file(stage_module(stage))], set()
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo += _imports(file)
    return {path.relative_to(PROJECT).as_posix() for path in seen}


def _stages():
    from dvc.repo import Repo

    with Repo(str(PROJECT)) as repo:
        return [(stage.addressing, [d.def_path for d in stage.deps], [o.def_path for o in stage.outs])
                for stage in repo.index.stages if stage.cmd]  # not the data's .dvc files


DVC_STAGES = _stages()


@pytest.mark.parametrize("name,deps", [(name, deps) for name, deps, _ in DVC_STAGES], ids=[s[0] for s in DVC_STAGES])
def test_each_stage_declares_exactly_the_code_it_imports(name, deps):
    imported = stage_code(name.partition("@")[0])
    declared = {d for d in deps if d.endswith(".py")}
    assert declared == imported, (f"dvc.yaml stage {name}: declare {sorted(imported - declared)}; "
                                  f"no longer imported: {sorted(declared - imported)}")


def test_the_packages_a_stage_imports_through_hold_no_code():
    """Importing components.stages.export runs components/__init__.py and components/stages/__init__.py: they
    stay docstrings, so leaving them out of the stages' dependencies hides nothing."""
    for init in ("components/__init__.py", "components/stages/__init__.py", "deploy/__init__.py"):
        body = ast.parse((PROJECT / init).read_text()).body
        assert all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body), init


def test_a_full_repro_writes_exactly_the_declared_outputs(candidate_template):
    root, _ = candidate_template
    declared = {Path(out) for _, _, outs in DVC_STAGES for out in outs}
    written = {p.relative_to(root) for folder in ("data/prepared", "models", "metrics", "plots", "reports")
               for p in (root / folder).rglob("*") if p.is_file() and p.name != ".gitignore"}
    undeclared = {p for p in written if not any(p == d or d in p.parents for d in declared)}
    assert not undeclared, f"stages wrote files dvc.yaml does not declare: {sorted(map(str, undeclared))}"
    assert all((root / d).exists() for d in declared), [str(d) for d in declared if not (root / d).exists()]
