"""The serving settings are one model (deploy/settings.py ServingSettings): params.yaml's `serving`, the options of
`graft serve` and `python -m deploy.server`, the server's environment variables, and the deploy files that set
them are all derived from it, and held to it here."""
import argparse
import re
import subprocess
import sys

import pytest
import yaml

from deploy.server import TOKEN_VARIABLE, ServerSettings, argument_parser, environment_variables
from deploy.settings import (
    CACHE_VARIABLE,
    FIELDS,
    PROVIDER_NAMES,
    SETTINGS,
    CaptureSettings,
    ServingSettings,
    SettingsError,
    allowed,
    option,
    serving_from,
    variable,
    variables,
)
from deploy.variants import AUTO, VARIANTS
from tests.conftest import PROJECT, tiny_params

DEPLOY = PROJECT / "deploy"
NOT_SERVING = {"help", "tracking_uri", "model", "onnx_file", "cache_dir", "insecure_no_auth"}  # deploy.server's others


def _serving_dests(parser: argparse.ArgumentParser, others: set[str]) -> dict[str, list[str]]:
    """The parser's options that are not in `others`, by dest: their option strings."""
    return {a.dest: a.option_strings for a in parser._actions if a.dest not in others}


def test_names_and_allowed_values_are_derived_from_the_fields():
    assert variable("max_batch_size") == "GRAFT_MAX_BATCH_SIZE" and option("max_batch_size") == "--max-batch-size"
    # a nested model's fields are flattened: serving.capture.max_bytes
    assert SETTINGS["capture_max_bytes"].path == ("capture", "max_bytes") and "capture" not in FIELDS
    assert variable("capture_max_bytes") == "GRAFT_CAPTURE_MAX_BYTES" and option("drift_level") == "--drift-level"
    assert allowed("variant") == (AUTO, *VARIANTS)
    assert allowed("providers") == (AUTO, *PROVIDER_NAMES)
    assert allowed("port") is None
    assert all(info.description for info in FIELDS.values()), "every field's description is its help text"


def test_the_servers_options_are_the_models_fields():
    dests = _serving_dests(argument_parser(), NOT_SERVING)
    assert set(dests) == set(FIELDS)
    for name, strings in dests.items():
        assert option(name) in strings
        help_text = next(a.help for a in argument_parser()._actions if a.dest == name)
        assert FIELDS[name].description in help_text and variable(name) in help_text
    # the option names scripts and tests use stayed
    assert {"--max-batch-size", "--poll-seconds", "--variant", "--providers", "--strict", "--host", "--port",
            "--capture-enabled", "--no-capture-enabled", "--capture-sample", "--drift-window"} <= {
        s for strings in dests.values() for s in strings}


def test_graft_serves_options_are_the_models_fields():
    from graft.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    dests = _serving_dests(serve, {"help", "root", "verbose", "onnx_file", "insecure_no_auth"})
    assert set(dests) == set(FIELDS)
    assert all(option(name) in strings for name, strings in dests.items())


def test_an_option_wins_over_its_variable_which_wins_over_the_base():
    parser = argument_parser()
    environ = {"GRAFT_MAX_BATCH_SIZE": "8", "GRAFT_PROVIDERS": "cuda, cpu", "GRAFT_STRICT": "1", "GRAFT_PORT": "",
               "GRAFT_VARIANT": "int8"}
    serving = serving_from(parser.parse_args(["--variant", "fp16"]), environ=environ)
    assert (serving.max_batch_size, serving.providers, serving.strict, serving.variant) == (8, ["cuda", "cpu"], True, "fp16")
    assert serving.port == 8000, "an empty variable is not set"
    base = ServingSettings(port=9000, alias="staging")
    assert serving_from(parser.parse_args(["--no-strict"]), base=base, environ={}).model_dump() == \
        base.model_copy(update={"strict": False}).model_dump()


def test_a_nested_setting_is_given_alone_and_keeps_its_siblings():
    parser = argument_parser()
    base = ServingSettings(capture=CaptureSettings(folder="kept", sample=0.5))
    serving = serving_from(parser.parse_args(["--capture-enabled", "--capture-sample", "0.25"]), base=base,
                           environ={"GRAFT_CAPTURE_SAMPLE": "0.75", "GRAFT_DRIFT_WINDOW": "50"})
    assert serving.capture == CaptureSettings(enabled=True, sample=0.25, folder="kept")
    assert (serving.drift.window, serving.drift.level) == (50, 0.01)
    assert serving_from(parser.parse_args([]), environ={"GRAFT_CAPTURE_ENABLED": "true"}).capture.enabled is True


