"""The README's shell examples, extracted from README.md and run as written against a real project and server.

Every line of every ```bash block is either QUICK (run here, in README order, against a published copy of the
tiny pipeline workspace: two registered versions, `graft serve` on a free port, curl against it) or LONG (an
explicit prefix below, with the reason it is not run here). A line that is neither fails
`test_every_readme_command_is_run_or_listed_as_long`, so a new example is never skipped silently.

Rule (after `.venv/bin/` is dropped from the first word, a trailing `&` and `# comment` removed, and the line
split at `&&`): a line is LONG when any of its parts starts with a LONG prefix; QUICK when every part starts with
a QUICK prefix (a `graft` command with `--help`/`-h`, or curl to the server's documented address, counts as
quick); anything else is unclassified and fails.

Substituted when run, nothing else: `.venv/bin/` -> this venv, 127.0.0.1:8000 -> the test server's address
(`serving.port` in the copy's params.yaml, so `graft serve` itself runs as written), optional groups such as
`[--reason "..."]` are left out. The curl runs add `-w` to read the HTTP status.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from graft.cli import build_parser
from tests.conftest import PROJECT, RAW, copy_workspace, free_port, graft_cli, stop_process_group, wait_healthy

README = PROJECT / "README.md"
VENV_BIN = Path(sys.executable).parent
DOC_ADDRESS = "127.0.0.1:8000"  # where the README says `graft serve` listens (params.yaml serving.host/port)
MODEL = "graft-classifier"      # registry.model_name in params.yaml

# Run by test_readme_examples_run_as_written: seconds each, on the tiny workspace.
QUICK = (
    "graft promote", "graft rollback", "graft history", "graft summary", "graft export-triton", "graft canary",
    "graft card",
    "graft serve",  # started in the background; the curl lines after it are sent to it
    "dvc metrics show", "dvc metrics diff", "dvc plots show", "dvc status", "dvc dag",
    "curl",         # only against DOC_ADDRESS (checked in classify)
)

# Not run here: prefix -> why. Each must still match a README line (test_long_list_is_not_stale).
LONG = {
    "bash scripts/setup.sh": "installs system packages and the venv (minutes); CI runs it before the tests",
    "graft run": "the whole pipeline on the full default data (minutes); tests/test_faults.py runs it on small data "
                 "(tests/test_flow.py the flow behind it, tests/test_pipeline.py the same stages through `dvc repro`)",
    "python -m pytest": "the whole suite (or its everyday tier, -m \"not slow\"), this file included",
    "python benchmarks/": "benchmarks, run by hand (minutes to hours)",
    "prefect server start": "a long-lived Prefect server (tests/conftest.py starts one for the test run)",
    "export PREFECT_API_URL=": "points the Prefect walkthrough at the server it starts",
    "graft schedule": "registers a deployment on that Prefect server (tests/test_schedule.py)",
    "prefect worker start": "a long-lived worker that runs the full retrain flow",
    "prefect deployment run": "a full retrain through the worker above",
    "cp new-photos/": "the user's own new images (a placeholder folder)",
    "graft serve --shadow-enabled": "a second server, shadowing the challenger (tests/test_server.py shadows v2 live)",
    "graft shadow report": "reads what a shadowing server kept (tests/test_server.py, tests/test_shadow.py)",
    "graft promote --require-shadow": "refused without live evidence, which this project has none of (tests/test_server.py "
                                      "checks that refusal)",
    "graft promote --ramp": "waits for a serving, capturing server's canary answers at each step (tests/test_server.py "
                            "ramps v2 live)",
    "dvc add data/raw/animal-mnist": "re-versions the user's data after new images arrive",
    "graft data add": "the user's own folder (tests/test_userdata.py runs `graft data add` on a real one)",
    "git add data/raw/my-parts.dvc": "follows the user's `graft data add`, then a full `graft run`",
    # The production loop: a second server (capture on), a user's own photo and the id its answer carried; over
    # HTTP in tests/test_capture.py and tests/test_drift_serving.py, end to end in benchmarks/production_loop.py.
    "graft serve --capture-enabled": "a second server, with capture on (tests/test_capture.py)",
    "curl -si -X POST --data-binary @photo.png": "the user's own photo (a placeholder file)",
    "curl -s -X POST 127.0.0.1:8000/feedback": "labels the answer the line above got (its X-Request-Id)",
    "graft monitor": "reads what a capture server kept (tests/test_drift_serving.py, tests/test_schedule.py)",
    "graft data harvest": "turns a capture folder into data (tests/test_harvest.py)",
    "graft explain": "the user's own photo (a placeholder file); tests/test_pipeline.py explains a test image",
    "graft predict": "the user's own folder of photos (a placeholder path); tests/test_predict_files.py scores real "
                     "folders, labelled too, against a published workspace",
    "graft tune": "trains a study's trials on the full default data (minutes each); tests/test_tune.py tunes the small "
                  "project",
}

OPTIONAL_GROUP = re.compile(r"\s\[-[^\]]*\]")  # `[--version N]`: documentation syntax for an optional flag


def readme_lines() -> list[tuple[int, str]]:
    """(line number, line as written) for every command line of README.md's ```bash blocks."""
    lines, in_bash = [], False
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if in_bash and shlex.split(line, comments=True):  # not blank, not only a comment
            lines.append((number, line.strip()))
    return lines


