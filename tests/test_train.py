"""The one training loop and its strategies, on a real slice of Animal-MNIST."""
import dataclasses

import numpy as np
import pytest
import torch

from components.augment import augment_batch
from components.config import parse_params
from components.network import (
    ArchitectureError,
    ModelSpec,
    build,
    graft,
    load_checkpoint,
    save_checkpoint,
)
from components.train import (
    BatchSampler,
    EarlyStopper,
    Phase,
    Resume,
    evaluate_split,
    strategy_phases,
    train,
    warmup_cosine,
)
from components.evaluate import plot_curves, read_history, write_history
from components.predict import Normalizer
from tests.conftest import prepared_small_target, tiny_params, tiny_spec


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return prepared_small_target(tmp_path_factory.mktemp("target"))


def _spec(splits) -> ModelSpec:
    return tiny_spec(splits.classes)


def _backbone_state(model):
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


def test_strategies_are_phases():
    params = parse_params(tiny_params(**{"finetune.strategy": "lp_ft"})).finetune
    assert strategy_phases(params) == [Phase("linear_probe", 4, None), Phase("finetune", 8, params.backbone_lr_scale)]
    assert strategy_phases(params, "linear_probe") == [Phase("linear_probe", 12, None)]
    assert strategy_phases(params, "scratch") == [Phase("scratch", 12, 1.0)]


def test_linear_probe_freezes_backbone_weights_and_bn_statistics(target):
    params, splits = target
    source = build(_spec(splits), 1)
    model = graft(source.backbone, _spec(splits), 0)
    before, head_before = _backbone_state(model), model.head.weight.clone()
    train(model, splits, params.finetune, strategy_phases(params.finetune, "linear_probe"), 0)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "backbone (incl. BN running stats) changed"
    assert not torch.equal(head_before, model.head.weight)


def test_finetune_moves_the_backbone_and_keeps_the_grafted_weights_as_start(target):
    params, splits = target
    source = build(_spec(splits), 1)
    model = graft(source.backbone, _spec(splits), 0)
    assert all(torch.equal(a, b) for a, b in zip(source.backbone.state_dict().values(), model.backbone.state_dict().values()))
    train(model, splits, params.finetune, strategy_phases(params.finetune, "finetune"), 0)
    assert not torch.equal(source.backbone[0].weight, model.backbone[0].weight)


def test_backbone_learning_rate_is_scaled(target):
    from components.train import _optimizer
    from components.tuning import Tuning

    params, splits = target
    model = build(_spec(splits), 0)
    head, *backbone = _optimizer(model, params.finetune, Phase("finetune", 1, 0.1), Tuning()).param_groups
    assert [group["lr"] for group in backbone] == pytest.approx([0.1 * head["lr"]] * len(backbone))
    assert sum(len(group["params"]) for group in backbone) == len(list(model.backbone.parameters()))
    assert len(_optimizer(model, params.finetune, Phase("lp", 1, None), Tuning()).param_groups) == 1


def test_same_seed_same_model_other_seed_other_model(target):
    params, splits = target
    runs = []
    for seed in (0, 0, 1):
        model = build(_spec(splits), seed)
        history = train(model, splits, params.finetune, strategy_phases(params.finetune, "scratch"), seed)
        runs.append((model.state_dict(), history))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert runs[0][1] != runs[2][1]


def test_history_records_each_evaluation(target):
    params, splits = target
    model = build(_spec(splits), 0)
    history = train(model, splits, params.finetune, strategy_phases(params.finetune, "lp_ft"), 0)
    assert [r["step"] for r in history] == [4, 8, 12]
    assert [r["phase"] for r in history] == ["linear_probe", "finetune", "finetune"]
    assert all(0 <= r["val_accuracy"] <= 1 and np.isfinite(r["train_loss"]) for r in history)


