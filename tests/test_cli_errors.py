"""A user's mistake on the command line: a named error in one to three lines with the fix, exit status 2 (3 for
a rejected candidate), no traceback on the terminal, the full trace in a log file the message names."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_workspace, tiny_params


def _graft(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "graft", *args], cwd=root, env=env, capture_output=True, text=True)


def _refusal(done: subprocess.CompletedProcess, status: int) -> str:
    """The error lines graft printed itself; its log file exists and holds the trace."""
    assert done.returncode == status, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    message = done.stderr[done.stderr.rindex("graft: "):]
    assert len(message.strip().splitlines()) <= 3, message
    log = Path(re.search(r"\(full trace: (.+)\)", message).group(1))
    assert log.is_absolute() and "Traceback" in log.read_text()
    return message


@pytest.fixture
def project(tmp_path):
    """A project folder without data: what a clone is before `graft fetch-data`."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    return tmp_path


def test_bad_params_are_refused_in_under_two_seconds_before_any_server_starts(project):
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(**{"finetune.strategy": "everything"})))
    started = time.monotonic()
    done = _graft(project, "run")
    seconds = time.monotonic() - started
    message = _refusal(done, 2)
    assert "finetune.strategy" in message and "'scratch', 'linear_probe', 'finetune' or 'lp_ft'" in message
    assert seconds < 2, f"{seconds:.1f}s to the error"


def test_missing_data_names_the_folder_and_graft_fetch_data(project):
    message = _refusal(_graft(project, "run"), 2)
    assert "no data at data/raw/animal-mnist (data.target.path)" in message and "graft fetch-data" in message


def test_unknown_stage_lists_the_stages(project):
    message = _refusal(_graft(project, "stage", "bogus"), 2)
    assert "unknown stage 'bogus'; stages: resolve_sources, prepare_source" in message


def test_an_empty_class_folder_is_refused_before_anything_runs(candidate_template, tmp_path):
    """DVC does not see an empty folder, so in a project that has run, a class added without images would leave
    every stage up to date: the run must refuse it, naming the folder, before any stage or server starts."""
    root = copy_workspace(candidate_template[0], tmp_path / "ws")
    (root / "data/raw/animal-mnist/unicorn").mkdir()
    started = time.monotonic()
    message = _refusal(_graft(root, "run"), 2)
    assert "data/raw/animal-mnist: empty class folder(s): unicorn; add images to them or remove them" in message
    assert time.monotonic() - started < 2


def test_a_rejected_candidate_exits_3_with_the_failed_gate(candidate_template, prefect_server, tmp_path):
    root = copy_workspace(candidate_template[0], tmp_path / "ws")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(**{"gates.min_accuracy": 0.99}), sort_keys=False))
    done = _graft(root, "run", env=prefect_server)
    message = _refusal(done, 3)
    assert message.startswith("graft: rejected: candidate rejected by 1 gate(s): quality.accuracy")
    registration = json.loads((root / "outputs" / "registration.json").read_text())
    assert registration["gates_passed"] is False, "the rejected candidate is registered for diagnosis"


def test_every_project_command_takes_root_and_every_option_says_what_it_does():
    import argparse

    from graft.cli import build_parser

    def commands(parser: argparse.ArgumentParser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield name, sub
                    yield from ((f"{name} {inner}", deeper) for inner, deeper in commands(sub))

    found = dict(commands(build_parser()))
    for name, sub in found.items():
        options = {flag for action in sub._actions for flag in action.option_strings}
        if name in ("canary", "data", "shadow", "stage"):  # groups of commands; and what DVC calls in the project folder
            continue
        assert "--root" in options and "--params" not in options, f"graft {name}: {sorted(options)}"
        undocumented = [action.dest for action in sub._actions if not action.help]
        assert not undocumented, f"graft {name}: options without help: {undocumented}"
    assert {"run", "data add", "promote", "serve", "history", "export-triton"} <= set(found)


def test_only_the_commands_that_ask_or_move_the_registry_run_without_the_garbage_collector():
    """graft.cli.main turns Python's cyclic collector off for a quick command (and freezes it at exit): a command
    that runs for minutes must never be one."""
    from graft.cli import build_parser

    parser = build_parser()
    commands = (["promote"], ["rollback"], ["history"], ["canary", "status"], ["canary", "set", "5"], ["run"],
                ["serve"], ["tune"], ["sweep"], ["schedule"], ["monitor"], ["stage", "finetune"], ["fetch-data"])
    quick = {" ".join(argv) for argv in commands if parser.parse_args(argv).quick}
    assert quick == {"promote", "rollback", "history", "canary status", "canary set 5"}


def test_summary_before_any_run_says_how_to_get_the_outputs(project):
    """A clone holds the committed metrics and reports but none of DVC's outputs (models/transfer.json)."""
    (project / "metrics").mkdir()
    (project / "metrics/evaluate.json").write_text("{}")
    message = _refusal(_graft(project, "summary"), 2)
    assert "no pipeline outputs in" in message and "models/transfer.json" in message and "graft run" in message


def test_explain_names_a_missing_image_before_it_opens_the_registry(project):
    # The project has no registry either: the image is what the user mistyped, and it is named first, at once.
    message = _refusal(_graft(project, "explain", "nowhere.png"), 2)
    assert "cannot read nowhere.png: no such file; give the path of an image file" in message