def parts(line: str) -> list[list[str]]:
    """The line's commands (split at &&) as words, comment and trailing `&` removed, `.venv/bin/` kept."""
    words = shlex.split(OPTIONAL_GROUP.sub("", line), comments=True)
    if words and words[-1] == "&":
        words = words[:-1]
    commands, current = [], []
    for word in words:
        if word == "&&":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [*commands, current]


def plain(words: list[str]) -> str:
    """The command as the prefix lists spell it: `.venv/bin/graft serve` -> `graft serve`."""
    return " ".join([words[0].removeprefix(".venv/bin/"), *words[1:]])


def starts_with(text: str, prefix: str) -> bool:
    """Word-wise: `graft run` matches `graft run --force`, not `graft runner`; a prefix ending in / or = is a string
    prefix (a path under the folder, any value of the variable)."""
    return text == prefix or text.startswith(prefix if prefix.endswith(("/", "=")) else prefix + " ")


def long_prefix(line: str) -> str | None:
    return next((p for words in parts(line) for p in LONG if starts_with(plain(words), p)), None)


def classify(line: str) -> tuple[str, str]:
    """('quick' | 'long' | 'unknown', why)."""
    if (prefix := long_prefix(line)) is not None:
        return "long", LONG[prefix]
    kinds = []
    for words in parts(line):
        text = plain(words)
        if text.split()[0] == "graft" and ("--help" in words or "-h" in words):
            kinds.append("quick")
        elif text.startswith("curl "):
            kinds.append("quick" if any(DOC_ADDRESS in w or "localhost:8000" in w for w in words) else "unknown")
        elif any(starts_with(text, q) for q in QUICK):
            kinds.append("quick")
        else:
            kinds.append("unknown")
    return ("quick", "") if all(k == "quick" for k in kinds) else ("unknown", "")


def test_every_readme_command_is_run_or_listed_as_long():
    unknown = [f"README.md:{n}: {line}" for n, line in readme_lines() if classify(line)[0] == "unknown"]
    assert not unknown, ("README bash lines that are neither QUICK nor LONG in tests/test_readme.py (add a quick "
                         "prefix so the test runs them, or a LONG entry saying why not):\n" + "\n".join(unknown))


def test_long_list_is_not_stale():
    used = {plain(words) for _, line in readme_lines() for words in parts(line)}
    stale = [prefix for prefix in LONG if not any(starts_with(text, prefix) for text in used)]
    assert not stale, f"LONG entries no README bash line uses any more (remove them): {stale}"


def test_every_graft_line_in_the_readme_parses():
    """Long ones too: a renamed subcommand or flag in an example fails here even where the example is not run."""
    parser = build_parser()
    for number, line in readme_lines():
        expanded = re.sub(r"\s\[(-[^\]]*)\]", r" \1", line)  # optional groups included: their flags must exist
        for words in parts(expanded):
            if plain(words).startswith("graft "):
                args = ["2" if w == "N" else w for w in words[1:]]  # `--version N`
                try:
                    parser.parse_args(args)
                except SystemExit as exit_:
                    if exit_.code != 0:  # --help exits 0
                        pytest.fail(f"README.md:{number}: `{line}` is not a valid graft command line")


@pytest.fixture(scope="module")
def readme_project(repro_workspace, tmp_path_factory):
    """A published copy of the pipeline workspace, as the README's examples expect it: v1 champion, v2 challenger;
    `graft serve` configured (params.yaml, as a user would) to a free port instead of 8000."""
    # The published workspace (v1, champion) with a registry of its own: the examples promote and roll back there.
    root = copy_workspace(repro_workspace[0], tmp_path_factory.mktemp("readme") / "ws", registry=True)
    port = free_port()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["serving"]["port"] = port
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    registry = f"sqlite:///{root / 'mlflow.db'}"  # the project's own store: params.yaml registry.tracking_uri
    params["export"]["variants"] = []  # a second, different candidate: FP32 only, so only the export stage reruns
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    graft_cli(root, registry, "stage", "export")
    graft_cli(root, registry, "publish")
    client = MlflowClient(tracking_uri=registry)
    assert (champion(client), alias(client, "challenger")) == ("1", "2")
    return root, port, client