@pytest.mark.parametrize("min_steps, evaluated", [(0, [4, 8]), (12, [4, 8, 12])])
def test_early_stopping_stops_when_val_stops_improving_and_restores_the_best_weights(target, min_steps, evaluated,
                                                                                   tmp_path):
    """By construction: no later evaluation can beat the first by min_delta 1.0 (accuracy is at most 1), so with
    patience 1 training stops at the second evaluation (or, with min_steps, at the last), and the first's weights
    come back."""
    params, splits = target
    rules = {"enabled": True, "metric": "val_accuracy", "patience": 1, "min_delta": 1.0, "min_steps": min_steps}
    finetune = parse_params(tiny_params(**{"finetune.early_stopping": rules})).finetune
    model = build(_spec(splits), 0)
    history = train(model, splits, finetune, strategy_phases(finetune, "scratch"), 0)
    assert [r["step"] for r in history] == [*evaluated, evaluated[-1]]
    restored = history[-1]
    assert restored["phase"] == "restored" and restored["restored_step"] == 4
    assert {k: v for k, v in restored.items() if k.startswith("val_")} == \
        {k: v for k, v in history[0].items() if k.startswith("val_")}
    model_now = evaluate_split(model, splits.x_val, splits.y_val, Normalizer.of(model.spec.contract))
    assert model_now["loss"] == history[0]["val_loss"], "the weights of step 4, not those of the last step"
    assert model_now["loss"] != history[-2]["val_loss"]
    # The history as the stages keep it: the restored record survives the CSV, and the curves mark it.
    assert read_history(write_history(history, tmp_path / "history.csv"))[-1]["restored_step"] == 4
    assert plot_curves({"scratch": history}, tmp_path / "curves.png", "early stopping").stat().st_size > 0


def test_early_stopping_on_balanced_accuracy_keeps_the_evaluation_that_treats_the_classes_alike():
    """Two evaluations by construction: the first more accurate (the large class right, the small ones missed), the
    second more balanced. Each metric keeps its own best, with that evaluation's weights."""
    model = torch.nn.Linear(2, 2)
    records = [{"step": 4, "epoch": 1, "val_accuracy": 0.9, "val_balanced_accuracy": 0.5, "val_loss": 0.4},
               {"step": 8, "epoch": 2, "val_accuracy": 0.8, "val_balanced_accuracy": 0.8, "val_loss": 0.5}]
    kept = {}
    for metric in ("val_accuracy", "val_balanced_accuracy"):
        params = parse_params(tiny_params(**{"finetune.early_stopping": {"enabled": True, "metric": metric}}))
        stopper = EarlyStopper(params.finetune.early_stopping)
        for record in records:
            with torch.no_grad():
                model.bias.fill_(record["step"])  # the weights of this evaluation
            stopper.update(model, record, last_phase=True)
        restored = stopper.restore(model, step=8)
        kept[metric] = (restored["restored_step"], float(model.bias[0]))
    assert kept == {"val_accuracy": (4, 4.0), "val_balanced_accuracy": (8, 8.0)}


def test_early_stopping_without_a_val_split_is_refused_by_name(target):
    params, splits = target
    finetune = parse_params(tiny_params(**{"finetune.early_stopping": {"enabled": True}})).finetune
    no_val = dataclasses.replace(splits, x_val=splits.x_val[:0], y_val=splits.y_val[:0])
    with pytest.raises(ValueError, match="early_stopping watches the val split, and this data has none"):
        train(build(_spec(splits), 0), no_val, finetune, strategy_phases(finetune, "scratch"), 0)


class _Killed(Exception):
    pass


class _KilledAfterFirstResumePoint(Resume):
    def save(self, state: dict) -> None:
        super().save(state)
        raise _Killed


def test_a_run_killed_after_a_resume_point_continues_and_ends_as_an_uninterrupted_run(target, tmp_path, capsys):
    params, splits = target
    phases = strategy_phases(params.finetune, "lp_ft")  # 4 + 8 steps: the resume point at step 6 is in the second phase
    model = build(_spec(splits), 0)
    history = train(model, splits, params.finetune, phases, 0)
    with pytest.raises(_Killed):
        train(build(_spec(splits), 0), splits, params.finetune, phases, 0,
              resume=_KilledAfterFirstResumePoint(tmp_path / "r.pt", 6, "run"))
    resumed = build(_spec(splits), 0)
    resumed_history = train(resumed, splits, params.finetune, phases, 0, resume=Resume(tmp_path / "r.pt", 6, "run"))
    assert "resuming from step 6 of 12" in capsys.readouterr().err
    assert resumed_history == history
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))


def test_graft_refuses_a_backbone_that_does_not_fit(target):
    _, splits = target
    source = build(_spec(splits), 0)
    other = tiny_spec(splits.classes, channels=3)
    with pytest.raises(ArchitectureError, match="does not fit graft_resnet"):
        graft(source.backbone, other, 0)


