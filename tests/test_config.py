import re
from pathlib import Path

import pytest
import yaml

from components.config import Params, ParamsError, load_params
from components.settings import Settings, load_settings, parse_settings
from tests.conftest import PROJECT, tiny_params


def test_project_params_load():
    params = load_settings(PROJECT / "params.yaml")
    assert params.finetune.strategy == "finetune"
    assert params.data.target.labels_per_class == 10
    assert params.sources.names() == ["fashion-mnist", "efficientnet-lite0"]
    assert params.sources.kind("fashion-mnist") == "pipeline" and params.sources.kind("efficientnet-lite0") == "pretrained"


def test_bad_strategy_names_key_and_allowed_values():
    with pytest.raises(ParamsError) as error:
        parse_settings(tiny_params(**{"finetune.strategy": "full"}))
    message = str(error.value)
    assert "finetune.strategy" in message
    for allowed in ("scratch", "linear_probe", "finetune", "lp_ft"):
        assert allowed in message
    assert "'full'" in message


def test_unknown_key_is_rejected_by_name():
    raw = tiny_params()
    raw["finetune"]["stepz"] = 3
    raw["export"]["int8_search"]["keep_float"] = ["classifier"]  # a key an older Graft had
    with pytest.raises(ParamsError, match=r"finetune\.stepz: unknown key") as refused:
        parse_settings(raw)
    # each names the keys its section allows, down through mappings (a source's name) to the nested model
    assert re.search(r"finetune\.stepz: .*allowed here: .*\bsteps\b", str(refused.value))
    assert re.search(r"export\.int8_search\.keep_float: .*allowed here: calibration, float_classifier, float_convs, "
                     r"formats, per_channel, same_speed_within\)", str(refused.value))


def test_normalisation_needs_one_value_per_channel():
    with pytest.raises(ParamsError, match=r"sources.pipeline.fashion-mnist: .*mean/std need one value a channel"):
        parse_settings(tiny_params(**{"sources.pipeline.fashion-mnist.channels": 3}))
    with pytest.raises(ParamsError, match="need 3 values"):
        parse_settings(tiny_params(**{"sources.pretrained.efficientnet-lite0.mean": [0.5],
                                    "sources.pretrained.efficientnet-lite0.std": [0.5]}))


def test_a_pretrained_source_names_exactly_one_origin_of_weights():
    with pytest.raises(ParamsError, match="exactly one of weights .* or weights_file"):
        parse_settings(tiny_params(**{"sources.pretrained.efficientnet-lite0.weights_file": "w.pth"}))
    with pytest.raises(ParamsError, match="exactly one of weights"):
        parse_settings(tiny_params(**{"sources.pretrained.efficientnet-lite0.weights": None}))


def test_sources_need_a_candidate_and_selection_names_one():
    raw = tiny_params()
    raw["sources"] = {"pipeline": {}, "pretrained": {}}
    with pytest.raises(ParamsError, match="at least one candidate"):
        parse_settings(raw)
    with pytest.raises(ParamsError, match="'imagenet-resnet' is not a candidate; candidates: fashion-mnist, efficientnet-lite0"):
        parse_settings(tiny_params(**{"selection.use": "imagenet-resnet"}))
    with pytest.raises(ParamsError, match=r"selection.mode: .*'auto' or 'report'"):
        parse_settings(tiny_params(**{"selection.mode": "best"}))
    assert parse_settings(tiny_params(**{"selection.mode": "report"})).chosen_in_report_mode() == "fashion-mnist"


def test_lp_steps_must_fit_inside_steps():
    with pytest.raises(ParamsError, match=r"lp_steps \(12\) must be < finetune.steps \(12\)"):
        parse_settings(tiny_params(**{"finetune.strategy": "lp_ft", "finetune.lp_steps": 12}))


def test_negative_values_are_rejected():
    with pytest.raises(ParamsError, match=r"pretrain.lr: Input should be greater than 0 \(got -0.1\)"):
        parse_settings(tiny_params(**{"pretrain.lr": -0.1}))


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ParamsError, match="no such file"):
        load_settings(tmp_path / "params.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [1, 2\n")
    with pytest.raises(ParamsError, match=r"not valid YAML(.|\n)*line 1, column 7:\n +seed: \[1, 2\n +\^") as raised:
        load_settings(broken)  # the line quoted and the column pointed at, though libyaml parses the good files
    assert str(raised.value).startswith(f"{broken}: not valid YAML")  # the file named once
    listed = tmp_path / "list.yaml"
    listed.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ParamsError, match="mapping"):
        load_settings(listed)


def test_the_mappings_dvc_iterates_over_must_be_written_out(tmp_path: Path):
    raw = tiny_params()
    del raw["data"]["unlabeled"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"data.unlabeled: missing; .*data.unlabeled: \{\}"):
        load_settings(tmp_path / "params.yaml")