@pytest.mark.parametrize("argv, environ, message", [
    (["--max-batch-size", "0"], {}, "--max-batch-size '0': Input should be greater than or equal to 1"),
    ([], {"GRAFT_VARIANT": "bf16"}, "GRAFT_VARIANT 'bf16': Input should be 'auto', 'fp32', 'int8' or 'fp16'"),
    (["--providers", "cuda,gpu"], {}, "--providers 'gpu': Input should be 'auto', 'tensorrt', 'cuda' or 'cpu'"),
    ([], {"GRAFT_PORT": "http"}, "GRAFT_PORT 'http': Input should be a valid integer"),
    (["--capture-sample", "0"], {}, "--capture-sample '0': Input should be greater than 0"),
    ([], {"GRAFT_CAPTURE_MAX_BYTES": "1000"}, "GRAFT_CAPTURE_MAX_BYTES '1000': Input should be greater than or equal to 1000000"),
    ([], {"GRAFT_DRIFT_LEVEL": "1"}, "GRAFT_DRIFT_LEVEL '1': Input should be less than 1"),
    ([], {"GRAFT_CAPTURE_ENABLED": "maybe"}, "GRAFT_CAPTURE_ENABLED 'maybe': Input should be a valid boolean"),
])
def test_a_bad_value_is_named_by_its_option_or_variable(argv, environ, message):
    with pytest.raises(SettingsError) as refused:
        serving_from(argument_parser().parse_args(argv), environ=environ)
    assert message in str(refused.value)


def test_the_server_refuses_a_bad_value_with_exit_2_and_no_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    for command, env, named in ((["deploy.server"], {"GRAFT_VARIANT": "bf16"}, "GRAFT_VARIANT 'bf16'"),
                                (["graft", "serve", "--variant", "bf16"], {}, "--variant 'bf16'")):
        done = subprocess.run([sys.executable, "-m", *command, "--onnx-file", str(tmp_path / "model.onnx")],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env})
        assert done.returncode == 2, done.stdout + done.stderr
        assert named in done.stderr and "'auto', 'fp32', 'int8' or 'fp16'" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def _leaf_paths(node: dict, parent: tuple = ()) -> set[tuple]:
    return {path for key, value in node.items()
            for path in (_leaf_paths(value, (*parent, key)) if isinstance(value, dict) else {(*parent, key)})}


def test_params_yaml_states_every_serving_setting():
    serving = yaml.safe_load((PROJECT / "params.yaml").read_text())["serving"]
    assert _leaf_paths(serving) == {setting.path for setting in SETTINGS.values()}
    assert ServingSettings.model_validate(serving).capture.enabled is False, "capture is the operator's decision"


def test_one_cache_folder_variable(monkeypatch, tmp_path):
    from deploy.model import engine_cache

    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path))
    assert engine_cache(None) == tmp_path and ServerSettings().cache_dir == str(tmp_path)
    assert engine_cache(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv(CACHE_VARIABLE)
    assert ServerSettings().cache_dir.endswith(".cache/graft")


def test_every_variable_the_deploy_files_set_is_one_the_server_reads():
    read = environment_variables()
    assert set(variables().values()) | {CACHE_VARIABLE, TOKEN_VARIABLE, "GRAFT_MODEL", "MLFLOW_TRACKING_URI"} == read
    compose_text = (DEPLOY / "compose.yaml").read_text()
    server_env = yaml.safe_load(compose_text)["services"]["graft-server"]["environment"]
    dockerfile = (DEPLOY / "docker" / "server.Dockerfile").read_text()
    image_env = re.findall(r"\b(GRAFT_[A-Z_]+)=", dockerfile)
    env_example = [line.split("=", 1)[0] for line in (DEPLOY / ".env.example").read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
    for where, names in (("compose.yaml graft-server", server_env), ("server.Dockerfile", image_env),
                         (".env.example", env_example)):
        unread = sorted(n for n in names if n.startswith("GRAFT_") and n not in read)
        assert not unread, f"{where} sets {unread}, which the server does not read; it reads {sorted(read)}"
    assert image_env and "GRAFT_STRICT" in server_env
    # Every variable compose takes from deploy/.env is in the example to copy.
    interpolated = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", compose_text))
    assert interpolated and interpolated <= set(env_example), sorted(interpolated - set(env_example))


def test_validating_serving_settings_loads_no_onnx_runtime():
    probe = "import sys, deploy.settings; sys.exit('onnxruntime' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=PROJECT).returncode == 0