def test_augment_keeps_shape_and_identity_without_augmentation():
    from components.config import Augment

    pixels = torch.rand(5, 1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(pixels, Augment(), generator), pixels)
    warped = augment_batch(pixels, Augment(flip=True, rotate_degrees=10, scale=(0.9, 1.1), shift_pixels=2), generator)
    assert warped.shape == pixels.shape and not torch.equal(warped, pixels)
    flipped_only = augment_batch(pixels, Augment(flip=True), torch.Generator().manual_seed(3))
    for image, original in zip(flipped_only, pixels):
        assert torch.allclose(image, original, atol=1e-5) or torch.allclose(image, original.flip(-1), atol=1e-5)


def test_sampler_covers_every_example_each_pass():
    sampler = BatchSampler(10, 4, torch.Generator().manual_seed(0))
    seen = torch.cat([sampler.next() for _ in range(5)])
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:20].tolist()) == list(range(10))


def test_balanced_sampler_draws_every_class_as_often_as_the_largest_each_pass():
    labels = torch.tensor([0] * 6 + [1] * 2 + [2])
    sampler = BatchSampler(len(labels), 6, torch.Generator().manual_seed(0), balance_by=labels)
    drawn = torch.cat([sampler.next() for _ in range(6)])  # 36 draws: two passes of 18
    for one_pass in drawn.split(18):
        assert torch.bincount(labels[one_pass], minlength=3).tolist() == [6, 6, 6]
        assert sorted(one_pass[labels[one_pass] == 0].tolist()) == list(range(6))  # the largest class: each once
        assert torch.bincount(one_pass[labels[one_pass] == 1]).tolist()[6:] == [3, 3]  # the two of class 1: 3 each


def test_loss_weights_even_the_classes_and_are_none_on_a_balanced_split():
    from components.balance import loss_weights

    weights = loss_weights(torch.tensor([0] * 6 + [1] * 2 + [2]), 3)
    assert weights.tolist() == pytest.approx([0.5, 1.5, 3.0])  # n / (K n_c): each class's total weight n / K
    assert loss_weights(torch.tensor([2, 0, 1, 1, 0, 2]), 3) is None


def _imbalanced(splits):
    """The training split with every image of the first class and one of each other."""
    keep = np.concatenate([np.flatnonzero(splits.y_train == 0)]
                          + [np.flatnonzero(splits.y_train == c)[:1] for c in range(1, len(splits.classes))])
    return dataclasses.replace(splits, x_train=splits.x_train[keep], y_train=splits.y_train[keep],
                               origin_train=splits.origin_train[keep])


def _trained(params, splits, class_balance: str):
    recipe = params.finetune.model_copy(update={"class_balance": class_balance})
    model = build(_spec(splits), 0)
    history = train(model, splits, recipe, strategy_phases(recipe, "scratch"), 0)
    return model.state_dict(), history


@pytest.mark.parametrize("class_balance", ["reweight", "resample"])
def test_class_balance_changes_nothing_on_a_balanced_split_and_the_training_on_an_imbalanced_one(target, class_balance,
                                                                                              capsys):
    params, splits = target
    assert len(set(np.bincount(splits.y_train))) == 1, "the tiny target's labelled split is balanced (labels_per_class)"
    plain_state, plain_history = _trained(params, splits, "none")
    state, history = _trained(params, splits, class_balance)
    assert history == plain_history and all(torch.equal(state[k], plain_state[k]) for k in state)
    assert "class_balance" not in capsys.readouterr().err  # equal classes: nothing to say

    skewed = _imbalanced(splits)
    plain_state, plain_history = _trained(params, skewed, "none")
    state, history = _trained(params, skewed, class_balance)
    assert history[0]["train_loss"] != plain_history[0]["train_loss"]
    assert f"class_balance: {class_balance}" in capsys.readouterr().err


def test_schedule_warms_up_then_decays_to_zero():
    factor = warmup_cosine(100, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) < factor(20) and factor(99) < 0.01


def test_checkpoint_round_trip(target, tmp_path):
    _, splits = target
    model = build(_spec(splits), 0)
    save_checkpoint(model, tmp_path / "m.pt", {"strategy": "scratch"})
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta["strategy"] == "scratch" and loaded.spec == model.spec
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