def test_sweep_strategies_and_adaptation_name_what_they_need():
    bad_strategy = tiny_params(**{"sweep.strategies": {"mine": {"joint": {"weight": -1}}}})
    with pytest.raises(ParamsError, match=r"sweep.strategies.mine is not a valid change of finetune:\s+joint.weight"):
        parse_settings(bad_strategy)
    without_images = tiny_params(**{"finetune.adaptation.method": "coral"})
    with pytest.raises(ParamsError, match=r"finetune.adaptation: 'coral' needs unlabelled target images.*entries: none"):
        parse_settings(without_images)
    named = tiny_params(**{"finetune.adaptation.method": "dann", "data.unlabeled": {"cam": {"path": "x"}}})
    assert parse_settings(named).unlabeled_for("adaptation") == "cam"


def test_the_semi_supervised_term_names_its_unlabelled_images_and_trains_in_one_process():
    without_images = tiny_params(**{"finetune.semi_supervised.method": "fixmatch"})
    with pytest.raises(ParamsError, match=r"finetune.semi_supervised: 'fixmatch' needs unlabelled target images.*entries: none"):
        parse_settings(without_images)
    two = {"cam": {"path": "x"}, "phone": {"path": "y"}}
    ambiguous = tiny_params(**{"finetune.semi_supervised.method": "fixmatch", "data.unlabeled": two})
    with pytest.raises(ParamsError, match=r"name one data.unlabeled entry in finetune.semi_supervised.unlabeled \(entries: cam, phone\)"):
        parse_settings(ambiguous)
    wrong = tiny_params(**{"finetune.semi_supervised": {"method": "fixmatch", "unlabeled": "tablet"}, "data.unlabeled": two})
    with pytest.raises(ParamsError, match=r"finetune.semi_supervised.unlabeled: 'tablet' is not a data.unlabeled entry"):
        parse_settings(wrong)
    chosen = parse_settings(tiny_params(**{"finetune.semi_supervised": {"method": "fixmatch", "unlabeled": "phone"},
                                           "data.unlabeled": two}))
    assert (chosen.unlabeled_terms(), chosen.unlabeled_for("semi_supervised")) == (["semi_supervised"], "phone")
    self_training_alone = tiny_params(**{"finetune.semi_supervised.self_training.rounds": 1})
    with pytest.raises(ParamsError, match=r"finetune.semi_supervised: 'self_training' needs unlabelled target images"):
        parse_settings(self_training_alone)
    self_training_alone["data"]["unlabeled"] = {"cam": {"path": "x"}}
    assert parse_settings(self_training_alone).unlabeled_terms() == ["semi_supervised"]
    with pytest.raises(ParamsError, match=r"finetune.semi_supervised.threshold: .*less than or equal to 1"):
        parse_settings(tiny_params(**{"finetune.semi_supervised.threshold": 1.5}))
    parallel = tiny_params(**{"finetune.semi_supervised.method": "fixmatch", "data.unlabeled": {"cam": {"path": "x"}},
                              "compute.processes": 2, "finetune.batch_size": 8, "pretrain.batch_size": 8})
    with pytest.raises(ParamsError, match=r"finetune.semi_supervised\) run in one process: set compute.processes: 1"):
        parse_settings(parallel)


@pytest.mark.parametrize("key, value, expected", [
    ("export.variants", ["int8", "int8"], r"export\.variants: .*each variant at most once"),
    ("export.variants", ["int4"], r"export\.variants\.0: .*'int8'.*'fp16'"),
    ("export.int8_search.calibration", ["mean"], r"export\.int8_search\.calibration\.0: .*'percentile'.*'minmax'.*'entropy'"),
    ("export.int8_search.formats", ["qop"], r"export\.int8_search\.formats\.0: .*'qdq'.*'qoperator'"),
    ("export.max_accuracy_drop", -0.1, r"export\.max_accuracy_drop: .*greater than or equal to 0"),
    ("serving.variant", "bf16", r"serving\.variant: .*'auto'.*'fp32'.*'int8'.*'fp16'"),
    ("promotion.canary.steps", [25, 5, 100], r"promotion\.canary\.steps \[25\.0, 5\.0, 100\.0\]: .*rising, the last 100"),
    ("promotion.canary.steps", [5, 50], r"promotion\.canary\.steps .*the last 100"),
    ("serving.canary.key_header", "X Key", r"serving\.canary\.key_header: .*pattern"),
])
def test_export_variants_and_the_served_variant_are_checked_by_name(key, value, expected):
    with pytest.raises(ParamsError, match=expected):
        parse_settings(tiny_params(**{key: value}))


def test_the_stages_read_the_candidate_params_and_nothing_else():
    """params.yaml splits into what changes a model (the DVC stages' Params) and the operations settings beside
    it; together they are the file, and a stage reading the file sees only the candidate part."""
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    candidate, operations = set(Params.model_fields), set(Settings.model_fields) - set(Params.model_fields)
    assert candidate | operations == set(raw) and {"serving", "schedule", "registry", "storage", "gates"} <= operations
    assert type(load_params(PROJECT / "params.yaml")) is Params
    assert load_params(PROJECT / "params.yaml").model_dump() == {k: v for k, v in load_settings(PROJECT / "params.yaml").model_dump().items() if k in candidate}
