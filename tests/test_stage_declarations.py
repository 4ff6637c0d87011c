"""dvc.yaml says what each stage reads and writes; these tests keep it in step with the code.

Code dependencies: the project modules a stage's function reaches (the functions and classes it names,
followed through every project function and class they name in turn) are exactly the .py files the stage
declares. Outputs: a full `dvc repro` writes no file that no stage declares, and every declared output exists.
"""
import ast
import inspect
import textwrap
from pathlib import Path

import pytest

from components.stages import STAGES
from tests.conftest import PROJECT

CODE_FOLDERS = ("components", "deploy")


def _project_file(obj) -> str | None:
    module = obj if inspect.ismodule(obj) else inspect.getmodule(obj)
    path = Path(getattr(module, "__file__", "") or "")
    if path.suffix == ".py" and path.parent.parent == PROJECT and path.parent.name in CODE_FOLDERS:
        return path.relative_to(PROJECT).as_posix()
    return None


class _WithoutAnnotations(ast.NodeTransformer):
    """Type annotations name classes without running their code."""

    def visit_FunctionDef(self, node):
        node.returns = None
        for argument in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs, node.args.vararg, node.args.kwarg]:
            if argument is not None:
                argument.annotation = None
        return self.generic_visit(node)

    def visit_AnnAssign(self, node):
        return ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno) if node.value else None


def _import_sources(module) -> dict[str, str]:
    """name -> the project module a module-level `from X import name` took it from (constants have no module)."""
    found = {}
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in CODE_FOLDERS:
            found.update({alias.asname or alias.name: node.module for alias in node.names})
    return found


def _reached(obj, files: set[str], seen: set[int]) -> None:
    """Every project file whose code `obj` (a function or class) can run, following the names in its body."""
    if id(obj) in seen or _project_file(obj) is None:
        return
    seen.add(id(obj))
    files.add(_project_file(obj))
    members = [m for _, m in inspect.getmembers(obj, inspect.isfunction)] if inspect.isclass(obj) else [obj]
    for member in members:
        if _project_file(member) is None:
            continue
        namespace = vars(inspect.getmodule(member))
        try:
            tree = _WithoutAnnotations().visit(ast.parse(textwrap.dedent(inspect.getsource(member))))
        except OSError:  # generated (a dataclass's __init__): no source, nothing of ours to follow
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in namespace:
                named = namespace[node.id]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in CODE_FOLDERS:
                module = __import__(node.module, fromlist=["_"])
                for alias in node.names:
                    _reached(getattr(module, alias.name), files, seen)
                continue
            else:
                continue
            if inspect.ismodule(named):  # `data_mod.load_splits`: follow the attribute used
                if (file := _project_file(named)) is not None:
                    files.add(file)
                    for parent in ast.walk(tree):
                        if isinstance(parent, ast.Attribute) and isinstance(parent.value, ast.Name) and parent.value.id == node.id:
                            _reached(getattr(named, parent.attr), files, seen)
            elif inspect.isfunction(named) or inspect.isclass(named):
                _reached(named, files, seen)
            elif node.id in (imports := _import_sources(inspect.getmodule(member))):  # a constant: SOURCE_KEY
                files.add(_project_file(__import__(imports[node.id], fromlist=["_"])))


def _stages():
    from dvc.repo import Repo

    with Repo(str(PROJECT)) as repo:
        return [(stage.addressing, [d.def_path for d in stage.deps], [o.def_path for o in stage.outs])
                for stage in repo.index.stages if stage.cmd]  # not the data's .dvc files


DVC_STAGES = _stages()


@pytest.mark.parametrize("name,deps", [(name, deps) for name, deps, _ in DVC_STAGES], ids=[s[0] for s in DVC_STAGES])
def test_each_stage_declares_exactly_the_code_it_runs(name, deps):
    reached: set[str] = set()
    _reached(STAGES[name.partition("@")[0]], reached, set())
    declared = {d for d in deps if d.endswith(".py")}
    assert declared == reached, (f"dvc.yaml stage {name}: declare {sorted(reached - declared)}; "
                                 f"no longer used: {sorted(declared - reached)}")


def test_a_full_repro_writes_exactly_the_declared_outputs(candidate_template):
    root, _ = candidate_template
    declared = {Path(out) for _, _, outs in DVC_STAGES for out in outs}
    written = {p.relative_to(root) for folder in ("data/prepared", "models", "metrics", "plots", "reports")
               for p in (root / folder).rglob("*") if p.is_file() and p.name != ".gitignore"}
    undeclared = {p for p in written if not any(p == d or d in p.parents for d in declared)}
    assert not undeclared, f"stages wrote files dvc.yaml does not declare: {sorted(map(str, undeclared))}"
    assert all((root / d).exists() for d in declared), [str(d) for d in declared if not (root / d).exists()]