def alias(client: MlflowClient, name: str) -> str:
    return str(client.get_model_version_by_alias(MODEL, name).version)


def champion(client: MlflowClient) -> str:
    return alias(client, "champion")


def test_readme_examples_run_as_written(readme_project, tmp_path):
    root, port, client = readme_project
    address = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "GRAFT_API_TOKEN")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"  # bare `graft`/`dvc` as after `. .venv/bin/activate`

    def runnable(words: list[str]) -> list[str]:
        words = [str(VENV_BIN / w.removeprefix(".venv/bin/")) if w.startswith(".venv/bin/") else w for w in words]
        return [w.replace(DOC_ADDRESS, address).replace("localhost:8000", address) for w in words]

    # What each example must do beyond exiting 0, by subcommand (the registry starts at v1 champion, v2 challenger).
    after = {
        "graft promote": lambda done: champion(client) == "2",
        "graft rollback": lambda done: champion(client) == "1",
        "graft canary set 10": lambda done: "champion v1 answers 90% of live traffic, the canary challenger v2 10%"
                                            in done.stdout,
        "graft history --traffic": lambda done: "v1 90%, v2 10%" in done.stdout,
        "graft history": lambda done: re.search(r"champion\s+v2\s+v1\s+-\s+promote", done.stdout)
                                      and re.search(r"champion\s+v1\s+v2\s+-\s+rollback", done.stdout),
    }
    server, ran = None, []
    log = (tmp_path / "serve.log").open("w")
    try:
        for number, line in readme_lines():
            if classify(line)[0] != "quick":
                continue
            where = f"README.md:{number}: {line}"
            for words in parts(line):
                text = plain(words)
                argv = runnable(words)
                if text.startswith("graft serve"):
                    assert server is None, f"{where}: a second server"
                    server = subprocess.Popen(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True)
                    wait_ready(f"http://{address}", server, tmp_path / "serve.log", where)
                    served = httpx.get(f"http://{address}/v2/models/{MODEL}").json()["versions"]
                    assert [str(v) for v in served] == [champion(client)], f"{where}: serves v{served}, not the champion"
                elif text.startswith("curl "):
                    assert server is not None, f"{where}: a request before any `graft serve` line"
                    for word in words:  # a file the README sends must exist for users and in the test project
                        if word.startswith("@"):
                            assert (PROJECT / word[1:]).is_file() and (root / word[1:]).is_file(), \
                                f"{where}: {word[1:]} does not exist (data/raw holds e.g. {example_image()})"
                    done = subprocess.run([*argv, "-w", "\n%{http_code}"], cwd=root, env=env, capture_output=True,
                                          text=True, timeout=60)
                    body, _, status = done.stdout.rpartition("\n")
                    assert done.returncode == 0 and status.startswith("2"), \
                        f"{where}: curl exit {done.returncode}, HTTP {status}: {body[:500]} {done.stderr[-500:]}"
                    answer = json.loads(body)
                    assert "error" not in answer, f"{where}: {answer}"
                    if "/predict" in line:
                        classes = {c.name for c in (root / "data" / "raw" / "animal-mnist").iterdir()}
                        assert answer["predictions"] and {p["class"] for p in answer["predictions"]} <= classes, answer
                    if "/v2/health/ready" in line:
                        assert answer == {"ready": True}
                else:
                    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
                    assert done.returncode == 0, f"{where}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
                    check = next((c for prefix, c in after.items() if text.startswith(prefix)), None)
                    assert check is None or check(done), f"{where}: did not do what it says\n{done.stdout[-2000:]}"
                ran.append(text)
    finally:
        if server is not None:
            stop_process_group(server)
        log.close()
    # The examples this file exists for: promote/rollback/history, the server, and a request of each kind.
    for expected in ("graft promote", "graft rollback", "graft history", "graft serve", "curl"):
        assert any(t.startswith(expected) for t in ran), f"the README no longer shows `{expected}`; ran: {ran}"
    assert any("/predict" in t for t in ran), f"no /predict request in the README; ran: {ran}"


def wait_ready(base: str, server: subprocess.Popen, log: Path, where: str, seconds: float = 90) -> None:
    if not wait_healthy(f"{base}/v2/health/ready", seconds, server):
        raise AssertionError(f"{where}: the server never became ready:\n{log.read_text()[-3000:]}")


def example_image() -> str:
    first = sorted((RAW / "animal-mnist" / "cat").iterdir())[0]
    return str(first.relative_to(PROJECT))
